"""Real 4-bit checkpoint bytes for Llama-3-70B shapes: transformers' own quantize+save of a 2-layer model with
the 70B's exact tensor shapes (embeddings, lm_head, layers), compared with qtool estimate for the same config;
per-layer bytes then scale exactly to 80 layers. Needs ~12 GB RAM and ~20 GB of /tmp; about 5 minutes on 2 cores.

  python bench/check_70b_bytes.py
"""
import json, os, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = json.load(open(ROOT / "configs" / "models" / "llama-3-70b.json"))
work = Path(tempfile.mkdtemp(dir="/tmp"))
def build(layers):
    c = dict(cfg, num_hidden_layers=layers); c.pop("_qtool_note", None)
    d = work / f"src{layers}"; d.mkdir()
    (d / "config.json").write_text(json.dumps(c))
    from qtool.core.meta import meta_model
    m = meta_model(c)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n, p in m.named_parameters():
        sd[n] = (torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"}); del sd
    return d, c
out = {}
for layers in (1, 2):
    d, c = build(layers)
    t = time.time()
    q = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map="cpu")
    q.save_pretrained(work / f"q{layers}"); del q
    size = sum(p.stat().st_size for p in (work / f"q{layers}").glob("*.safetensors"))
    from qtool.core.config import resolve_settings
    from qtool.estimate import estimate_report
    from qtool.core.models import resolve_model
    est = estimate_report(resolve_model(str(d / "config.json")), resolve_settings({}, env={}))["weights_bytes"]["nf4_dq"]
    out[layers] = (size, est)
    print(layers, "layers: transformers checkpoint", size, "qtool estimate", est, "diff", est - size, round(time.time()-t,1), "s", flush=True)
    import shutil; shutil.rmtree(d); shutil.rmtree(work / f"q{layers}")
per_layer = out[2][0] - out[1][0]
real80 = out[1][0] + 79 * per_layer
print("per-layer bytes", per_layer, "-> 80-layer checkpoint (from transformers' own files)", real80)
