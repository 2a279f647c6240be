"""compressed-tensors export: the library decodes our packed tensors to our weights, and
transformers loads the folder as the model modelpress made."""
import json

import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError
from modelpress.export.compressed_tensors import export_compressed_tensors, vllm_kernel, weights_args
from modelpress.models.arch import Arch, get_weight, set_weight
from modelpress.ops import OPERATORS
from tests.conftest import layer_problem, tiny_model
from tests.export.test_checkpoint import windows

pytest.importorskip("compressed_tensors")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _gptq(sym: bool, arch: str = "llama", **kw):
    m = tiny_model(arch)
    c = mp.compress(m, None, "gptq", data=windows(), bits=4, group_size=32, sym=sym, static_groups=True,
                    compute_dtype="float32", **kw)
    return m, c


def _load(path, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def test_library_decodes_our_tensors_to_our_weights(tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    for sym in (True, False):
        m, c = _gptq(sym)
        out = tmp_path / f"ct-{sym}"
        info = export_compressed_tensors(m, None, c.units, out)
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
        assert cfg["ignore"] == ["lm_head"] and len(cfg["config_groups"]) == 1 == len(info["schemes"])
        sd = load_file(out / "model.safetensors")
        scheme = QuantizationScheme(targets=["Linear"], weights=cfg["config_groups"]["group_0"]["weights"])
        comp = PackedQuantizationCompressor()
        for name, pw in c.units.items():
            part = {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(name + ".")}
            assert ("weight_zero_point" in part) == (not sym) and "weight" not in part
            w = comp.decompress_weight(part, quantization_args=scheme.weights) if hasattr(
                comp, "decompress_weight") else comp.decompress(part, scheme)["weight"]
            ours = pw.dequantize(torch.float16)
            assert torch.equal(w.to(torch.float16), ours), name


@pytest.mark.parametrize("sym,arch", [(True, "llama"), (False, "llama"), (True, "qwen3"), (False, "qwen2")])
def test_transformers_loads_the_model_modelpress_made(tmp_path, sym, arch):
    m, c = _gptq(sym, arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for mod_name, pw in c.units.items():  # what the export stores: float16 scales
        set_weight(dict(m.named_modules())[mod_name], pw.dequantize(torch.float16).float())
    want = _logits(m, ids)
    export_compressed_tensors(m, None, c.units, tmp_path / "ct")
    # transformers 5.24 + compressed-tensors 0.20.1 load asymmetric folders only with dequantize=True
    got = _logits(_load(tmp_path / "ct", dequantize=not sym), ids)
    assert torch.allclose(got, want, atol=5e-3, rtol=1e-3), (got - want).abs().max()  # float16 rounding


def test_mixed_schemes_get_one_group_each(tmp_path):
    """4-bit g32 attention, 8-bit per-row MLP (symmetric, so transformers decodes each layer by its own
    group); the fused q/k/v and gate/up each share a scheme, as vLLM requires."""
    m = tiny_model("llama")
    units = {}
    for name, mod in Arch(m).all_linears().items():
        attn = ".self_attn." in name
        op = OPERATORS.build("rtn", bits=4 if attn else 8, group_size=32 if attn else None, sym=True)
        units[name] = op.compress(get_weight(mod).float(), None)
        set_weight(mod, units[name].dequantize(torch.float16).float())
    for prm in m.parameters():  # the rest is stored in float16, as compress() rounds it
        prm.data = prm.data.half().float()
    info = export_compressed_tensors(m, None, units, tmp_path / "mix")
    groups = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["strategy"], len(g["targets"])) for g in groups.values()) \
        == [(4, "group", 12), (8, "channel", 9)]
    assert {s["vllm"] for s in info["schemes"]} == {"Marlin", "Machete (SM90) / Marlin"}
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_logits(_load(tmp_path / "mix"), ids), _logits(m, ids), atol=2e-3, rtol=1e-3)


def test_what_the_format_cannot_hold_is_refused_with_the_way_out(tmp_path):
    w, _, st = layer_problem(out_f=32, in_f=64, n=256)
    with pytest.raises(ConfigError, match="--static-groups"):
        weights_args("a", OPERATORS.build("gptq", bits=4, group_size=32, act_order=True).compress(w, st))
    with pytest.raises(ConfigError, match="sparse"):
        weights_args("b", OPERATORS.build("sparsegpt", sparsity=0.5).compress(w, st))
    with pytest.raises(ConfigError, match="does not divide"):
        weights_args("c", OPERATORS.build("rtn", bits=4, group_size=48).compress(w, None))
    m, c = _gptq(True)
    with pytest.raises(ConfigError, match="removed sub-blocks"):
        export_compressed_tensors(m, None, c.units, tmp_path / "x", dropped=["model.layers.0.mlp"])
    assert not (tmp_path / "x").exists()
    assert vllm_kernel({"num_bits": 3, "symmetric": True, "group_size": 64}).startswith("Humming")
    assert vllm_kernel({"num_bits": 8, "symmetric": True, "group_size": None}, device="cpu").startswith("none")
