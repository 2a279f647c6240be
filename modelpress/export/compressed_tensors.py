"""compressed-tensors export: a Hugging Face folder that vLLM and transformers load with the
weights still packed (`pack-quantized`, weight-only int quantization).

Per quantized Linear the folder holds `weight_packed` (int32, the signed codes + 2^(bits-1)
packed along the input dimension), `weight_scale` (float16, one per row and group),
`weight_zero_point` (asymmetric only: int32, packed along the output dimension) and
`weight_shape`; `config.json` carries `quantization_config` with one `config_groups` entry per
distinct scheme (bits, symmetry, group size), whose `targets` are its layers' full names, and
`ignore` for what stays dense. Packing goes through the compressed-tensors package itself
(`pack_to_int32`), so the layout is the library's. The codes are modelpress's own: compressed-tensors'
(q - zp) * scale with signed q, zp is exactly modelpress's (code - zero) * scale.

What the format cannot hold is refused with the way out: sparse or low-rank layers, removed
sub-blocks, GPTQ groups formed in act-order (compressed-tensors >= 0.20 and vLLM dropped
`actorder: group`; `--static-groups` keeps act-order's sweep with groups in column order), and
group sizes that do not divide a layer's inputs. Which vLLM kernel runs each scheme:
`vllm_kernel` and docs/serving.md.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..ops.packed import PackedWeight
from ..utils.io import atomic_dir
from .checkpoint import empty_model

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"


def _packer():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ConfigError("the compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'modelpress[serve]' (or pip install compressed-tensors)") from None
    return pack_to_int32


def exportable_settings(settings: dict, takes_static_groups: bool) -> dict:
    """A quantizer's (or quant levels') settings made exportable: act-order GPTQ gets static
    groups unless the caller chose (the only act-order groups the format stores)."""
    if takes_static_groups and settings.get("static_groups") is None and settings.get("act_order") is not False:
        return {**settings, "static_groups": True}
    return settings


def weights_args(name: str, pw: PackedWeight) -> dict:
    """The compressed-tensors `weights` arguments of one packed layer (ConfigError if the format
    cannot hold it, saying what to do instead)."""
    out_f, in_f = pw.shape
    if pw.bits is None or pw.mask is not None or pw.lr_b is not None:
        what = "sparse" if pw.mask is not None else ("low-rank" if pw.lr_b is not None else "not quantized")
        raise ConfigError(f"{name} is {what}: compressed-tensors pack-quantized holds integer-quantized layers only; "
                          "use --export hf (dense) or a quantization method / kind")
    if pw.perm is not None:
        raise ConfigError(f"{name} was quantized with act-order groups, which compressed-tensors (>= 0.20) and vLLM "
                          "no longer load; compress with --static-groups (act-order, groups in column order) "
                          "or --no-act-order")
    if pw.group_size is not None and in_f % pw.group_size:
        raise ConfigError(f"{name}: group size {pw.group_size} does not divide its {in_f} inputs, which "
                          "compressed-tensors requires; use a group size that does (or 0: one per row)")
    group = pw.group_size if pw.group_size is not None and pw.group_size < in_f else None
    return {"num_bits": int(pw.bits), "type": "int", "symmetric": bool(pw.sym),
            "strategy": "group" if group else "channel", "group_size": group, "dynamic": False}


def vllm_kernel(args: dict, device: str = "cuda") -> str:
    """The kernel vLLM 0.33 picks for a weight-only int scheme (its choose_mp_linear_kernel order,
    read from vllm/model_executor/kernels/linear/mixed_precision/): on CUDA, Machete on SM90 for
    groups -1/64/128, else Marlin for 4-bit and symmetric 8-bit with groups -1/32/64/128; the rest
    only on the generic Humming kernel. On the CPU only 4-bit runs (CPUWNA16)."""
    bits, sym, g = args["num_bits"], args["symmetric"], args["group_size"] or -1
    if device == "cpu":
        return "CPUWNA16" if bits == 4 else "none (vLLM has no CPU kernel for it)"
    if bits in (4, 8) and g in (-1, 32, 64, 128) and (bits == 4 or sym):
        return "Machete (SM90) / Marlin" if g != 32 else "Marlin"
    if bits == 8 and not sym and g in (-1, 64, 128):
        return "Machete (SM90 only); elsewhere Humming"
    return "Humming (generic fallback)"


@torch.no_grad()
def export_compressed_tensors(model, tokenizer, units: dict[str, PackedWeight], out_dir: str | Path, *,
                              dropped: list[str] | tuple = (), dtype: torch.dtype = torch.float16) -> dict:
    """Write `model` (whose layers `units` are packed) as a compressed-tensors folder. Returns
    {"schemes": [{"weights": ..., "layers": n, "vllm": kernel}], "ignore": [...], "path": ...}."""
    if dropped:
        raise ConfigError(f"the model has removed sub-blocks ({', '.join(dropped[:2])}...), which a Hugging Face "
                          "config cannot express; export it with --export hf (zeroed weights) instead")
    pack_to_int32 = _packer()
    schemes: dict[str, tuple[dict, list[str]]] = {}
    for name, pw in units.items():
        args = weights_args(name, pw)
        schemes.setdefault(json.dumps(args, sort_keys=True), (args, []))[1].append(name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = empty_model(config, dtype)
    have = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, t in plain.state_dict().items():
        tensors[key] = (have[key] if key in have else torch.zeros_like(t)).to(dtype).contiguous()
    if getattr(plain.config, "tie_word_embeddings", False):
        for key in [k for k in tensors if k.startswith("lm_head.")]:
            del tensors[key]  # tied: transformers re-ties it to the embedding on load
    for name, pw in units.items():
        out_f, in_f = pw.shape
        half = 1 << (pw.bits - 1)
        codes = pw.codes.reshape(out_f, in_f).to(torch.int16) - half
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8).cpu(), pw.bits)
        tensors[f"{name}.weight_scale"] = pw.scales.to(dtype).cpu().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not pw.sym:
            zp = (pw.zeros.to(torch.int16) - half).to(torch.int8).cpu()
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp, pw.bits, packed_dim=0)
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linears if n not in units]
    import compressed_tensors

    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "version": compressed_tensors.__version__,
        "config_groups": {f"group_{i}": {"targets": sorted(layers), "weights": args, "format": FORMAT,
                                         "input_activations": None, "output_activations": None}
                          for i, (args, layers) in enumerate(schemes.values())},
        "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
    }
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    info = {"path": str(out_dir), "ignore": ignore,
            "schemes": [{"weights": args, "layers": len(layers), "vllm": vllm_kernel(args)}
                        for args, layers in schemes.values()]}
    log.info("compressed-tensors export: %s", info)
    return info
