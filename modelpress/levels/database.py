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
from collections import OrderedDict
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..calib.runner import LayerwiseRunner
from ..calib.stats import LinearStats
from ..data.windows import Windows
from ..errors import CheckpointError, ConfigError
from ..allocate.budget import header_entry_bytes
from ..export.checkpoint import SEP, dense_tensors, storage_dtype_for
from ..models.arch import Arch, get_weight, set_weight
from ..ops.base import output_error
from ..ops.packed import PackedWeight, load_weight
from ..utils.device import forward_dtype_name
from ..utils.io import atomic_file, cache_root, write_json
from .kinds import KINDS, DepthKind, GGUFKind, JointKind, Kind, LowRankKind, QuantKind, SparsityKind, UnitInfo

log = logging.getLogger(__name__)

FORMAT = "modelpress-leveldb"
VERSION = 1


def model_fingerprint(model) -> str:
    """Config, names, shapes, the first bytes of every tensor and an exact checksum of all its bits.
    The checksum adds the float32 bit patterns as integers: unlike a float sum it does not depend on
    the order of additions, so the thread count or the device cannot change it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        x = t.detach().float().contiguous()
        h.update(f"{name}{tuple(x.shape)}".encode())
        h.update(x.reshape(-1)[:1024].cpu().numpy().tobytes())
        h.update(str(int(x.view(torch.int32).to(torch.int64).sum())).encode())
    return h.hexdigest()


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def discover_units(model, kind: Kind) -> list[UnitInfo]:
    arch = Arch(model)
    if isinstance(kind, DepthKind):
        out = []
        for sb in arch.subblocks():
            mod = getattr(arch.blocks[sb.block], sb.attr)
            out.append(UnitInfo(sb.name, None, sum(p.numel() for p in mod.parameters()), sb.block, sb.kind))
        return out
    out = []
    if isinstance(kind, GGUFKind) and kind.embedding:
        from ..export.ggufio import embedding_name

        emb = model.get_input_embeddings()
        out.append(UnitInfo(embedding_name(model), tuple(emb.weight.shape), emb.weight.numel(), 0, "embedding"))
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:  # an untied lm_head is stored as output.weight
            name = next(n for n, m in model.named_modules() if m is head)
            out.append(UnitInfo(name, tuple(head.weight.shape), head.weight.numel(), len(arch) - 1, "output"))
    for name, mod in arch.all_linears().items():
        w = get_weight(mod)
        extra = {}
        if isinstance(kind, GGUFKind):
            from ..export.ggufio import unit_heads

            extra["heads"] = unit_heads(name, model)
        out.append(UnitInfo(name, tuple(w.shape), w.numel(), arch.block_of(name), name.rsplit(".", 1)[-1], extra))
    return out


class LevelDB:
    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.kind: Kind = KINDS.get(meta["kind"]["name"]).from_settings(meta["kind"]["settings"])
        self.units: dict[str, UnitInfo] = {
            n: UnitInfo(n, tuple(u["shape"]) if u["shape"] else None, u["numel"], u["block"], u["group"], u.get("extra", {}))
            for n, u in meta["units"].items()}
        self._levels: dict[str, dict[str, dict]] = {}  # unit -> value -> level meta (from unit files)
        self._cache: dict[tuple[str, str], PackedWeight] = {}

    # ---- creation / opening -------------------------------------------------------------
    @classmethod
    def default_path(cls, model, kind: Kind, windows: Windows) -> Path:
        parts = [model_fingerprint(model), kind.registered_name, kind.settings(), dataclasses.asdict(windows.config)]
        compute = forward_dtype_name(model)
        if compute != "float32":  # float32 databases keep the folders they had before
            parts.append(compute)
        key = json.dumps(parts, sort_keys=True, default=str)
        root = Path(os.environ["MODELPRESS_DB"]) if os.environ.get("MODELPRESS_DB") else cache_root() / "db"
        return root / f"{kind.registered_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    @classmethod
    def open_or_create(cls, path: str | Path | None, model, kind: Kind, windows: Windows, tokenizer=None) -> "LevelDB":
        path = Path(path) if path else cls.default_path(model, kind, windows)
        fp = model_fingerprint(model)
        mf = path / "db.json"
        if mf.is_file():
            try:
                meta = json.loads(mf.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"level database {path} has a corrupt db.json; delete the folder to rebuild") from None
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a modelpress level database")
            if meta["fingerprint"] != fp:
                raise ConfigError(f"level database {path} was built for another model; use another --db folder")
            if isinstance(kind, SparsityKind) and kind.step is None:  # the stored settings hold the resolved step
                kind.resolve_step(discover_units(model, kind))
            if meta["kind"]["name"] != kind.registered_name or meta["kind"]["settings"] != json.loads(json.dumps(kind.settings())):
                raise ConfigError(f"level database {path} was built with other settings "
                                  f"({meta['kind']}); use another --db folder")
            if meta["data"] != json.loads(json.dumps(dataclasses.asdict(windows.config))):
                raise ConfigError(f"level database {path} was built on other calibration data; use another --db folder")
            # levels built in another compute dtype differ in their last bits; databases from
            # before the setting were float32
            built = meta.get("compute_dtype", "float32")
            if built != (compute := forward_dtype_name(model)):
                raise ConfigError(f"level database {path} was built with compute dtype {built}, not "
                                  f"{compute}; pass --compute-dtype {built} or use another --db folder")
            if kind.tensors_per_unit and "fixed_header_bytes" not in meta:  # a database from before it was counted
                meta["fixed_header_bytes"], meta["fixed_tensors"] = _fixed_header_bytes(model, discover_units(model, kind))
                write_json(mf, meta)
            return cls(path, meta)
        units = discover_units(model, kind)
        if isinstance(kind, SparsityKind):
            kind.resolve_step(units)
        if isinstance(kind, GGUFKind):
            from ..export.ggufio import check_architecture, gguf_fixed_bytes

            check_architecture(model)
            fixed = gguf_fixed_bytes(model, {u.name: u.shape for u in units}, tokenizer)
        else:
            fixed = _fixed_bytes(model, units, isinstance(kind, DepthKind))
        meta = {
            "format": FORMAT, "version": VERSION, "fingerprint": fp,
            "kind": {"name": kind.registered_name, "settings": json.loads(json.dumps(kind.settings()))},
            "data": json.loads(json.dumps(dataclasses.asdict(windows.config))),
            "compute_dtype": forward_dtype_name(model),
            "fixed_bytes": fixed,
            **(dict(zip(("fixed_header_bytes", "fixed_tensors"), _fixed_header_bytes(model, units)))
               if kind.tensors_per_unit else {}),
            "units": {u.name: {"shape": list(u.shape) if u.shape else None, "numel": u.numel, "block": u.block,
                               "group": u.group, "extra": u.extra} for u in units},
        }
        (path / "units").mkdir(parents=True, exist_ok=True)
        write_json(mf, meta)
        return cls(path, meta)

    def save_meta(self) -> None:
        write_json(self.path / "db.json", self.meta)

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
        """Store levels (value -> (packed weight, error)) of `unit`, keeping the ones already there."""
        levels = dict(self.levels_of(unit))
        tensors: dict[str, torch.Tensor] = {}
        f = self._file(unit)
        if f.is_file():
            with safe_open(str(f), "pt") as sf:
                tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        for value, (pw, err) in new.items():
            ts, meta = pw.to_tensors()
            for k in [k for k in tensors if k.startswith(f"{value}::")]:
                del tensors[k]
            for suffix, t in ts.items():
                tensors[f"{value}::{suffix}"] = t.contiguous()
            levels[str(value)] = {"meta": meta, "nbytes": pw.nbytes(), "error": float(err), "tensors": len(ts),
                                  "header_bytes": _header_bytes(unit, ts)}
        seen: set[int] = set()
        for k, t in tensors.items():  # levels sharing a base (with / without EoRA) share storage
            if t.numel() and t.data_ptr() in seen:
                tensors[k] = t.clone()
            seen.add(tensors[k].data_ptr())
        md = {"levels": json.dumps(levels), "digest": _digest(tensors)}
        with atomic_file(f, "wb") as fh:
            fh.write(_serialize(tensors, md))
        self._levels[unit] = levels

    def load(self, unit: str, value, device="cpu") -> PackedWeight:
        key = (unit, str(value))
        if key not in self._cache:
            meta = self.levels_of(unit).get(str(value))
            if meta is None:
                raise ConfigError(f"level {value!r} of {unit} is not in the database {self.path}")
            with safe_open(str(self._file(unit)), "pt") as sf:
                ts = {k.split("::", 1)[1]: sf.get_tensor(k) for k in sf.keys() if k.startswith(f"{value}::")}
            self._cache[key] = load_weight(ts, meta["meta"])
        return self._cache[key].to(device)

    def values(self, unit: str) -> list:
        """Usable levels of `unit`, cheapest first."""
        if isinstance(self.kind, DepthKind):
            return self.kind.values(self.units[unit])
        return self.kind.order(self.units[unit], self.levels_of(unit))

    def missing(self) -> dict[str, list]:
        """unit -> level values not yet built."""
        if isinstance(self.kind, DepthKind):
            return {} if all("influence" in u.extra for u in self.units.values()) else {u: ["dropped"] for u in self.units}
        out = {}
        for u in self.units:
            have = self.levels_of(u)
            miss = [v for v in self.kind.values(self.units[u]) if str(v) not in have]
            if miss:
                out[u] = miss
        return out

    def level_meta(self, unit: str, value) -> dict:
        if isinstance(self.kind, DepthKind):
            info = self.units[unit]
            kept = value == "kept"
            return {"nbytes": 2 * info.numel if kept else 0, "error": 0.0 if kept else info.extra["influence"]}
        return self.levels_of(unit)[str(value)]

    # ---- building -----------------------------------------------------------------------
    def build(self, model, windows: Windows, *, batch_size: int = 8, device=None) -> None:
        """Fill every missing (unit, level). Resumable; a no-op when complete."""
        if not self.missing():
            return
        builder = getattr(self, f"_build_{self.kind.registered_name}", None)
        if builder is None:  # pragma: no cover
            raise ConfigError(f"no builder for kind {self.kind.registered_name}")
        builder(model, windows, batch_size, device)

    def _build_quant(self, model, windows, batch_size, device) -> None:
        kind: QuantKind = self.kind  # type: ignore[assignment]
        if kind.sequential_level is not None:
            def levels(n, w, st: LinearStats, want) -> dict:
                out = {}
                for bits in want:
                    pw = kind.operator(bits).compress(w, st)
                    out[bits] = (pw, output_error(w, pw.dequantize(), st.hessian))
                return out

            self._build_on_shared_inputs(model, windows, batch_size, device, kind.sequential_level, levels,
                                         f"database (levels on {kind.sequential_level}-bit inputs)")
            return
        arch = Arch(model)
        linears = arch.all_linears()
        dense = {n: get_weight(m).detach().clone() for n, m in linears.items() if n in self.units}
        try:
            for bits in kind.levels:
                todo = {u for u, miss in self.missing().items() if bits in miss}
                if not todo:
                    continue
                start = min(self.units[u].block for u in todo)
                log.info("level database: GPTQ %d-bit pass from block %d", bits, start)
                # blocks before `start` already have this level: put it in so their outputs are right
                for n in dense:
                    if self.units[n].block < start:
                        set_weight(linears[n], self.load(n, bits).dequantize())
                op = kind.operator(bits)
                runner = LayerwiseRunner(model, windows.calib, batch_size=batch_size, sequential=kind.sequential,
                                         device=device)
                for step in runner.blocks(desc=f"database {bits}-bit", start=start):
                    names = [n for n in step.linears if n in self.units]

                    def do(n, st: LinearStats | None, step=step):
                        w = get_weight(step.linears[n]).float()
                        pw = op.compress(w, st)
                        w_hat = pw.dequantize()
                        err = output_error(w, w_hat, st.hessian)
                        set_weight(step.linears[n], w_hat)
                        if n in todo:
                            self.add_levels(n, {bits: (pw, err)})

                    if kind.sequential:
                        step.compress_streaming("xtx", do, names=names)
                    else:
                        stats = step.collect("xtx", names=names)
                        for n in names:
                            do(n, stats[n])
                        step.advance(sequential=False)
                for n, w in dense.items():
                    set_weight(linears[n], w)
        finally:
            for n, w in dense.items():
                set_weight(linears[n], w)

    def _blocks_on_dense_inputs(self, model, windows, batch_size, device, desc: str, missing: dict):
        """Block by block: (step, the block's missing layers, their XᵀX statistics on the dense
        model's inputs); the next block's inputs are this block's dense outputs."""
        runner = LayerwiseRunner(model, windows.calib, batch_size=batch_size, sequential=False, device=device)
        for step in runner.blocks(desc=desc):
            names = [n for n in step.linears if n in missing]
            if names:
                yield step, names, step.collect("xtx", names=names)
            step.advance(sequential=False)

    def _build_sparsity(self, model, windows, batch_size, device) -> None:
        kind: SparsityKind = self.kind  # type: ignore[assignment]
        missing = self.missing()
        for step, names, stats in self._blocks_on_dense_inputs(model, windows, batch_size, device,
                                                               "database sparsity", missing):
            for n in names:
                w = get_weight(step.linears[n]).float()
                st = stats[n]
                new = {}
                for v in missing[n]:
                    pw = kind.operator(int(v)).compress(w, st)
                    new[v] = (pw, output_error(w, pw.dequantize(), st.hessian))
                score = w.abs() * st.col_norms.unsqueeze(0)
                ratio = float((score > kind.outlier_m * score.mean()).float().mean())
                self.meta["units"][n]["extra"]["outlier_ratio"] = ratio
                self.units[n].extra["outlier_ratio"] = ratio
                self.add_levels(n, new)
            self.save_meta()

    def _build_on_shared_inputs(self, model, windows, batch_size, device, ref, levels_of_layer, desc: str) -> None:
        """Every missing level of a layer from one set of input statistics: the dense model's (`ref` None),
        or, in one true-sequential pass, those the layer sees when the layers before it hold level `ref`.
        `levels_of_layer(name, weight, stats, wanted values)` returns {value: (packed weight, error)}."""
        missing = self.missing()
        linears = Arch(model).all_linears()
        dense = {n: get_weight(linears[n]).detach().clone() for n in self.units} if ref is not None else {}
        start = min(self.units[u].block for u in missing) if ref is not None else 0
        for n in dense:  # resuming a sequential build: earlier blocks hold the reference level
            if self.units[n].block < start:
                set_weight(linears[n], self.load(n, ref).dequantize())

        def one(n, lin, st: LinearStats) -> None:
            if n not in missing:  # built before an interruption: only its reference level goes in
                if ref is not None:
                    set_weight(lin, self.load(n, ref).dequantize())
                return
            want = list(missing[n]) + ([ref] if ref is not None and ref not in missing[n] else [])
            new = levels_of_layer(n, get_weight(lin).float(), st, want)
            self.add_levels(n, {v: new[v] for v in missing[n]})
            if ref is not None:
                set_weight(lin, new[ref][0].dequantize())

        log.info("level database: every level from %s inputs%s", "dense" if ref is None else f"level {ref}'s",
                 f", from block {start}" if start else "")
        try:
            if ref is None:
                for step, names, stats in self._blocks_on_dense_inputs(model, windows, batch_size, device, desc,
                                                                       missing):
                    for n in names:
                        one(n, step.linears[n], stats[n])
                return
            runner = LayerwiseRunner(model, windows.calib, batch_size=batch_size, sequential=True, device=device)
            for step in runner.blocks(desc=desc, start=start):
                names = [n for n in step.linears if n in self.units]
                step.compress_streaming("xtx", lambda n, st, step=step: one(n, step.linears[n], st), names=names)
        finally:
            for n, w in dense.items():
                set_weight(linears[n], w)

    def _build_joint(self, model, windows, batch_size, device) -> None:
        from ..ops import COMPENSATORS, OPERATORS
        from ..ops.lowrank.factor import eigen_root

        kind: JointKind = self.kind  # type: ignore[assignment]

        def levels(n, w, st: LinearStats, want) -> dict:
            h = st.hessian
            roots = eigen_root(h, kind.damp) if any(kind.ranks) else None
            new = {}
            if "drop" in want:
                new["drop"] = (PackedWeight(shape=tuple(w.shape)), 1.0)
            for b in kind.bits:
                for sp in kind.sparsity:
                    names_here = [kind.name(b, sp, r) for r in kind.ranks]
                    if not set(want).intersection(names_here):
                        continue
                    op = (OPERATORS.build("gptq", bits=b, group_size=kind.group_size, damp=kind.damp, mse=kind.mse,
                                                    shrink=0.0)
                          if not sp else
                          OPERATORS.build("sparsegpt", sparsity=sp, bits=b, group_size=kind.group_size, damp=kind.damp))
                    base = op.compress(w, st)
                    for r, v in zip(kind.ranks, names_here):
                        pw = base if r == 0 else COMPENSATORS.build("eora", rank=r, damp=kind.damp).apply(
                            w, base, st, roots=roots)
                        new[v] = (pw, output_error(w, pw.dequantize(), h))
            return new

        self._build_on_shared_inputs(model, windows, batch_size, device, kind.sequential_level, levels,
                                     "database joint")

    def _build_lowrank(self, model, windows, batch_size, device) -> None:
        from ..ops.lowrank.factor import activation_aware_ranks

        kind: LowRankKind = self.kind  # type: ignore[assignment]
        missing = self.missing()
        for step, names, stats in self._blocks_on_dense_inputs(model, windows, batch_size, device,
                                                               "database lowrank", missing):
            for n in names:
                w = get_weight(step.linears[n]).float()
                h = stats[n].hessian
                factors = activation_aware_ranks(w, h, [int(v[1:]) for v in missing[n] if v != "dense"], kind.damp)
                new = {}
                for v in missing[n]:
                    if v == "dense":
                        pw = PackedWeight(shape=tuple(w.shape), values=w.to(torch.float16).reshape(-1))
                    else:
                        b, a = factors[int(v[1:])]
                        pw = PackedWeight(shape=tuple(w.shape), lr_b=b.to(torch.float16), lr_a=a.to(torch.float16))
                    new[v] = (pw, output_error(w, pw.dequantize(), h))
                self.add_levels(n, new)

    def _build_gguf(self, model, windows, batch_size, device) -> None:
        from ..ops.ggmlweight import GGMLWeight

        missing = self.missing()
        mods = dict(model.named_modules())
        for u in [u for u in missing if self.units[u].group in ("embedding", "output")]:
            w = get_weight(mods[u]).float()
            new = {}
            for t in missing[u]:
                gw = GGMLWeight.quantize(w, t)
                new[t] = (gw, float(((gw.dequantize() - w) ** 2).sum() / (w ** 2).sum()))
            self.add_levels(u, new)
        for step, names, stats in self._blocks_on_dense_inputs(model, windows, batch_size, device,
                                                               "database gguf", missing):
            for n in names:
                w = get_weight(step.linears[n]).float()
                new = {}
                for t in missing[n]:
                    gw = GGMLWeight.quantize(w, t, heads=self.units[n].extra.get("heads"))
                    new[t] = (gw, output_error(w, gw.dequantize().to(w.device), stats[n].hessian))
                self.add_levels(n, new)

    def _build_depth(self, model, windows, batch_size, device=None) -> None:
        from ..ops.drop.influence import subblock_influence

        scores = subblock_influence(model, windows.calib, batch_size=batch_size)
        for n in self.units:
            self.meta["units"][n]["extra"]["influence"] = scores[n]
            self.units[n].extra["influence"] = scores[n]
        self.save_meta()


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


def _fixed_bytes(model, units: list[UnitInfo], depth: bool) -> int:
    """Bytes of the fixed tensors as stored (float16)."""
    return sum(t.numel() * torch.empty(0, dtype=storage_dtype_for(t, torch.float16)).element_size()
               for t in _fixed_tensors(model, units, depth).values())


def _header_bytes(unit: str, tensors: dict[str, torch.Tensor]) -> int:
    """Upper bound on the checkpoint header entries of one level's packed tensors (suffix -> tensor)."""
    return sum(header_entry_bytes(f"{unit}{SEP}{k}", tuple(t.shape)) for k, t in tensors.items())


def _fixed_header_bytes(model, units: list[UnitInfo]) -> tuple[int, int]:
    """An upper bound on the checkpoint header bytes of the fixed tensors (see
    allocate.budget.header_entry_bytes) plus the file's metadata entry, length prefix and padding;
    and the number of those tensors."""
    fixed = _fixed_tensors(model, units)
    return 128 + sum(header_entry_bytes(n, tuple(t.shape)) for n, t in fixed.items()), len(fixed)


class PlanState:
    """Applies level choices to a model from a database, incrementally and reversibly.

    Keeps the dense weights (or the original sub-block modules) so any unit can go back; caches
    dequantized levels so switching during a search costs a copy, not a decode.
    """

    def __init__(self, model, db: LevelDB, cache: bool = True, cache_bytes: int = 2 << 30):
        """The model must be dense (no plan applied) when the state is made. At most one PlanState
        should drive a model at a time: each assumes it knows what the model holds."""
        self.model = model
        self.db = db
        self.arch = Arch(model)
        self.current: dict[str, object] = {u: None for u in db.units}  # None = dense / original
        self.cache = cache
        self.cache_bytes = cache_bytes
        self._deq: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()
        self._deq_bytes = 0
        if isinstance(db.kind, DepthKind):
            self._orig = {sb.name: getattr(self.arch.blocks[sb.block], sb.attr) for sb in self.arch.subblocks()
                          if sb.name in db.units}
        else:
            mods = dict(model.named_modules())
            self._mods = {u: mods[u] for u in db.units}
            self._dense = {u: get_weight(m).detach().clone() for u, m in self._mods.items()}

    def _weight(self, unit: str, value) -> torch.Tensor:
        key = (unit, str(value))
        if key in self._deq:
            self._deq.move_to_end(key)
            return self._deq[key]
        w = self.db.load(unit, value).dequantize()
        if self.cache:  # least recently used levels are dropped beyond cache_bytes
            self._deq[key] = w
            self._deq_bytes += w.numel() * w.element_size()
            while self._deq_bytes > self.cache_bytes and len(self._deq) > 1:
                _, old = self._deq.popitem(last=False)
                self._deq_bytes -= old.numel() * old.element_size()
        return w

    def set(self, unit: str, value) -> None:
        if self.current[unit] == value:
            return
        if isinstance(self.db.kind, DepthKind):
            from ..models.arch import Dropped

            info = self.db.units[unit]
            blk = self.arch.blocks[info.block]
            attr = unit.rsplit(".", 1)[1]
            orig = self._orig[unit]
            if value == "dropped":
                setattr(blk, attr, Dropped(info.group, getattr(orig, "layer_idx", info.block if info.group == "attn" else None)))
            else:
                setattr(blk, attr, orig)
        else:
            set_weight(self._mods[unit], self._dense[unit] if value is None else self._weight(unit, value))
        self.current[unit] = value

    def apply(self, values: dict[str, object]) -> None:
        for u, v in values.items():
            self.set(u, v)

    def restore(self) -> None:
        for u in list(self.current):
            self.set(u, "kept" if isinstance(self.db.kind, DepthKind) else None)
