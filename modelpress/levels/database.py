"""The level database: every unit compressed at every level once, stored on disk.

    DB/db.json               kind and settings, model fingerprint, data, units, fixed bytes
    DB/units/<unit>.safetensors
                             one file per unit, memory-mappable; tensors "<level>::<suffix>",
                             metadata: per level its PackedWeight metadata, exact bytes and the
                             relative output error ‖(W−Ŵ)X‖²/‖WX‖², plus a digest of the tensors

Building is resumable: unit files are rewritten atomically as soon as a unit gets a level, and a
rerun skips what is there. A unit file that fails to parse or whose digest does not match is
treated as missing and rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..data.windows import Windows
from ..errors import CheckpointError, ConfigError
from ..allocate.budget import header_entry_bytes
from ..export.checkpoint import SEP, dense_tensors, storage_dtype_for
from ..models.streamed import stored, streamed
from ..ops.packed import PackedWeight, load_weight
from ..utils.device import forward_dtype_name, weights_dtype_name
from ..utils.dist import is_main, merged_dicts
from ..utils.io import atomic_file, cache_root, read_json, write_json
from .kinds import KINDS, Kind, UnitInfo

log = logging.getLogger(__name__)

FORMAT = "modelpress-leveldb"
VERSION = 2  # 2: compute_dtype and the fixed tensors' header bytes always present (see _migrate)
FINGERPRINT_CHUNK = 1 << 24
CACHE_BYTES = 256 << 20  # packed levels a database keeps in memory (a search re-reads the rest from its files)


def _held_bytes(pw) -> int:
    return sum(t.numel() * t.element_size() for t in vars(pw).values() if isinstance(t, torch.Tensor))


def model_fingerprint(model) -> str:
    """Config, names, shapes, the first bytes of every tensor and an exact checksum of all its bits.
    The checksum adds the float32 bit patterns as integers: unlike a float sum it does not depend on
    the order of additions, so the thread count or the device cannot change it. A streamed model's
    blocks are read from its files one tensor at a time: the same fingerprint as the model loaded."""
    stream = streamed(model)
    if stream is not None and stream.fingerprint is not None:  # its files do not change: read them once
        return stream.fingerprint
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        x = stored(model, name, t).detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(x[:1024].float().cpu().numpy().tobytes())
        total = 0
        for s in range(0, x.numel(), FINGERPRINT_CHUNK):  # in pieces: no float32 + int64 copy of a whole embedding
            total += int(x[s:s + FINGERPRINT_CHUNK].float().view(torch.int32).to(torch.int64).sum())
        h.update(str(total).encode())
    if stream is not None:
        stream.fingerprint = h.hexdigest()
    return h.hexdigest()


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def discover_units(model, kind: Kind) -> list[UnitInfo]:
    return kind.discover(model)


class LevelDB:
    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.kind: Kind = KINDS.get(meta["kind"]["name"]).from_settings(meta["kind"]["settings"])
        self.units: dict[str, UnitInfo] = {
            n: UnitInfo(n, tuple(u["shape"]) if u["shape"] else None, u["numel"], u["block"], u["group"], u.get("extra", {}))
            for n, u in meta["units"].items()}
        self._levels: dict[str, dict[str, dict]] = {}  # unit -> value -> level meta (from unit files)
        # packed levels read from the unit files, least recently used dropped beyond CACHE_BYTES
        self._cache: "OrderedDict[tuple[str, str], PackedWeight]" = OrderedDict()
        self._cached_bytes = 0

    # ---- creation / opening -------------------------------------------------------------
    @classmethod
    def default_path(cls, model, kind: Kind, windows: Windows) -> Path:
        parts = [model_fingerprint(model), kind.registered_name, kind.settings(), dataclasses.asdict(windows.config)]
        compute = forward_dtype_name(model)
        if compute != "float32":  # float32 databases keep the folders they had before
            parts.append(compute)
        if (held := weights_dtype_name(model)) != "float32":
            parts.append(f"held in {held}")
        key = json.dumps(parts, sort_keys=True, default=str)
        root = Path(os.environ["MODELPRESS_DB"]) if os.environ.get("MODELPRESS_DB") else cache_root() / "db"
        return root / f"{kind.registered_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    @classmethod
    def open_or_create(cls, path: str | Path | None, model, kind: Kind, windows: Windows, tokenizer=None) -> "LevelDB":
        path = Path(path) if path else cls.default_path(model, kind, windows)
        fp = model_fingerprint(model)
        mf = path / "db.json"
        kind.resolve(model)  # settings that depend on the model, before they are compared or stored
        if mf.is_file():
            meta = read_json(mf, "level database index", f"delete the folder {path} to rebuild it")
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a modelpress level database")
            if meta["fingerprint"] != fp:
                raise ConfigError(f"level database {path} was built for another model; use another --db folder")
            if meta["kind"]["name"] != kind.registered_name or meta["kind"]["settings"] != json.loads(json.dumps(kind.settings())):
                raise ConfigError(f"level database {path} was built with other settings "
                                  f"({meta['kind']}); use another --db folder")
            if meta["data"] != json.loads(json.dumps(dataclasses.asdict(windows.config))):
                raise ConfigError(f"level database {path} was built on other calibration data; use another --db folder")
            if _migrate(meta, model, kind, path):
                write_json(mf, meta, checksum=True)
            # levels built in another compute dtype differ in their last bits
            if meta["compute_dtype"] != (compute := forward_dtype_name(model)):
                raise ConfigError(f"level database {path} was built with compute dtype {meta['compute_dtype']}, not "
                                  f"{compute}; pass --compute-dtype {meta['compute_dtype']} or use another --db folder")
            # a model held in 16 bits computes in them without autocast: same weights, other statistics
            # (databases written before this was recorded do not say: taken as they are)
            if meta.get("weights_dtype", held := weights_dtype_name(model)) != held:
                raise ConfigError(f"level database {path} was built on the model held in {meta['weights_dtype']}, "
                                  f"this one is held in {held}; load it as it was then (e.g. the same --stream / dtype) "
                                  "or use another --db folder")
            return cls(path, meta)
        units = kind.discover(model)
        meta = {
            "format": FORMAT, "version": VERSION, "fingerprint": fp,
            "kind": {"name": kind.registered_name, "settings": json.loads(json.dumps(kind.settings()))},
            "data": json.loads(json.dumps(dataclasses.asdict(windows.config))),
            "compute_dtype": forward_dtype_name(model),
            "weights_dtype": weights_dtype_name(model),
            "fixed_bytes": kind.fixed_bytes(model, units, tokenizer),
            **(dict(zip(("fixed_header_bytes", "fixed_tensors"), _fixed_header_bytes(model, units)))
               if kind.tensors_per_unit else {}),
            "units": {u.name: {"shape": list(u.shape) if u.shape else None, "numel": u.numel, "block": u.block,
                               "group": u.group, "extra": u.extra} for u in units},
        }
        (path / "units").mkdir(parents=True, exist_ok=True)
        write_json(mf, meta, checksum=True)
        return cls(path, meta)

    def save_meta(self) -> None:
        """Write db.json. Under data-parallel workers every rank calls this at the same point: the
        per-unit data measured by each rank's share of the layers is merged, and rank 0 writes."""
        extra = merged_dicts({n: u["extra"] for n, u in self.meta["units"].items() if u.get("extra")})
        for n, e in extra.items():
            self.set_unit_extra(n, **e)
        if is_main():
            write_json(self.path / "db.json", self.meta, checksum=True)

    def refresh(self) -> None:
        """Forget what was read of the unit files (other workers wrote some of them)."""
        self._levels.clear()
        self._cache.clear()
        self._cached_bytes = 0

    # ---- unit files ---------------------------------------------------------------------
    def _file(self, unit: str) -> Path:
        return self.path / "units" / f"{_safe(unit)}.safetensors"

    def levels_of(self, unit: str) -> dict[str, dict]:
        """Level metadata present on disk for `unit` ({} if missing or corrupt)."""
        if unit in self._levels:
            return self._levels[unit]
        f = self._file(unit)
        levels: dict[str, dict] = {}
        if f.is_file():
            try:
                with safe_open(str(f), "pt") as sf:
                    md = sf.metadata() or {}
                    tensors = {k: sf.get_tensor(k) for k in sf.keys()}
                if md.get("digest") != _digest(tensors):
                    raise ValueError("digest mismatch")
                # older unit files have no digest of their levels' metadata (sizes, errors)
                if "levels_digest" in md and md["levels_digest"] != _text_digest(md["levels"]):
                    raise ValueError("levels metadata digest mismatch")
                levels = json.loads(md["levels"])
                for v, m in levels.items():  # levels stored before their header entries were counted
                    mine = {k.split(SEP, 1)[1]: t for k, t in tensors.items() if k.startswith(f"{v}{SEP}")}
                    m.setdefault("tensors", len(mine))
                    m.setdefault("header_bytes", _header_bytes(unit, mine))
            except Exception as e:  # corrupt or truncated: rebuild it
                log.warning("level database: %s is corrupt (%s); it will be rebuilt", f.name, e)
                f.unlink(missing_ok=True)
                levels = {}
        self._levels[unit] = levels
        return levels

    def add_levels(self, unit: str, new: dict[str, tuple[PackedWeight, float]]) -> None:
        """Store levels (value -> (packed weight, error)) of `unit`, keeping the ones already there.
        Data-parallel workers (utils.dist) share the layers out (calib.driver's `split`): one rank
        computes and writes each unit (two writers of one file would race: a reader of a file
        being replaced got a mix of both; apparently safetensors opens a file by name more than once)."""
        levels = dict(self.levels_of(unit))
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for value, (pw, err) in new.items():
            ts, meta = pw.to_tensors()
            packed[str(value)] = ts
            levels[str(value)] = {"meta": meta, "nbytes": pw.nbytes(), "error": float(err), "tensors": len(ts),
                                  "header_bytes": _header_bytes(unit, ts)}
        self._levels[unit] = levels
        tensors: dict[str, torch.Tensor] = {}
        f = self._file(unit)
        if f.is_file():
            with safe_open(str(f), "pt") as sf:
                tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        for value, ts in packed.items():
            for k in [k for k in tensors if k.startswith(f"{value}::")]:
                del tensors[k]
            for suffix, t in ts.items():
                tensors[f"{value}::{suffix}"] = t.contiguous()
        seen: set[int] = set()
        for k, t in tensors.items():  # levels sharing a base (with / without EoRA) share storage
            if t.numel() and t.data_ptr() in seen:
                tensors[k] = t.clone()
            seen.add(tensors[k].data_ptr())
        text = json.dumps(levels)
        md = {"levels": text, "digest": _digest(tensors), "levels_digest": _text_digest(text)}
        with atomic_file(f, "wb") as fh:
            fh.write(_serialize(tensors, md))

    def load(self, unit: str, value, device="cpu") -> PackedWeight:
        key = (unit, str(value))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].to(device)
        meta = self.levels_of(unit).get(str(value))
        if meta is None:
            raise ConfigError(f"level {value!r} of {unit} is not in the database {self.path}")
        with safe_open(str(self._file(unit)), "pt") as sf:
            ts = {k.split("::", 1)[1]: sf.get_tensor(k) for k in sf.keys() if k.startswith(f"{value}::")}
        pw = load_weight(ts, meta["meta"])
        self._cache[key] = pw
        self._cached_bytes += _held_bytes(pw)
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._cached_bytes -= _held_bytes(self._cache.popitem(last=False)[1])
        return pw.to(device)

    def values(self, unit: str) -> list:
        """Usable levels of `unit`, cheapest first."""
        return self.kind.usable(self, unit)

    def missing(self) -> dict[str, list]:
        """unit -> level values not yet built."""
        return self.kind.missing(self)

    def level_meta(self, unit: str, value) -> dict:
        return self.kind.level_meta(self, unit, value)

    def set_unit_extra(self, unit: str, **values) -> None:
        """Per-unit data a build measures (kept in db.json; call save_meta to write it)."""
        self.meta["units"][unit]["extra"].update(values)
        self.units[unit].extra.update(values)

    # ---- building -----------------------------------------------------------------------
    def build(self, model, windows: Windows, *, batch_size: int = 8, device=None) -> None:
        """Fill every missing (unit, level). Resumable; a no-op when complete."""
        if self.missing():
            self.kind.build(self, model, windows, batch_size, device)


def _migrate(meta: dict, model, kind: Kind, path: Path) -> bool:
    """Bring the db.json of an older database up to VERSION in place (True if it changed).
    Version 1 databases may lack the compute dtype (they were float32) and, for kinds that store
    tensors, the checkpoint-header bytes of the fixed tensors."""
    version = meta.get("version", 1)
    if version > VERSION:
        raise CheckpointError(f"level database {path} was written by a newer modelpress (format version "
                              f"{version}, this one reads up to {VERSION}); upgrade modelpress or use another --db")
    if version == VERSION:
        return False
    meta.setdefault("compute_dtype", "float32")
    if kind.tensors_per_unit and "fixed_header_bytes" not in meta:
        meta["fixed_header_bytes"], meta["fixed_tensors"] = _fixed_header_bytes(model, kind.discover(model))
    meta["version"] = VERSION
    return True


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return save(tensors, metadata=metadata)


def _fixed_tensors(model, units: list[UnitInfo], depth: bool = False) -> dict[str, torch.Tensor]:
    """Tensors every plan stores whatever its levels: those outside the units (for depth, outside
    the sub-blocks)."""
    dense, _ = dense_tensors(model, {})
    unit_weights = {f"{u.name}.weight" for u in units}
    prefixes = tuple(u.name + "." for u in units)
    return {n: t for n, t in dense.items()
            if not ((depth and n.startswith(prefixes)) or (not depth and n in unit_weights))}


def fixed_bytes(model, units: list[UnitInfo], depth: bool = False) -> int:
    """Bytes of the fixed tensors as stored (float16)."""
    return sum(t.numel() * torch.empty(0, dtype=storage_dtype_for(stored(model, n, t), torch.float16)).element_size()
               for n, t in _fixed_tensors(model, units, depth).items())


def _header_bytes(unit: str, tensors: dict[str, torch.Tensor]) -> int:
    """Upper bound on the checkpoint header entries of one level's packed tensors (suffix -> tensor)."""
    return sum(header_entry_bytes(f"{unit}{SEP}{k}", tuple(t.shape)) for k, t in tensors.items())


def _fixed_header_bytes(model, units: list[UnitInfo]) -> tuple[int, int]:
    """An upper bound on the checkpoint header bytes of the fixed tensors (see
    allocate.budget.header_entry_bytes) plus the file's metadata entry, length prefix and padding;
    and the number of those tensors."""
    fixed = _fixed_tensors(model, units)
    return 128 + sum(header_entry_bytes(n, tuple(t.shape)) for n, t in fixed.items()), len(fixed)
