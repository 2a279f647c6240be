"""The packed modelpress checkpoint.

    DIR/modelpress.json      manifest: format version, model config, every unit's format and
                             metadata, dropped sub-blocks, the plan, sha256 of every data file
    DIR/weights.safetensors  packed tensors (codes, scales, zeros, masks, values, factors) and the
                             uncompressed tensors (embeddings, norms, biases) in float16; a large
                             model's in shards weights-00001.safetensors ... (`weight_files`)
    DIR/tokenizer*           the tokenizer

The directory is written to a temporary sibling and renamed into place; loading verifies the
checksums, so a truncated or modified checkpoint is reported instead of silently mis-loaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..models.arch import drop_subblock, replace_module, set_weight
from ..models.moe import unfuse_experts
from ..ops.packed import PackedWeight, load_weight
from ..utils.io import atomic_dir, dir_size, read_json, recover_interrupted, sha256_file, with_checksum
from ..utils.memory import release_freed_memory

log = logging.getLogger(__name__)

FORMAT = "modelpress-checkpoint"
VERSION = 1
MANIFEST = "modelpress.json"
WEIGHTS = "weights.safetensors"
SEP = "::"  # unit name / packed tensor suffix


def storage_dtype_for(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """float16 unless the tensor does not fit in it (then it keeps its own float dtype)."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t.dtype
    return dtype if torch.isfinite(t.to(dtype)).all() else t.dtype


def dense_tensors(model, units: dict[str, PackedWeight], prefix: str = "",
                  skip: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters and persistent buffers not covered by a packed unit, deduplicated by storage.

    Returns (name -> tensor, alias -> stored name) for tied weights (e.g. lm_head = embeddings).
    `model` may be one block of a model, whose tensors are named under `prefix`; names starting
    with `skip` are left out (a streamed model's blocks, written already).
    """
    full = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    covered = set()
    mods = {full(n) if n else prefix: m for n, m in model.named_modules()}
    for name in units:  # (values may be None: only which weights are stored elsewhere matters)
        covered.add(f"{name}.weight")
        if name not in mods or not hasattr(mods[name], "weight"):
            raise CheckpointError(f"packed unit {name} is not a weight layer of this model")
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    sd = {full(n): t for n, t in model.state_dict(keep_vars=False).items()
          if skip is None or not full(n).startswith(skip)}
    def storage(name: str, t: torch.Tensor) -> tuple:  # a meta tensor (a streamed block on disk) has none to share
        return ("meta", name) if t.is_meta else (t.data_ptr(), tuple(t.shape), t.dtype)

    for name, t in sd.items():  # a packed weight can be tied too (embedding = lm_head)
        if name in covered:
            seen.setdefault(storage(name, t), name)
    for name, t in sd.items():
        if name in covered:
            continue
        key = storage(name, t)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, tied


@torch.no_grad()
def round_to_storage(model, units: dict[str, PackedWeight], dtype: torch.dtype = torch.float16,
                     prefix: str = "", skip: str | None = None) -> None:
    """Round the uncompressed tensors in memory the way they will be stored, so the in-memory
    model and the reloaded checkpoint compute exactly the same function."""
    dense, _ = dense_tensors(model, units, prefix, skip)
    for t in dense.values():
        sd = storage_dtype_for(t, dtype)
        if sd != t.dtype:
            t.copy_(t.to(sd).to(t.dtype))


SHARD_BYTES = 2 << 30  # a checkpoint's weights go to files of about this size


def write_streamed_block(writer: "CheckpointWriter | None", model, i: int, units: dict[str, PackedWeight]) -> None:
    """Block i of a streamed model (in memory now) with its packed `units` into `writer` (None: a
    data-parallel rank that does not write); its other tensors rounded as they are stored."""
    from ..models.arch import Arch

    arch = Arch(model)
    name = arch.block_name(i)
    round_to_storage(arch.blocks[i], units, prefix=name)
    if writer is not None:
        dense, tied = dense_tensors(arch.blocks[i], units, prefix=name)
        writer.add(dense, units, tied)


def finish_streamed(writer: "CheckpointWriter | None", model, units: dict[str, PackedWeight], **finish) -> None:
    """After every block: the tensors outside the blocks (and `units` among them), then the manifest
    (`finish` goes to CheckpointWriter.finish)."""
    from ..models.arch import Arch

    skip = Arch(model).blocks_name + "."
    round_to_storage(model, units, skip=skip)
    if writer is not None:
        dense, tied = dense_tensors(model, units, skip=skip)
        writer.add(dense, units, tied)
        writer.finish(model, **finish)


class CheckpointWriter:
    """Writes a checkpoint piece by piece, for models that are never whole in memory: tensors are
    added as they are ready and go to disk in shards of about `shard_bytes` (one file,
    weights.safetensors, when they fit in one); `finish` writes the manifest and renames the
    folder into place. Used as a context manager: an error on the way leaves nothing behind.

        with CheckpointWriter(out) as w:
            w.add(block_tensors, block_units)   # any number of times
            w.finish(model, tokenizer=tok, plan=plan)
    """

    def __init__(self, out_dir: str | Path, *, shard_bytes: int = SHARD_BYTES, dtype: torch.dtype = torch.float16):
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self.dtype = dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.unit_meta: dict[str, dict] = {}
        self.tied: dict[str, str] = {}
        self._atomic = atomic_dir(self.out_dir)
        self.tmp: Path | None = None

    def __enter__(self) -> "CheckpointWriter":
        self.tmp = self._atomic.__enter__()
        return self

    def __exit__(self, *exc):
        return self._atomic.__exit__(*exc)

    def add(self, dense: dict[str, torch.Tensor], units: dict[str, PackedWeight] | None = None,
            tied: dict[str, str] | None = None) -> None:
        """Queue uncompressed tensors (stored in float16 where they fit) and packed units."""
        for name, t in dense.items():
            self._put(name, t.detach().to("cpu", storage_dtype_for(t, self.dtype)).contiguous())
        for name, pw in (units or {}).items():
            ts, meta = pw.to_tensors()
            meta["nbytes"] = pw.nbytes()
            self.unit_meta[name] = meta
            for suffix, t in ts.items():
                self._put(f"{name}{SEP}{suffix}", t.contiguous())
        self.tied.update(tied or {})

    def _put(self, name: str, t: torch.Tensor) -> None:
        if self.pending_bytes >= self.shard_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"weights-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.tmp / name), metadata={"format": FORMAT})
        self.shards.append(name)
        self.pending, self.pending_bytes = {}, 0

    def finish(self, model, *, tokenizer=None, dropped: list[str] = (), plan: dict | None = None,
               extra: dict | None = None) -> dict:
        """Write what is queued, the tokenizer and the manifest (the model gives its config)."""
        self._flush()
        if len(self.shards) == 1:
            (self.tmp / self.shards[0]).rename(self.tmp / WEIGHTS)
            self.shards = [WEIGHTS]
        elif not self.shards:
            save_file({}, str(self.tmp / WEIGHTS), metadata={"format": FORMAT})
            self.shards = [WEIGHTS]
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "config": config,
            "units": self.unit_meta,
            "dropped": list(dropped),
            "tied": self.tied,
            "plan": plan or {},
            **(extra or {}),
            "weight_files": self.shards,
        }
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(self.tmp.iterdir()) if p.is_file()}
        manifest = with_checksum(manifest)  # covers the config, the units' formats and the files' checksums
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def save_checkpoint(out_dir: str | Path, model, units: dict[str, PackedWeight], *, tokenizer=None,
                    dropped: list[str] = (), plan: dict | None = None, extra: dict | None = None,
                    dtype: torch.dtype = torch.float16, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the packed checkpoint of an in-memory model atomically; returns the manifest."""
    dense, tied = dense_tensors(model, units)
    with CheckpointWriter(out_dir, shard_bytes=shard_bytes, dtype=dtype) as w:
        w.add(dense, units, tied)
        return w.finish(model, tokenizer=tokenizer, dropped=dropped, plan=plan, extra=extra)


def weight_files(manifest: dict) -> list[str]:
    """The files a checkpoint's tensors are in (older checkpoints: weights.safetensors)."""
    return manifest.get("weight_files", [WEIGHTS])


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    recover_interrupted(path, again=True)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give the folder written by `modelpress compress --out`")
    if not mf.is_file():
        raise CheckpointError(f"{path} is not a modelpress checkpoint (no {MANIFEST}); "
                              "for a plain model folder use load_model")
    manifest = read_json(mf, "checkpoint manifest", "re-run the compression that wrote it")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is not a modelpress checkpoint manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer modelpress (format {manifest['version']}); upgrade modelpress")
    return manifest


def verify_files(path: str | Path, manifest: dict) -> None:
    path = Path(path)
    files = manifest.get("files", {})
    unlisted = [f for f in weight_files(manifest) if f not in files]
    if unlisted:
        raise CheckpointError(f"checkpoint {path} is corrupt: its manifest lists no checksum for {unlisted[0]}; "
                              "re-run the compression that wrote it")
    for name, digest in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum "
                                  "(truncated or modified); re-run the compression that wrote it")


def empty_model(config_dict: dict, dtype: torch.dtype):
    """A randomly initialized model of the stored config, its weights to be loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config_dict)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@torch.no_grad()
def load_checkpoint(path: str | Path, *, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32, verify: bool = True, keep_packed: bool = False,
                    kernel: str | None = None):
    """Rebuild the compressed model: returns (model, tokenizer or None, units, manifest). With
    `keep_packed` every compressed Linear stays in its stored form (ops.packed_linear.PackedLinear,
    decoded per forward: resident memory ≈ the checkpoint's) and `units` is empty (each layer's
    `packed()` gives it); otherwise every layer holds its decoded weight. `kernel="int4"` (with
    `keep_packed`) runs 4-bit layers on torch's CPU int4 matmul (ops.packed_linear.Int4Linear:
    bfloat16 activations, much faster decode; other layers stay PackedLinear)."""
    path = Path(path)
    if kernel not in (None, "int4"):
        raise ConfigError(f"kernel is None or 'int4', got {kernel!r}")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    tensors = {}
    for name in weight_files(manifest):
        try:
            tensors.update(load_file(str(path / name)))
        except Exception as e:
            raise CheckpointError(f"could not read {path / name}: {e}") from None
    model = empty_model(manifest["config"], dtype)
    unfuse_experts(model)  # a MoE's units are its experts' Linear layers (models.moe)
    for name in manifest.get("dropped", []):
        drop_subblock(model, name)
    linears = dict(model.named_modules())
    units: dict[str, PackedWeight] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if SEP in k:
            u, suffix = k.split(SEP, 1)
            packed.setdefault(u, {})[suffix] = t
        else:
            dense[k] = t
    for alias, target in manifest.get("tied", {}).items():
        if target in dense:
            dense[alias] = dense[target]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in dense.items()},
                                                strict=False)
    expected_missing = {f"{u}.weight" for u in manifest["units"]}
    expected_missing |= {a for a, tgt in manifest.get("tied", {}).items() if tgt in expected_missing}
    really_missing = [m for m in missing if m not in expected_missing]
    if really_missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its model config "
                              f"(missing {really_missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()  # where the config ties them: one tensor for the embedding and the head, as stored
    for name, meta in manifest["units"].items():
        if name not in linears:
            raise CheckpointError(f"checkpoint {path} names unit {name}, which its model does not have")
        try:  # a removed layer has no tensors at all
            pw = load_weight(packed.get(name, {}), meta)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: unit {name} is malformed ({e})") from None
        if keep_packed:  # the stored tensors become the layer; the decoded check above is dropped
            from ..ops.packed_linear import Int4Linear, PackedLinear, int4_eligible

            bias = getattr(linears[name], "bias", None)
            layer = (Int4Linear(pw, bias) if kernel == "int4" and int4_eligible(pw)
                     else PackedLinear(packed.pop(name, {}), meta, bias))
            replace_module(model, name, layer)
            del pw
        else:
            set_weight(linears[name], pw.dequantize())
            units[name] = pw
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    if keep_packed:
        del linears, tensors
        release_freed_memory()  # the dense unit weights the skeleton was built with are gone
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok, units, manifest


def checkpoint_info(path: str | Path) -> dict:
    """Sizes and effective bits of a checkpoint, from its manifest and files."""
    path = Path(path)
    manifest = read_manifest(path)
    units = manifest["units"]
    unit_bytes = sum(u["nbytes"] for u in units.values())
    unit_params = sum(u["shape"][0] * u["shape"][1] for u in units.values())
    cfg = manifest["config"]
    weights_bytes = sum((path / f).stat().st_size for f in weight_files(manifest) if (path / f).is_file())
    return {
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "units": len(units),
        "dropped": manifest.get("dropped", []),
        "plan": manifest.get("plan", {}),
        "size_mb": dir_size(path) / 1e6,
        "weights_mb": weights_bytes / 1e6,
        "compressed_params": unit_params,
        "compressed_mb": unit_bytes / 1e6,
        "bits_per_weight": 8.0 * unit_bytes / unit_params if unit_params else None,
        "total_params": manifest.get("total_params"),
        "bits_per_param": (8.0 * weights_bytes / manifest["total_params"]) if manifest.get("total_params") else None,
    }
