"""--reference: the quantized model's outputs against the 16-bit model's (KL and top-1, or cosine)."""

from __future__ import annotations

import gc

from qtool.core.config import Settings
from qtool.core.errors import BadInput, WeightsError
from qtool.verify.inputs import VerifyOptions
from qtool.verify.load import _quiet_transformers, _torch_dtype
from qtool.verify.verdict import _first_line


def _quality_outputs(model, ids, causal: bool):
    """Log-probabilities (causal LM) or hidden states (encoder) for the quality batch, on CPU in float32."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = model(input_ids=ids.to(device))
        if causal:
            return torch.log_softmax(out.logits.float(), dim=-1).cpu()
        return out.last_hidden_state.float().cpu()


def compare_outputs(quant, ref, causal: bool) -> dict:
    """KL(ref || quant) per next-token distribution and top-1 agreement; cosine similarity for encoders."""
    import torch

    if quant.shape != ref.shape:
        raise BadInput(f"--reference outputs have shape {tuple(ref.shape)}, the model's {tuple(quant.shape)}: "
                       "not the same architecture")
    if causal:
        kl = (ref.exp() * (ref - quant)).sum(-1)  # per position
        agree = (ref.argmax(-1) == quant.argmax(-1)).float()
        return {"metric": "kl_top1", "positions": int(kl.numel()),
                "mean_kl": max(0.0, float(kl.mean())), "max_kl": max(0.0, float(kl.max())),
                "top1_agreement": float(agree.mean())}
    cos = torch.nn.functional.cosine_similarity(ref, quant, dim=-1)
    return {"metric": "cosine", "positions": int(cos.numel()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def _reference_quality(reference, settings: Settings, options: VerifyOptions, device_map, ids, quant_out,
                       causal: bool) -> dict:
    import torch

    from qtool.core.meta import hf_config, model_class
    from qtool.core.models import read_config_json

    root = reference[0]
    cfg = hf_config(read_config_json(root / "config.json"), source=root / "config.json",
                    trust_remote_code=options.trust_remote_code)
    cls = model_class(cfg)
    try:
        with _quiet_transformers():
            ref = cls.from_pretrained(root, dtype=_torch_dtype(settings.quant.compute_dtype), device_map=device_map,
                                      trust_remote_code=options.trust_remote_code)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightsError(f"--reference cannot load: {_first_line(exc)}", path=root) from exc
    try:
        if ref.get_input_embeddings().weight.shape[0] <= int(ids.max()):
            raise BadInput("--reference has a smaller vocabulary than the model: not the same model", path=root)
        ref_out = _quality_outputs(ref, ids, causal)
    finally:
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"reference": str(root), "tokens": int(ids.numel()), **compare_outputs(quant_out, ref_out, causal)}
