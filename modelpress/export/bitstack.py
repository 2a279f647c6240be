"""BitStack: any-size loading from one stored decomposition (Wang et al., 2024).

Each weight, scaled by its input-channel activation norms s (W' = W·diag(s)), is peeled into
residual blocks: block_j = sign(R_j) ⊙ (rank-k approximation of |R_j|), R_{j+1} = R_j − block_j.
A block costs 1 bit per weight for the signs plus k·(out+in) float16 values, and each one shrinks
the layer's error. All blocks of all layers are put in one global order (every layer's first
`min_blocks` blocks first, then greedily by relative output-error reduction per byte) and stored
once. Loading under a memory limit takes the longest prefix of that order that fits:
`load_bitstack(DIR, max_memory_mb=M)` gives any size in the range in steps of one block.

    DIR/modelpress.json      format "modelpress-bitstack", config, order, per-block bytes, checksums
    DIR/weights.safetensors  dense tensors (float16), "<unit>::scale", "<unit>::<j>::signs|u|v"
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..calib.driver import calibrate
from ..data.windows import Windows
from ..errors import BudgetError, CheckpointError
from ..models.arch import Arch, get_weight, set_weight
from ..ops.base import output_error
from ..ops.lowrank.factor import truncated
from ..ops.packing import pack_mask, unpack_mask
from ..utils.io import atomic_dir, read_json, sha256_file, with_checksum
from .checkpoint import MANIFEST, WEIGHTS, empty_model, dense_tensors, storage_dtype_for, verify_files

log = logging.getLogger(__name__)

FORMAT = "modelpress-bitstack"


@dataclasses.dataclass
class BitStackConfig:
    max_blocks: int = 8
    rank: int = 4  # rank of each block's magnitude approximation
    min_blocks: int = 1  # blocks every layer gets before any layer gets more


def decompose(w: torch.Tensor, h: torch.Tensor, cfg: BitStackConfig):
    """Residual sign/low-rank blocks of one weight; returns (scale, blocks, errors after each block)."""
    s = torch.sqrt(torch.diagonal(h)).clamp_min(1e-6).to(torch.float16).float()
    r = w.float() * s
    acc = torch.zeros_like(r)
    blocks, errors = [], []
    for _ in range(cfg.max_blocks):
        b, a = truncated(r.abs(), cfg.rank)
        b16, a16 = b.to(torch.float16), a.to(torch.float16)
        sign = r >= 0
        mag = b16.float() @ a16.float()
        blk = torch.where(sign, mag, -mag)
        r = r - blk
        acc = acc + blk
        blocks.append((sign, b16, a16))
        errors.append(output_error(w, acc / s, h))
    return s.to(torch.float16), blocks, errors


def block_bytes(shape: tuple[int, int], rank: int) -> int:
    out_f, in_f = shape
    return -(-out_f * in_f // 8) + 2 * rank * (out_f + in_f)


@torch.no_grad()
def build_bitstack(model, tokenizer, windows: Windows, out_dir: str | Path, cfg: BitStackConfig | None = None,
                   batch_size: int = 8) -> dict:
    """Decompose every Linear of the decoder blocks and write the BitStack checkpoint."""
    cfg = cfg or BitStackConfig()
    tensors: dict[str, torch.Tensor] = {}
    units: dict[str, dict] = {}

    def per_layer(name, mod, st) -> None:
        w = get_weight(mod).float()
        scale, blocks, errors = decompose(w, st.hessian, cfg)
        tensors[f"{name}::scale"] = scale.cpu()
        for j, (sign, b, a) in enumerate(blocks):
            tensors[f"{name}::{j}::signs"] = pack_mask(sign.cpu())
            tensors[f"{name}::{j}::u"] = b.cpu().contiguous()
            tensors[f"{name}::{j}::v"] = a.cpu().contiguous()
        units[name] = {"shape": list(w.shape), "errors": errors, "block_bytes": block_bytes(tuple(w.shape), cfg.rank)}

    calibrate(model, windows.calib, per_layer, sequential=False, batch_size=batch_size, desc="bitstack")
    order = importance_order(units, cfg)
    dense, tied = dense_tensors(model, {u: None for u in units})  # type: ignore[arg-type]
    for name, t in dense.items():
        tensors[name] = t.detach().to("cpu", storage_dtype_for(t, torch.float16)).contiguous()
    fixed = sum(t.numel() * t.element_size() for k, t in tensors.items() if "::" not in k or k.endswith("::scale"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    manifest = {"format": FORMAT, "version": 1, "config": config, "bitstack": dataclasses.asdict(cfg),
                "units": {u: {"shape": v["shape"], "block_bytes": v["block_bytes"], "errors": v["errors"]}
                          for u, v in units.items()},
                "order": order, "fixed_bytes": fixed, "tied": tied,
                "total_params": sum(p.numel() for p in model.parameters())}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(with_checksum(manifest)) + "\n")
    return manifest


def importance_order(units: dict[str, dict], cfg: BitStackConfig) -> list[list]:
    """Every unit's first min_blocks blocks, then the block with the largest error drop per byte."""
    order: list[list] = []
    names = list(units)
    for j in range(min(cfg.min_blocks, cfg.max_blocks)):
        order += [[u, j] for u in names]
    heap = []
    for i, u in enumerate(names):
        j = cfg.min_blocks
        if j < cfg.max_blocks:
            e = units[u]["errors"]
            heapq.heappush(heap, (-(e[j - 1] - e[j]) / units[u]["block_bytes"], i, j))
    while heap:
        _, i, j = heapq.heappop(heap)
        u = names[i]
        order.append([u, j])
        if j + 1 < cfg.max_blocks:
            e = units[u]["errors"]
            heapq.heappush(heap, (-(e[j] - e[j + 1]) / units[u]["block_bytes"], i, j + 1))
    return order


def prefix_for(manifest: dict, max_memory_mb: float) -> int:
    """Number of blocks of the global order that fit in `max_memory_mb` (fixed tensors included)."""
    cfg = manifest["bitstack"]
    left = max_memory_mb * 1e6 - manifest["fixed_bytes"]
    n = 0
    for u, _ in manifest["order"]:
        left -= manifest["units"][u]["block_bytes"]
        if left < 0:
            break
        n += 1
    need = len(manifest["units"]) * cfg["min_blocks"]
    if n < need:
        lo = (manifest["fixed_bytes"] + sum(manifest["units"][u]["block_bytes"] for u, _ in manifest["order"][:need])) / 1e6
        raise BudgetError(f"{max_memory_mb:g} MB is below this BitStack's smallest model ({lo:.2f} MB)")
    return n


def size_range_mb(manifest: dict) -> tuple[float, float]:
    bb = [manifest["units"][u]["block_bytes"] for u, _ in manifest["order"]]
    need = len(manifest["units"]) * manifest["bitstack"]["min_blocks"]
    return (manifest["fixed_bytes"] + sum(bb[:need])) / 1e6, (manifest["fixed_bytes"] + sum(bb)) / 1e6


@torch.no_grad()
def load_bitstack(path: str | Path, max_memory_mb: float | None = None, *, device=None, verify: bool = True):
    """The model with the longest block prefix that fits `max_memory_mb` (None: everything).

    Returns (model, tokenizer, info) where info has the loaded size and block count."""
    path = Path(path)
    manifest = read_manifest_any(path, FORMAT)
    if verify:
        verify_files(path, manifest)
    n = len(manifest["order"]) if max_memory_mb is None else prefix_for(manifest, max_memory_mb)
    counts: dict[str, int] = {u: 0 for u in manifest["units"]}
    for u, _ in manifest["order"][:n]:
        counts[u] += 1
    model = empty_model(manifest["config"], torch.float32)
    linears = Arch(model).all_linears()
    with safe_open(str(path / WEIGHTS), "pt") as sf:
        dense = {k: sf.get_tensor(k) for k in sf.keys() if "::" not in k}
        for alias, target in manifest.get("tied", {}).items():
            dense[alias] = dense[target]
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in dense.items()}, strict=False)
        if unexpected or [m for m in missing if m[: -len(".weight")] not in manifest["units"]]:
            raise CheckpointError(f"BitStack checkpoint {path} does not match its config")
        for u, info in manifest["units"].items():
            shape = tuple(info["shape"])
            acc = torch.zeros(shape)
            for j in range(counts[u]):
                sign = unpack_mask(sf.get_tensor(f"{u}::{j}::signs"), shape)
                mag = sf.get_tensor(f"{u}::{j}::u").float() @ sf.get_tensor(f"{u}::{j}::v").float()
                acc += torch.where(sign, mag, -mag)
            set_weight(linears[u], acc / sf.get_tensor(f"{u}::scale").float())
    tok = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    loaded = manifest["fixed_bytes"] + sum(manifest["units"][u]["block_bytes"] for u, _ in manifest["order"][:n])
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok, {"blocks": n, "size_mb": loaded / 1e6, "of_blocks": len(manifest["order"]),
                        "avg_blocks_per_layer": n / len(manifest["units"])}


def read_manifest_any(path: Path, fmt: str) -> dict:
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path} is not a modelpress checkpoint (no {MANIFEST})")
    manifest = read_json(mf, "checkpoint manifest", "re-run the build that wrote it")
    if manifest.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {fmt} checkpoint")
    return manifest
