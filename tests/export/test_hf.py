import torch
from transformers import AutoModelForCausalLM

import modelpress as mp
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


def test_hf_export_loads_without_modelpress(tmp_path):
    m = tiny_model("llama")
    w = windows()
    c = mp.compress(m, None, "gptq", data=w, bits=4, group_size=16, drop=["model.layers.1.mlp"])
    c.save(tmp_path / "ck", export_hf_dir=tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        a, b = m(w.eval).logits, plain(w.eval).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=1e-2)  # float16 storage of dequantized weights
    assert torch.all(plain.model.layers[1].mlp.down_proj.weight == 0)
