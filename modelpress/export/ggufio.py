"""GGUF export for llama.cpp (Llama family); llama.cpp itself runs the files in `llamacpp`.

Metadata (tokenizer included) is copied from the GGUF file the model came from when there is one,
so llama.cpp tokenizes exactly as before; otherwise it is built from the Hugging Face config and a
BPE tokenizer. Tensors are written as raw GGML blocks: either given (from a level database, so the
file holds exactly the bytes that were evaluated) or quantized here with llama.cpp's arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from ..ops.ggmlweight import GGMLWeight
from ..ops import ggml
from ..utils.io import atomic_file, commit_file, temp_path

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")
ALIGN = 32


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def check_architecture(model) -> None:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"GGUF export supports the Llama family ({', '.join(SUPPORTED)}), not {mt!r}")
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise UnsupportedArchitectureError("GGUF export of Llama models with biases is not supported")


def source_gguf(model) -> Path | None:
    """The GGUF file a model was loaded from (load_model records it beside its cached copy)."""
    src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if src:
        f = Path(src) / "SOURCE"
        if f.is_file():
            p = Path(f.read_text().strip())
            if p.is_file():
                return p
    return None


def head_counts(model) -> dict[str, int]:
    cfg = model.config
    return {"q_proj": cfg.num_attention_heads, "k_proj": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}


def unit_heads(name: str, model) -> int | None:
    return head_counts(model).get(name.rsplit(".", 1)[-1])


def embedding_name(model) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


# sha256 of the whole file with this value's 64 characters as "0" (written last, in place): a
# GGUF file has no checksum of its own, and llama.cpp ignores keys it does not know
CHECKSUM_KEY = "modelpress.sha256"
_PLACEHOLDER = b"0" * 64


def _checksum_span(path: Path) -> tuple[int, int] | None:
    """Byte range of the checksum's value in the file, or None for a file without one."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(CHECKSUM_KEY)
    if field is None:
        return None
    start = field.offset + sum(p.nbytes for p in field.parts[:field.data[0]])
    return start, start + len(_PLACEHOLDER)


def _hash_with_placeholder(path: Path, span: tuple[int, int], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    pos = 0
    with open(path, "rb") as f:
        while b := f.read(chunk):
            lo, hi = max(span[0] - pos, 0), min(span[1] - pos, len(b))
            if lo < hi:  # the checksum's own bytes count as the placeholder
                b = b[:lo] + _PLACEHOLDER[lo + pos - span[0]:hi + pos - span[0]] + b[hi:]
            h.update(b)
            pos += len(b)
    return h.hexdigest()


def verify_gguf(path: str | Path) -> None:
    """Refuse a GGUF file modelpress wrote if any byte of it changed since (a file without the
    checksum, from llama.cpp or a hub, is only checked for being readable)."""
    path = Path(path)
    try:
        span = _checksum_span(path)
    except Exception as e:  # truncated or damaged header: gguf raises whatever its parser meets
        raise ModelLoadError(f"could not read GGUF file {path}: corrupt or truncated ({type(e).__name__}: {e}); "
                             "write or download it again") from None
    if span is None:
        return
    with open(path, "rb") as f:
        f.seek(span[0])
        stored = f.read(span[1] - span[0]).decode("ascii", "replace")
    if _hash_with_placeholder(path, span) != stored:
        raise ModelLoadError(f"GGUF file {path} is corrupt: its content does not match the checksum modelpress "
                             f"wrote into it ({CHECKSUM_KEY}); write it again. If another tool rewrote it and kept "
                             f"that key, remove the key (gguf-new-metadata --remove-metadata {CHECKSUM_KEY}) to load it")


def reseal(path: str | Path) -> None:
    """Recompute the checksum of a file that carries modelpress's key (e.g. llama.cpp's quantizer
    copied it from a modelpress export); a file without the key is left as it is."""
    if _checksum_span(Path(path)) is not None:
        _seal(Path(path))


def _seal(path: Path) -> None:
    """Write the file's checksum into its placeholder."""
    span = _checksum_span(path)
    digest = _hash_with_placeholder(path, span)
    with open(path, "r+b") as f:
        f.seek(span[0])
        f.write(digest.encode("ascii"))


def _metadata_from_source(writer, path: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type", CHECKSUM_KEY,
                                                 "general.quantization_version", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub)


def _metadata_from_config(writer, model, tokenizer) -> None:
    from gguf import TokenType

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(str(getattr(cfg, "_name_or_path", "model")) or "model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer is None:
        raise ModelLoadError("GGUF export needs the model's tokenizer")
    tj = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not tj or tj.get("model", {}).get("type") != "BPE":
        raise UnsupportedArchitectureError("GGUF export from a Hugging Face folder supports BPE tokenizers; "
                                           "export from the original .gguf model instead")
    vocab = tj["model"]["vocab"]
    special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    tokens = [""] * cfg.vocab_size
    for tok, i in vocab.items():
        if i < cfg.vocab_size:
            tokens[i] = tok
    for t in tj.get("added_tokens", []):
        if t["id"] < cfg.vocab_size:
            tokens[t["id"]] = t["content"]
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(TokenType.CONTROL if i in special else TokenType.NORMAL) for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_token_scores([0.0] * len(tokens))
    for key, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                    ("pad_token_id", writer.add_pad_token_id)):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            fn(v)


@torch.no_grad()
def export_gguf(model, out: str | Path, *, weights: dict | None = None, default_type: str = "Q8_0",
                tokenizer=None, source: str | Path | None = None) -> Path:
    """Write `model` as a GGUF file llama.cpp runs. `weights` maps unit names (Linear layers and the
    input embedding) to GGMLWeight; every other 2-D weight is quantized to `default_type`."""
    import gguf

    check_architecture(model)
    out = Path(out)
    weights = dict(weights or {})
    src = Path(source) if source else source_gguf(model)
    cfg = model.config
    names = tensor_name_map(model)
    dt = ggml.qtype(default_type)
    tied = getattr(cfg, "tie_word_embeddings", False)
    tmp = temp_path(out)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        writer.add_string(CHECKSUM_KEY, _PLACEHOLDER.decode("ascii"))
        if src is not None:
            _metadata_from_source(writer, src)
        else:
            _metadata_from_config(writer, model, tokenizer)
        types_used: dict[str, int] = {}
        for hf_name, t in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedArchitectureError(f"no GGUF name for tensor {hf_name}")
            unit = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name
            if t.dim() == 1:
                writer.add_tensor(gname, t.float().cpu().numpy())
                continue
            gw = weights.pop(unit, None)
            if gw is None:
                gw = GGMLWeight.quantize(t.float(), default_type if ggml.supported(dt, t.shape[1]) else "F16",
                                         heads=unit_heads(unit, model))
            if tuple(gw.shape) != tuple(t.shape):
                raise ConfigError(f"weight for {unit} has shape {gw.shape}, the model has {tuple(t.shape)}")
            qt = ggml.qtype(gw.type)
            types_used[gw.type] = types_used.get(gw.type, 0) + t.numel()
            writer.add_tensor(gname, gw.data.cpu().numpy(), raw_dtype=qt)
        if weights:
            raise ConfigError(f"weights given for units the model does not have: {', '.join(list(weights)[:3])}")
        main = max(types_used, key=types_used.get) if types_used else "F32"
        ftype = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
                 "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25}.get(main, 0)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _seal(tmp)
        commit_file(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def export_gguf_types(model, out: str | Path, types: dict[str, str], *, imatrix: dict | None = None,
                      tokenizer=None, source: str | Path | None = None) -> Path:
    """Export with the GGML type `types` names for each GGUF tensor (e.g. those of a llama.cpp preset
    file, `llamacpp.tensor_types`), every matrix quantized here from the model's float weights with
    llama.cpp's quantizer: with `imatrix` (layer name -> mean x² per input column,
    `calib.imatrix.importance`) for the layers it covers, this is what `llama-quantize --imatrix`
    writes for that importance matrix."""
    imatrix = imatrix or {}
    state = model.state_dict()
    weights = {unit: GGMLWeight.quantize(state[unit + ".weight"].float(), types[gname], heads=unit_heads(unit, model),
                                         imatrix=imatrix.get(unit))
               for unit, gname in gguf_names(model).items() if gname in types}
    return export_gguf(model, out, weights=weights, tokenizer=tokenizer, source=source)


def tensor_name_map(model):
    """gguf's map from the model's (Llama-layout) tensor names to llama.cpp's."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)


def gguf_names(model) -> dict[str, str]:
    """Unit name (a Linear layer or the embedding) -> its GGUF tensor name."""
    names = tensor_name_map(model)
    return {hf[: -len(".weight")]: names.get_name(hf, try_suffixes=(".weight",))
            for hf, t in model.state_dict().items() if t.dim() == 2 and hf.endswith(".weight")}


RECIPE_TYPES, RECIPE_IMATRIX = ".tensor-types.txt", ".imatrix.gguf"


def write_llama_quantize_recipe(model, out: str | Path, weights: dict) -> dict:
    """Beside the GGUF file `out`, what rebuilds it with llama.cpp's own tool from a float32 export:
    OUT.tensor-types.txt (NAME=TYPE for every matrix, llama-quantize's --tensor-type-file) and, when
    some levels were quantized with an importance matrix, OUT.imatrix.gguf in llama-imatrix's format
    holding exactly those (in_sum2 = the mean x² per input column, counts = 1, so llama-quantize's
    in_sum2 / counts is the vector modelpress quantized with). Returns the files, the command, and
    the tensors whose codes GPTQ chose (llama.cpp requantizes those with its own quantizer)."""
    import gguf

    out = Path(out)
    names = gguf_names(model)
    types = {names[u]: w.type for u, w in weights.items()}
    paths = {"tensor_types": out.with_name(out.name + RECIPE_TYPES)}
    with atomic_file(paths["tensor_types"]) as f:  # names as llama-quantize's regexes, anchored to the whole name
        f.write("".join(f"^{re.escape(n)}$={t.lower()}\n" for n, t in sorted(types.items())))
    important = {names[u]: w.importance for u, w in weights.items() if w.importance is not None}
    out.with_name(out.name + RECIPE_IMATRIX).unlink(missing_ok=True)  # an earlier run's
    cmd = ["llama-quantize"]
    if important:
        paths["imatrix"] = out.with_name(out.name + RECIPE_IMATRIX)
        tmp = temp_path(paths["imatrix"])
        try:
            writer = gguf.GGUFWriter(tmp, arch=None)
            writer.add_string("general.type", "imatrix")
            writer.add_array("imatrix.datasets", ["modelpress calibration (means: counts are 1)"])
            writer.add_uint32("imatrix.chunk_count", 1)
            writer.add_uint32("imatrix.chunk_size", 1)
            for n, v in sorted(important.items()):
                writer.add_tensor(f"{n}.in_sum2", v.float().numpy().reshape(1, -1))
                writer.add_tensor(f"{n}.counts", np.ones((1, 1), dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            commit_file(tmp, paths["imatrix"])
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        cmd += ["--imatrix", str(paths["imatrix"])]
    rebuilt = out.with_name(out.stem + ".rebuilt.gguf")
    cmd += ["--tensor-type-file", str(paths["tensor_types"]), "MODEL-F32.gguf", str(rebuilt), "Q8_0"]
    # codes chosen by GPTQ are no quantizer's output that llama.cpp has: it rebuilds those tensors with its own
    not_rebuilt = sorted(names[u] for u, w in weights.items() if w.chosen_by != "ggml")
    return {**{k: str(v) for k, v in paths.items()}, "command": " ".join(cmd), "not_rebuilt_exactly": not_rebuilt,
            "source": "MODEL-F32.gguf = `modelpress export gguf MODEL --type F32 --out MODEL-F32.gguf`"}


def read_llama_quantize_recipe(out: str | Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(tensor types, importance matrix by tensor name) of the recipe written beside `out`, read the
    way llama-quantize reads them (in_sum2 / counts)."""
    from gguf import GGUFReader

    out = Path(out)
    types = {}
    for line in out.with_name(out.name + RECIPE_TYPES).read_text().split():
        n, _, t = line.rpartition("=")
        types[re.sub(r"\\(.)", r"\1", n.removeprefix("^").removesuffix("$"))] = t.upper()
    imatrix = {}
    im_path = out.with_name(out.name + RECIPE_IMATRIX)
    if im_path.is_file():
        t = {x.name: np.asarray(x.data, dtype=np.float32) for x in GGUFReader(str(im_path)).tensors}
        for n in t:
            if n.endswith(".in_sum2"):
                base = n[: -len(".in_sum2")]
                imatrix[base] = (t[n].reshape(-1) / t[base + ".counts"].reshape(-1)[0]).astype(np.float32)
    return types, imatrix


def gguf_fixed_bytes(model, units: dict[str, tuple[int, int]], tokenizer=None) -> int:
    """File bytes of a GGUF export that do not depend on the units' types: header, metadata,
    tensor infos and the float tensors. A unit adds its data padded to 32 bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        p = export_gguf(model, Path(tmp) / "probe.gguf", default_type="Q8_0", tokenizer=tokenizer)
        size = p.stat().st_size
    for name, shape in units.items():
        size -= _pad(ggml.bytes_per_row(ggml.qtype("Q8_0"), shape[1]) * shape[0])
    return size
