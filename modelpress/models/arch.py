"""Generic architecture discovery: decoder blocks, their Linear layers and their sub-blocks.

One code path serves every decoder-only model: the decoder blocks are the longest ModuleList whose
length is the config's layer count; the compressible units are the Linear layers inside them
(GPT-2's transposed `Conv1D` included); the sub-blocks (attention, MLP) are a block's children that
hold Linear layers, recognised by name.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

try:  # GPT-2 style transposed linear
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

_ATTN = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn|ff$", re.I)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, LINEAR_TYPES)


def get_weight(m: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features) — (vocab, hidden) for an embedding — whatever the
    module stores."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        return m.weight.data
    return m.weight.data.t()  # Conv1D stores (in, out)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted path `name` under `root`; returns the module that now holds it."""
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, attr, new)
    return owner


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) weight back in the module's own layout, dtype and device."""
    target = m.weight.data
    w = w.to(device=target.device, dtype=target.dtype)
    if isinstance(m, (nn.Linear, nn.Embedding)):
        target.copy_(w)
    else:
        target.copy_(w.t())


@dataclasses.dataclass(frozen=True)
class SubBlock:
    name: str  # full module name, e.g. "model.layers.3.self_attn"
    kind: str  # "attn" | "mlp"
    block: int
    attr: str  # attribute name on the block


def _n_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


class Arch:
    """Where things are in one model. Cheap to build; holds no state beyond module references."""

    def __init__(self, model: nn.Module):
        self.model = model
        n = _n_layers(getattr(model, "config", None))
        best: tuple[str, nn.ModuleList] | None = None
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
                continue
            if n is not None and len(mod) != n:
                continue
            if not any(is_linear(x) or isinstance(x, Dropped) for blk in mod for x in blk.modules()):
                continue
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
        if best is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: found no list of decoder blocks with Linear layers; "
                "modelpress supports decoder-only transformer LMs"
            )
        self.blocks_name, self.blocks = best

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.blocks_name}.{i}"

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Linear layers of block i, full name -> module, in definition order."""
        prefix = self.block_name(i)
        return {f"{prefix}.{n}": m for n, m in self.blocks[i].named_modules() if is_linear(m)}

    def all_linears(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for i in range(len(self)):
            out.update(self.linears(i))
        return out

    def block_of(self, unit: str) -> int:
        prefix = self.blocks_name + "."
        if not unit.startswith(prefix):
            raise KeyError(unit)
        return int(unit[len(prefix):].split(".", 1)[0])

    def subblocks(self) -> list[SubBlock]:
        out = []
        for i, blk in enumerate(self.blocks):
            for attr, child in blk.named_children():
                if isinstance(child, (Dropped,)):
                    kind = child.kind
                elif not any(is_linear(x) for x in child.modules()):
                    continue
                elif "cross" in attr.lower():
                    continue
                elif _ATTN.search(attr):
                    kind = "attn"
                elif _MLP.search(attr):
                    kind = "mlp"
                else:
                    continue
                out.append(SubBlock(f"{self.block_name(i)}.{attr}", kind, i, attr))
        return out

    def subblock(self, name: str) -> SubBlock:
        for sb in self.subblocks():
            if sb.name == name:
                return sb
        raise KeyError(name)

    def embeddings(self) -> list[str]:
        """Names of parameters outside the decoder blocks (embeddings, final norm, lm_head)."""
        prefix = self.blocks_name + "."
        return [n for n, _ in self.model.named_parameters() if not n.startswith(prefix)]


class Dropped(nn.Module):
    """Stands in for a removed attention or MLP sub-block: it adds nothing to the residual stream."""

    def __init__(self, kind: str, layer_idx: int | None = None):
        super().__init__()
        self.kind = kind
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        out = torch.zeros_like(x)
        if self.kind == "mlp":
            return out
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            # keep the cache's sequence length right (it is read from layer 0) at zero memory: 0 heads
            empty = x.new_zeros(x.shape[0], 0, x.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def drop_subblock(model: nn.Module, name: str) -> SubBlock:
    """Replace sub-block `name` (e.g. "model.layers.3.mlp") by a pass-through; returns its description."""
    arch = Arch(model)
    try:
        sb = arch.subblock(name)
    except KeyError:
        names = [s.name for s in arch.subblocks()][:4]
        raise UnsupportedArchitectureError(f"no attention/MLP sub-block named {name!r} (e.g. {', '.join(names)})") from None
    blk = arch.blocks[sb.block]
    old = getattr(blk, sb.attr)
    if isinstance(old, Dropped):
        return sb
    layer_idx = getattr(old, "layer_idx", None)
    if layer_idx is None and sb.kind == "attn":
        layer_idx = sb.block
    setattr(blk, sb.attr, Dropped(sb.kind, layer_idx))
    return sb


def discover(model: nn.Module) -> Arch:
    return Arch(model)


def cache_kwarg(model) -> str:
    """The name a model's forward takes its cache under (`cache` in newer transformers)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
