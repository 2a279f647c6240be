"""llama.cpp itself, loaded with ctypes: it scores, generates from and quantizes the GGUF files
modelpress writes, and collects importance matrices with its own forward (`imatrix`, as
llama-imatrix does), so the numbers in a GGUF report are the engine's own.

The libraries are taken from the first of:
1. `MODELPRESS_LLAMA_CPP_LIB`: a folder holding a llama.cpp build's shared libraries
   (`libllama*.so`, `libggml*.so`, e.g. a build's `bin/`); `none` turns llama.cpp off;
2. llama-cpp-python, when it is installed: the libraries it bundles;
3. on Linux x86-64, the CPU build that node-llama-cpp publishes on npm (`@node-llama-cpp/linux-x64`,
   llama.cpp 0.5.0, built on Ubuntu 22.04; ggml picks the best of its CPU variants, SSE4.2 to
   AVX512/AMX, when it loads): 10.8 MB fetched once into the modelpress cache and checked against its
   pinned checksum. The files are plain llama.cpp shared libraries; Node.js is not needed.

Only long-stable parts of llama.h are relied on: `llama_batch`, the first three fields of
`llama_context_params` (n_ctx, n_batch, n_ubatch) and the first two of
`llama_model_quantize_params` (nthread, ftype); the other parameter structs are passed through as
the library fills them. The defaults are checked when the library loads, so a build with another
layout is refused with a clear error instead of read wrongly. The importance matrix and per-tensor
types of `quantize` are C arrays at offsets 24 and 40 of the quantize parameters only from llama.cpp
0.5 on (`llama_version()`; earlier builds point those fields at C++ containers), so they are passed
only to such a build.
"""
from __future__ import annotations

import collections
import ctypes
import glob
import importlib.util
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from ..errors import ModelLoadError
from ..utils.packages import Package, PackageFetchError

log = logging.getLogger(__name__)

NODE_LLAMA_CPP = Package("npm", "@node-llama-cpp/linux-x64", "3.22.1",
                         integrity="sha512-5uCCDNqWCNfaAm8aR/Uzxbo4HBpKgNF91kCHPepKhgMgV2OAmatoefbOlMihsqCiH2Od35E/"
                                   "eUHQCFbfRBJuOg==")


class _OPAQUE(ctypes.Structure):
    """Room for any version's parameter structs, returned and passed by value as the library fills them
    (x86-64 and arm64 pass structs this large through memory, so only the callee's own bytes are read)."""
    _fields_ = [("raw", ctypes.c_uint8 * 1024)]


_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
# ggml_backend_sched_eval_callback: bool (*)(struct ggml_tensor * t, bool ask, void * user_data)
_EVAL_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


class LlamaCppUnavailable(ModelLoadError):
    """No usable llama.cpp library on this machine."""


class _Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class _TensorType(ctypes.Structure):  # llama_model_tensor_override
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


class _Importance(ctypes.Structure):  # llama_model_imatrix_data
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


# llama_model_quantize_params of llama.cpp 0.5: nthread, ftype, two type enums, six bools, then the
# imatrix / kv-override / tensor-type / prune pointers and max_buf_size
_Q_IMATRIX, _Q_TENSOR_TYPES = 24, 40


_LIB_NAMES = ("libllama*.so", "libllama*.dylib", "llama.dll")


def _candidate_dirs():
    """Folders that may hold llama.cpp's libraries, best first; the npm build is fetched only when
    the ones before it are missing or unusable (a generator: the caller stops at the first that loads)."""
    env = os.environ.get("MODELPRESS_LLAMA_CPP_LIB")
    if env:
        if env.lower() == "none":
            raise LlamaCppUnavailable("llama.cpp is turned off (MODELPRESS_LLAMA_CPP_LIB=none)")
        yield Path(env)
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            yield from sorted({Path(p).parent for pat in _LIB_NAMES
                               for p in glob.glob(os.path.join(loc, "**", pat), recursive=True)})
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        try:
            yield NODE_LLAMA_CPP.root() / "package" / "bins" / "linux-x64"
        except PackageFetchError as e:
            raise LlamaCppUnavailable(f"the prebuilt llama.cpp could not be fetched ({e}); point "
                                      "MODELPRESS_LLAMA_CPP_LIB at a llama.cpp build's libraries, or "
                                      "`pip install llama-cpp-python`") from None
    else:
        raise LlamaCppUnavailable(f"no prebuilt llama.cpp for {platform.system()} {platform.machine()}: "
                                  "`pip install llama-cpp-python`, or point MODELPRESS_LLAMA_CPP_LIB at a llama.cpp "
                                  "build's libraries")


def _one(folder: Path, *patterns: str) -> Path | None:
    """The first file in `folder` matching the first pattern that matches any."""
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


_GGML_LOG_WARN = 3  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_problems: collections.deque[str] = collections.deque(maxlen=2)  # its last warnings, for our error messages


def _forward_log(level: int, text: bytes | None, _user) -> None:
    if not text:
        return
    line = text.decode(errors="replace").rstrip()
    if level in (_GGML_LOG_WARN, _GGML_LOG_WARN + 1) and line:
        _problems.append(line)
    log.debug("llama.cpp: %s", line)


def _said() -> str:
    """What llama.cpp last warned about, for an error message."""
    return f" (llama.cpp said: {' / '.join(_problems)})" if _problems else " (its log goes to the modelpress.export.llamacpp logger at DEBUG level)"


_log_cb = _LOG_CB(_forward_log)  # kept alive for the process: the library holds the pointer


class _Lib:
    """The loaded libraries with their signatures declared."""

    def __init__(self, folder: Path):
        base = _one(folder, "libggml-base*.so", "libggml-base*.dylib", "ggml-base.dll")
        ggml = _one(folder, "libggml.so", "libggml.v*.so", "libggml.dylib", "ggml.dll")
        llama = _one(folder, "libllama.so", "libllama.v*.so", "libllama.dylib", "llama.dll")
        if not (base and llama):
            raise LlamaCppUnavailable(f"{folder} holds no libllama / libggml-base shared library")
        mode = ctypes.RTLD_GLOBAL
        self.folder = folder
        self.base = ctypes.CDLL(str(base), mode=mode)
        self.ggml = ctypes.CDLL(str(ggml), mode=mode) if ggml else self.base
        self.llama = ctypes.CDLL(str(llama), mode=mode)
        c = ctypes
        self._sig(self.base, "ggml_log_set", None, [_LOG_CB, c.c_void_p])
        self._sig(self.llama, "llama_log_set", None, [_LOG_CB, c.c_void_p])
        self.base.ggml_log_set(_log_cb, None)
        self.llama.llama_log_set(_log_cb, None)
        if hasattr(self.ggml, "ggml_backend_load_all_from_path"):  # builds whose CPU backends are plugins
            self._sig(self.ggml, "ggml_backend_load_all_from_path", None, [c.c_char_p])
            self.ggml.ggml_backend_load_all_from_path(str(folder).encode())
        self._sig(self.ggml, "ggml_backend_dev_count", c.c_size_t, [])
        if self.ggml.ggml_backend_dev_count() == 0:
            raise LlamaCppUnavailable(f"llama.cpp at {folder} found no backend for this CPU")
        L = self.llama
        self._sig(L, "llama_backend_init", None, [])
        L.llama_backend_init()
        self._sig(L, "llama_model_default_params", _OPAQUE, [])
        self._sig(L, "llama_model_load_from_file", c.c_void_p, [c.c_char_p, _OPAQUE])
        self._sig(L, "llama_model_free", None, [c.c_void_p])
        self._sig(L, "llama_context_default_params", _OPAQUE, [])
        self._sig(L, "llama_init_from_model", c.c_void_p, [c.c_void_p, _OPAQUE])
        self._sig(L, "llama_free", None, [c.c_void_p])
        self._sig(L, "llama_set_n_threads", None, [c.c_void_p, c.c_int32, c.c_int32])
        self._sig(L, "llama_model_get_vocab", c.c_void_p, [c.c_void_p])
        self._sig(L, "llama_vocab_n_tokens", c.c_int32, [c.c_void_p])
        self._sig(L, "llama_n_ctx", c.c_uint32, [c.c_void_p])
        self._sig(L, "llama_batch_init", _Batch, [c.c_int32, c.c_int32, c.c_int32])
        self._sig(L, "llama_batch_free", None, [_Batch])
        self._sig(L, "llama_decode", c.c_int32, [c.c_void_p, _Batch])
        self._sig(L, "llama_get_logits", c.POINTER(c.c_float), [c.c_void_p])
        self._sig(L, "llama_get_memory", c.c_void_p, [c.c_void_p])
        self._sig(L, "llama_memory_clear", None, [c.c_void_p, c.c_bool])
        self._sig(L, "llama_model_quantize_default_params", _OPAQUE, [])
        self._sig(L, "llama_model_quantize", c.c_uint32, [c.c_char_p, c.c_char_p, c.POINTER(_OPAQUE)])
        ctx_defaults = bytes(L.llama_context_default_params().raw)
        cp = tuple(int(v) for v in np.frombuffer(ctx_defaults, np.uint32)[:3])
        qp = tuple(int(v) for v in np.frombuffer(bytes(L.llama_model_quantize_default_params().raw), np.int32)[:2])
        # llama.h's defaults for years: n_ctx 512, n_batch 2048, n_ubatch 512; nthread 0 and a valid ftype
        raw = bytes(L.llama_model_quantize_default_params().raw)
        self.version = ""
        if hasattr(L, "llama_version"):
            self._sig(L, "llama_version", c.c_char_p, [])
            self.version = (L.llama_version() or b"").decode(errors="replace")
        # the 0.5 layout (quantize's imatrix / tensor types as C arrays): six bools false, true, false x4,
        # four null pointers, max_buf_size 8 GiB; and a library that says it is 0.5 or later
        major_minor = tuple(int(x) for x in self.version.split("-")[0].split(".")[:2] if x.isdigit())
        self.quantize_pointers = (len(major_minor) == 2 and major_minor >= (0, 5)
                                  and tuple(raw[16:22]) == (0, 1, 0, 0, 0, 0)
                                  and not any(np.frombuffer(raw[24:56], np.uint64))
                                  and int(np.frombuffer(raw[56:64], np.uint64)[0]) == 8 << 30)
        self.cb_eval_offset = _cb_eval_offset(ctx_defaults)
        for name, restype, args in (("ggml_get_name", c.c_void_p, [c.c_void_p]),
                                    ("ggml_get_data", c.c_void_p, [c.c_void_p]),
                                    ("ggml_op_desc", c.c_char_p, [c.c_void_p]),
                                    ("ggml_nbytes", c.c_size_t, [c.c_void_p]),
                                    ("ggml_backend_tensor_get", None, [c.c_void_p, c.c_void_p, c.c_size_t, c.c_size_t])):
            if hasattr(self.base, name):
                self._sig(self.base, name, restype, args)
        if cp != (512, 2048, 512) or qp[0] != 0 or qp[1] not in {int(t) for t in LlamaFileType}:
            raise LlamaCppUnavailable(f"the llama.cpp library at {folder} lays out its parameters differently from "
                                      f"the llama.h modelpress reads (defaults {cp}, {qp}); use llama.cpp 0.5 or "
                                      "set MODELPRESS_LLAMA_CPP_LIB")

    @staticmethod
    def _sig(lib, name, restype, argtypes) -> None:
        try:
            f = getattr(lib, name)
        except AttributeError:
            raise LlamaCppUnavailable(f"the llama.cpp library has no {name} (another llama.cpp version than 0.5?)") \
                from None
        f.restype, f.argtypes = restype, argtypes


def _cb_eval_offset(raw: bytes) -> int | None:
    """Where `cb_eval` sits in llama_context_params, read off the library's defaults: the first
    8-aligned pair of null pointers (cb_eval, cb_eval_user_data) followed by type_k = type_v = F16
    (1), after the floats -1.0 (defrag_thold) and 0 (yarn_orig_ctx) before them; None where no such
    place is found (a layout modelpress does not know: no importance matrix from llama.cpp then)."""
    u32 = np.frombuffer(raw, np.uint32)
    f32 = np.frombuffer(raw, np.float32)
    found = [o for o in range(16, 256, 8)
             if not any(raw[o:o + 16]) and tuple(u32[(o + 16) // 4:(o + 24) // 4]) == (1, 1)
             and u32[(o - 8) // 4] == 0 and f32[(o - 4) // 4] < 0]
    return found[0] if len(found) == 1 else None


_loaded: list = []  # the _Lib, or the LlamaCppUnavailable that says why there is none (tried once a process)


def library() -> _Lib:
    """The llama.cpp libraries, loaded once (raises LlamaCppUnavailable with what to do)."""
    if not _loaded:
        _loaded.append(_load())
    if isinstance(_loaded[0], LlamaCppUnavailable):
        raise _loaded[0]
    return _loaded[0]


def _load() -> _Lib | LlamaCppUnavailable:
    errors = []
    try:
        for folder in _candidate_dirs():
            try:
                lib = _Lib(folder)
            except (OSError, LlamaCppUnavailable) as e:
                errors.append(f"{folder}: {e}")
                continue
            log.info("llama.cpp %s libraries: %s", lib.version or "(version unknown)", folder)
            return lib
    except LlamaCppUnavailable as e:
        errors.append(str(e))
    return LlamaCppUnavailable("no usable llama.cpp library: " + "; ".join(errors))


def unavailable_reason() -> str | None:
    """Why no llama.cpp library can be used here (None when one can)."""
    try:
        library()
    except LlamaCppUnavailable as e:
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def threads() -> int:
    return int(os.environ.get("MODELPRESS_LLAMA_THREADS", 0)) or max(1, os.cpu_count() or 1)


class Session:
    """One GGUF model loaded in llama.cpp with a context of n_ctx tokens (one sequence)."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None, eval_callback=None):
        """`eval_callback`: an _EVAL_CB that llama.cpp's scheduler calls for every graph node
        (llama_context_params.cb_eval, what llama-imatrix collects through)."""
        self.lib = L = library().llama
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        _problems.clear()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}{_said()}")
        params = L.llama_context_default_params()
        n_ctx = int(n_ctx)
        np.frombuffer(params.raw, dtype=np.uint32)[:3] = (n_ctx, n_ctx, n_ctx)  # n_ctx, n_batch, n_ubatch
        if eval_callback is not None:
            offset = library().cb_eval_offset
            if offset is None:
                L.llama_model_free(self.model)
                raise LlamaCppUnavailable(f"the llama.cpp library at {library().folder} lays out its context "
                                          "parameters in a way modelpress does not know, so it cannot watch its "
                                          "forward (no importance matrix from llama.cpp); use llama.cpp 0.5")
            np.frombuffer(params.raw, dtype=np.uint64)[offset // 8] = ctypes.cast(eval_callback, ctypes.c_void_p).value
        self._callback = eval_callback  # the library calls it as long as the context lives
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not make a {n_ctx}-token context for {path}{_said()}")
        n = n_threads or threads()
        L.llama_set_n_threads(self.ctx, n, n)
        self.n_ctx = n_ctx
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_past = 0

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def eval(self, tokens: list[int], all_logits: bool = True, read: bool = True) -> np.ndarray | None:
        """Feed tokens after those already fed; the logits of every fed token (or only the last),
        float32 (n, vocab); with `read` False llama.cpp computes them but they are not copied out."""
        n = len(tokens)
        if not n or self.n_past + n > self.n_ctx:
            raise ValueError(f"{n} tokens after {self.n_past} do not fit a {self.n_ctx}-token context")
        batch = self.lib.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = int(t)
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == n - 1 else 0
            batch.n_tokens = n
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise ModelLoadError(f"llama.cpp could not evaluate {n} tokens (llama_decode returned {rc}){_said()}")
        finally:
            self.lib.llama_batch_free(batch)
        self.n_past += n
        if not read:
            return None
        rows = n if all_logits else 1
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows, self.n_vocab)).copy()


def perplexity(path: str | Path, ids, reference: str | Path | None = None) -> dict:
    """Perplexity computed by llama.cpp itself on token windows (no tokenization on its side); with
    `reference` (another GGUF file, e.g. the float export), also the mean KL(reference || this) per
    token, both run by llama.cpp."""
    import contextlib

    import torch

    nll = kl = 0.0
    n = 0
    t0 = time.time()
    with Session(path, ids.shape[1]) as s, \
            (Session(reference, ids.shape[1]) if reference else contextlib.nullcontext()) as r:
        for row in ids.tolist():
            s.reset()
            lp = torch.log_softmax(torch.from_numpy(s.eval(row))[:-1].double(), dim=-1)
            nll += -float(lp.gather(-1, torch.tensor(row[1:])[:, None]).sum())
            n += len(row) - 1
            if r is not None:
                r.reset()
                ref = torch.log_softmax(torch.from_numpy(r.eval(row))[:-1].double(), dim=-1)
                kl += float((ref.exp() * (ref - lp)).sum())
    out = {"ppl": float(np.exp(nll / n)), "nll": nll / n, "n_tokens": n, "seconds": time.time() - t0}
    if reference:
        out["kl"] = kl / n
    return out


# struct ggml_tensor (ggml.h, unchanged for years): type, buffer, ne[4], nb[4], op, op_params[16], flags,
# src[10], view_src, view_offs, data, name[64], ...; `data` and `name` are checked against ggml's own
# accessors on the first tensor seen, so a library with another layout is refused, not misread
_T_TYPE, _T_NE, _T_NB, _T_SRC, _T_DATA, _T_NAME = 0, 16, 48, 152, 248, 256
_GGML_F32 = 0


def _tensor_name(addr: int) -> str:
    raw = ctypes.string_at(addr + _T_NAME, 64)
    name = raw.split(b"\0", 1)[0].decode(errors="replace")
    # a scheduler's copy of a weight is named BACKEND#NAME#N (tools/imatrix's filter_tensor_name)
    return name.split("#")[1] if "#" in name else name


def imatrix(path: str | Path, ids, *, n_threads: int | None = None) -> dict[str, np.ndarray]:
    """The importance matrix `llama-imatrix -m PATH` collects, computed by llama.cpp itself: its own
    forward over the token windows `ids` (n, seq_len), watched through the scheduler's eval callback
    as tools/imatrix does: for every matrix multiplication by a decoder block's weight (blk.*) with
    at least 16 float32 input rows, the sum of x² per input column and the number of rows. Returns
    GGUF tensor name -> mean x² per input column (float32), what llama-quantize divides an imatrix
    file's in_sum2 by its counts to get. Mixture-of-experts multiplications (MUL_MAT_ID) are not
    collected."""
    lib = library()
    if not all(hasattr(lib.base, n) for n in ("ggml_get_name", "ggml_get_data", "ggml_op_desc", "ggml_nbytes",
                                              "ggml_backend_tensor_get")):
        raise LlamaCppUnavailable(f"the ggml library at {lib.folder} lacks the tensor accessors an importance matrix "
                                  "needs (ggml_get_name, ggml_get_data, ggml_op_desc, ggml_backend_tensor_get)")
    base = lib.base
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = collections.Counter()
    checked: list[bool] = []
    failure: list[BaseException] = []

    def ptr(addr: int, offset: int) -> int:
        return ctypes.c_void_p.from_address(addr + offset).value or 0

    def watch(t, ask, _user) -> bool:
        if failure:  # one error is enough: the rest of the forward is not watched
            return False
        try:
            if not checked:  # the layout, against ggml's accessors
                if base.ggml_get_name(t) != t + _T_NAME or (base.ggml_get_data(t) or 0) != ptr(t, _T_DATA):
                    raise LlamaCppUnavailable(f"the ggml library at {lib.folder} lays out its tensors differently "
                                              "from the ggml.h modelpress reads; use llama.cpp 0.5")
                checked.append(True)
            if base.ggml_op_desc(t) != b"MUL_MAT":
                return False
            src0, src1 = ptr(t, _T_SRC), ptr(t, _T_SRC + 8)
            if not src0 or not src1:
                return False
            ne1 = np.frombuffer(ctypes.string_at(src1 + _T_NE, 32), np.int64)
            if ctypes.c_int.from_address(src1 + _T_TYPE).value != _GGML_F32 or ne1[1] < 16:
                return False
            name = _tensor_name(src0)
            if not name.startswith("blk."):
                return False
            if ask:
                return True
            nb1 = np.frombuffer(ctypes.string_at(src1 + _T_NB, 32), np.uint64)
            if nb1[0] != 4:
                raise ValueError(f"{name}: the input of its multiplication is not contiguous in its rows")
            size = base.ggml_nbytes(src1)
            buf = np.empty(size // 4 + 1, np.float32)
            base.ggml_backend_tensor_get(src1, buf.ctypes.data, 0, size)
            raw = buf.view(np.uint8)
            for i3 in range(int(ne1[3])):
                for i2 in range(int(ne1[2])):
                    start = int(i2 * nb1[2] + i3 * nb1[3])
                    x = np.lib.stride_tricks.as_strided(raw[start:].view(np.float32), shape=(int(ne1[1]), int(ne1[0])),
                                                        strides=(int(nb1[1]), 4))
                    x = x.astype(np.float64)
                    sq = np.einsum("ij,ij->j", x, x)
                    sums[name] = sums[name] + sq if name in sums else sq
                    counts[name] += int(ne1[1])
            return True
        except BaseException as e:  # an exception must not cross into C: kept, and the forward stopped
            failure.append(e)
            return False

    from ..utils.progress import progress

    cb = _EVAL_CB(watch)
    ids = ids.tolist() if hasattr(ids, "tolist") else [list(r) for r in ids]
    t0 = time.time()
    with Session(path, len(ids[0]), n_threads, eval_callback=cb) as s:
        for row in progress(ids, desc="importance matrix (llama.cpp)"):
            s.reset()
            try:  # logits for every token, as llama-imatrix asks: else the last block runs on one row
                s.eval(row, read=False)
            finally:
                if failure:  # the cause, rather than what llama_decode made of it
                    raise failure[0]
    if not sums:
        raise ModelLoadError(f"llama.cpp's forward over {path} multiplied no decoder weights by 16 or more tokens "
                             "(windows too short?): no importance matrix")
    log.info("importance matrix of %d tensors from llama.cpp's forward over %d windows in %.1f s", len(sums),
             len(ids), time.time() - t0)
    return {n: (v / counts[n]).astype(np.float32) for n, v in sums.items()}


def generate(path: str | Path, prompt_ids: list[int], n_new: int = 64) -> dict:
    """Greedy generation with llama.cpp: the new tokens and the decode speed (tokens/s)."""
    with Session(path, len(prompt_ids) + n_new + 8) as s:
        last = s.eval(list(prompt_ids), all_logits=False)[-1]
        out = []
        t = time.time()
        for _ in range(n_new):
            out.append(int(np.argmax(last)))
            last = s.eval([out[-1]], all_logits=False)[-1]
        dt = time.time() - t
    return {"tokens": out, "tokens_per_s": n_new / dt}


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name of a file's matrices (e.g. the types a llama.cpp preset chose)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2}


def preset_ftype(preset: str) -> LlamaFileType:
    """llama-quantize's file type for a preset name (Q4_K_M, ...), or a clear error."""
    from ..errors import ConfigError

    try:
        return LlamaFileType[f"MOSTLY_{preset.upper()}"]
    except KeyError:
        raise ConfigError(f"unknown llama.cpp preset {preset!r}; e.g. Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q8_0") from None


def quantize(src: str | Path, dst: str | Path, preset: str = "Q8_0", *, imatrix: dict | None = None,
             tensor_types: dict[str, str] | None = None, n_threads: int | None = None) -> Path:
    """`llama-quantize [--imatrix] [--tensor-type NAME=TYPE ...] SRC DST PRESET` through the library.

    `imatrix`: GGUF tensor name -> importance per input column (mean x², what llama-quantize takes
    from an imatrix file); `tensor_types`: GGUF tensor name -> GGML type, overriding the preset's
    choice for exactly those tensors (llama-quantize's --tensor-type, anchored to the whole name)."""
    import re

    from gguf import GGMLQuantizationType

    from ..errors import ConfigError
    from ..utils.io import commit_file, temp_path
    from .ggufio import reseal

    ftype = preset_ftype(preset)
    lib = library()
    L = lib.llama
    params = L.llama_model_quantize_default_params()
    np.frombuffer(params.raw, dtype=np.int32)[:2] = (n_threads or threads(), int(ftype))
    keep = []  # the arrays llama.cpp reads during the call
    if (imatrix or tensor_types) and not lib.quantize_pointers:
        raise ConfigError(f"the llama.cpp library at {lib.folder} (version {lib.version or 'unknown'}) is not llama.cpp "
                          "0.5 or later, so importance matrices and tensor types cannot be passed to it; point "
                          "MODELPRESS_LLAMA_CPP_LIB at a 0.5 build, or uninstall an older llama-cpp-python so the "
                          "pinned prebuilt one is used")
    if imatrix:
        arrays = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in imatrix.items()}
        table = (_Importance * (len(arrays) + 1))()
        for i, (n, a) in enumerate(arrays.items()):
            table[i] = _Importance(n.encode(), a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size)
        keep += [arrays, table]
        _set_pointer(params, _Q_IMATRIX, table)
    if tensor_types:
        table = (_TensorType * (len(tensor_types) + 1))()
        for i, (n, t) in enumerate(tensor_types.items()):
            try:
                code = int(GGMLQuantizationType[t.upper()])
            except KeyError:
                raise ConfigError(f"unknown GGML type {t!r} for {n}") from None
            table[i] = _TensorType(f"^{re.escape(n)}$".encode(), code)
        keep.append(table)
        _set_pointer(params, _Q_TENSOR_TYPES, table)
    tmp = temp_path(dst)
    try:
        _problems.clear()
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ModelLoadError(f"llama.cpp could not quantize {src} to {preset}{_said()}")
        reseal(tmp)  # llama.cpp copies the source's metadata, modelpress's checksum of the source included
        commit_file(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    del keep
    return Path(dst)


def _set_pointer(params: _OPAQUE, offset: int, target) -> None:
    np.frombuffer(params.raw, dtype=np.uint64)[offset // 8] = ctypes.addressof(target)
