"""Read single tensors from a model folder's safetensors files, one at a time, with plain reads.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw data. Reading a tensor with `readinto` into a fresh buffer keeps the
process's resident memory to the tensors it holds: a memory map (what `safe_open` uses) would leave
every page it touched counted in the resident size until the file is closed, so streaming a model
larger than memory through one open map would look — and, under a memory limit, act — as if the
whole model were loaded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import ModelLoadError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"


def read_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsSource:
    """Every tensor of a Hugging Face model folder (one `model.safetensors` or the shards named by
    `model.safetensors.index.json`), by name, read from disk on request."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} holds no safetensors weights; streaming reads .safetensors files "
                                 "(convert .bin checkpoints with transformers' save_pretrained)")
        self.folder = folder
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = folder / name
            header, start = read_header(path)
            for key, meta in header.items():
                self.entries[key] = (path, start, meta)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def float_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the weights' bytes (what the model was saved in)."""
        by: dict[str, int] = {}
        for _, _, m in self.entries.values():
            if m["dtype"] in ("F64", "F32", "F16", "BF16"):
                by[m["dtype"]] = by.get(m["dtype"], 0) + m["data_offsets"][1] - m["data_offsets"][0]
        return DTYPES[max(by, key=by.get)] if by else torch.float32

    def nbytes(self) -> int:
        return sum(m["data_offsets"][1] - m["data_offsets"][0] for _, _, m in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        try:
            path, start, meta = self.entries[name]
        except KeyError:
            raise ModelLoadError(f"{self.folder}: no tensor {name!r} in its safetensors files") from None
        if meta["dtype"] not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {meta['dtype']}, which modelpress cannot stream")
        a, b = meta["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + a)
            if f.readinto(buf.numpy()) != b - a:
                raise ModelLoadError(f"{path} is truncated (tensor {name}); re-download or re-save the model")
        dtype = DTYPES[meta["dtype"]]
        return buf.view(dtype).reshape(meta["shape"]) if b > a else torch.empty(meta["shape"], dtype=dtype)
