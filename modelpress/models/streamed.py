"""Models larger than memory: the skeleton in memory, the decoder blocks on disk until a pass needs them.

    sm = open_streamed("path/to/hf-folder")      # or an alias / .gguf (converted to safetensors once)
    c = modelpress.compress(sm.model, sm.tokenizer, "gptq", bits=4, out="out/ck")

`open_streamed` builds the model with every decoder block's parameters on the meta device (no
memory) and the rest — embeddings, final norm, head, rotary tables — loaded. The layer-wise
runner (calib.runner) brings block i in from the safetensors files just before it works on it and
sends it back to meta right after, so a calibration pass holds one block, the calibration
activations and the statistics of one block's layers, whatever the model's size. Everything that
calibrates through the runner (compress, the level database's builders) streams this way;
`compress` writes the checkpoint block by block (`out=`), since the compressed model as a whole is
never in memory either.

A streamed block is held in `dtype`; only one is resident at a time. By default ("auto") that is
the dtype the weights are saved in: a float32 model is held in float32, the same as `load_model`,
so a streamed run computes exactly what the in-memory run does; a bfloat16 / float16 model stays
in 16 bits (half the memory and disk reads; its forwards run in that dtype, statistics and solves
in float32). `dtype=torch.float32` reproduces the in-memory run for those too.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..utils.memory import release_freed_memory
from .arch import Arch
from .safetensors_source import SafetensorsSource

log = logging.getLogger(__name__)

ATTR = "modelpress_stream"  # where a streamed model keeps its StreamedModel
SHARD_BYTES = 128 << 20  # a streamed run's checkpoint shards: what it holds before writing


def streamed(model: nn.Module) -> "StreamedModel | None":
    """The StreamedModel behind `model`, or None for an ordinary in-memory model."""
    return getattr(model, ATTR, None)


def stored(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (the tensor `name` of `model`), or for a streamed model's block tensor, which sits on the
    meta device, what its files hold (read now, not kept)."""
    stream = streamed(model)
    return stream.source.read(name) if t.device.type == "meta" and stream is not None else t


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


class StreamedModel:
    """A skeleton model and the files its decoder blocks come from."""

    def __init__(self, model: nn.Module, tokenizer, source: SafetensorsSource, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.dtype = dtype
        self.arch = Arch(model)
        self.resident: set[int] = set()
        self.fingerprint: str | None = None  # levels.database.model_fingerprint, once read from the files
        setattr(model, ATTR, self)

    def _tensor_names(self, i: int) -> list[str]:
        """The stored tensors of block i: its parameters and persistent buffers (a non-persistent
        buffer, such as a rotary table, is built at init and stays as it is)."""
        blk = self.arch.blocks[i]
        prefix = self.arch.block_name(i)
        names = [n for n, _ in blk.named_parameters(remove_duplicate=False)]
        for n, _ in blk.named_buffers():
            mod_name, _, leaf = n.rpartition(".")
            mod = blk.get_submodule(mod_name) if mod_name else blk
            if leaf not in mod._non_persistent_buffers_set:
                names.append(n)
        return [f"{prefix}.{n}" for n in names]

    def load_block(self, i: int, device: torch.device | str = "cpu") -> nn.Module:
        """Bring decoder block i into memory on `device`; returns it."""
        if i not in self.resident:
            for name in self._tensor_names(i):
                t = self.source.read(name)
                _set_tensor(self.model, name, t.to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype))
            self.resident.add(i)
        return self.arch.blocks[i]

    def release_block(self, i: int, collect: bool = True) -> None:
        """Put block i's stored tensors back on the meta device and their memory back to the OS (else
        glibc keeps the block and the pass's scratch resident). `collect=False` skips the garbage
        collection first: for many short forwards, where it would cost more than the block's forward."""
        if i in self.resident:
            for name in self._tensor_names(i):
                t = self.model.get_parameter(name) if _is_param(self.model, name) else self.model.get_buffer(name)
                _set_tensor(self.model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
            self.resident.discard(i)
            release_freed_memory(collect=collect)

    @contextlib.contextmanager
    def block(self, i: int, device: torch.device | str = "cpu"):
        """Block i in memory for the duration of the `with`."""
        blk = self.load_block(i, device)
        try:
            yield blk
        finally:
            self.release_block(i)

    def nbytes(self) -> int:
        """Bytes of the model's weights on disk."""
        return self.source.nbytes()


@contextlib.contextmanager
def block_forwards(model: nn.Module, device: torch.device | str | None = None, on_load=None):
    """While inside, a forward of the whole model (`model(input_ids=...)`) brings each decoder
    block of a streamed model in from disk just before the block runs — then calls `on_load(i)`,
    e.g. to put a plan's levels into it — and sends it back right after: whole-model forwards (a
    search's fitness, an evaluation) in one block's memory, at the cost of reading every block
    once per forward. Nothing changes for an in-memory model."""
    stream = streamed(model)
    if stream is None:
        yield
        return
    dev = device or next(model.parameters()).device
    handles = []

    def bring(i: int):
        def pre(mod, args):
            stream.load_block(i, dev)
            if on_load is not None:
                on_load(i)
        return pre

    for i, blk in enumerate(stream.arch.blocks):
        if next(blk.parameters(), None) is None:  # a stand-in for a block a forward skips (eval.fitness)
            continue
        handles.append(blk.register_forward_pre_hook(bring(i)))
        # freed pages go back after every block: else the levels a search caches meanwhile fragment
        # the heap and resident memory grows with the blocks read
        handles.append(blk.register_forward_hook(lambda mod, args, out, i=i: stream.release_block(i, collect=False)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for i in list(stream.resident):  # a forward that raised leaves its block in
            stream.release_block(i, collect=False)


def _is_param(root: nn.Module, name: str) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    return leaf in (root.get_submodule(mod_name) if mod_name else root)._parameters


def open_streamed(name: str | Path, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | str = "auto") -> StreamedModel:
    """A model whose decoder blocks stay on disk: a Hugging Face folder with safetensors weights, a
    `.gguf` file or a built-in alias (both converted once to a cached safetensors folder, see
    models.loading). The non-block tensors are loaded onto `device` in `dtype` ("auto": the dtype
    the weights are saved in)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .loading import ALIASES, _check_causal_lm, _convert_gguf, _gguf_cache_dir, _resolve_device, alias_gguf_path

    name_s = str(name)
    if name_s in ALIASES or name_s.lower().endswith(".gguf"):
        gguf = alias_gguf_path(name_s) if name_s in ALIASES else Path(name_s)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {name_s}")
        folder = _gguf_cache_dir(gguf)
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
    else:
        folder = Path(name_s)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"streaming reads a local model folder with config.json and safetensors weights; "
                                 f"{name_s!r} is not one (download a hub model first, e.g. `hf download {name_s}`)")
    dev = _resolve_device(device)
    config = AutoConfig.from_pretrained(str(folder))
    _check_causal_lm(config, str(folder))
    source = SafetensorsSource(folder)
    if dtype == "auto":
        dtype = source.float_dtype()
    elif not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"dtype must be a torch floating dtype or 'auto', got {dtype!r}")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        no_init_weights = contextlib.nullcontext
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    from .moe import looks_fused

    if any(looks_fused(m) for m in model.modules()):
        raise UnsupportedArchitectureError(f"{folder}: streaming a mixture-of-experts model is not supported yet "
                                           "(its experts are stored fused); compress it without --stream")
    arch = Arch(model)
    blocks = arch.blocks_name + "."
    for key, p in list(model.state_dict(keep_vars=True).items()):
        if key.startswith(blocks):
            continue
        if key in source:
            t = source.read(key)
            _set_tensor(model, key, t.to(device=dev, dtype=dtype if t.is_floating_point() else t.dtype))
        elif p.device.type == "meta" and not getattr(config, "tie_word_embeddings", False):
            raise ModelLoadError(f"{folder}: its safetensors files have no tensor {key!r}")
    model.tie_weights()  # a tied head reads the embedding just loaded
    missing = [k for k, p in model.state_dict(keep_vars=True).items()
               if not k.startswith(blocks) and p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{folder}: its safetensors files have no tensor for {missing[:3]}")
    for k, b in model.named_buffers():  # non-persistent buffers built at init (rotary tables) go to the device
        if not k.startswith(blocks) and b.device != dev:
            _set_tensor(model, k, b.to(dev))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a model without a tokenizer is still compressible with token ids
        log.warning("no tokenizer for %s (%s)", folder, e)
        tok = None
    log.info("streaming %s: %.0f MB of weights on disk, %d blocks loaded one at a time",
             folder, source.nbytes() / 1e6, len(arch))
    return StreamedModel(model, tok, source, dtype)
