"""Per-Linear input statistics gathered by forward hooks: XᵀX (float32) and squared column norms.

One batch's XᵀX is computed on its own (float32, or its block products in a 16-bit compute dtype:
`product_dtype`, each rounded once to 16 bits, on the matrix units), and the batches' products
are *summed* in float64. With 16-bit products the relative error stays ~1e-3 however many batches
are summed (a 16-bit running sum would stall once it is ~256x a batch's contribution); the inputs
are rounded to the compute dtype first, which is what the Linear computes with under autocast.
The float64 sum makes the result independent of the order batches are added in: it is exact
unless one batch's contribution to an entry is ~2^25 times another's, and even then rounds to
the same float32 but with a chance of ~1e-9 per entry. So data-parallel workers (utils.dist),
each summing its share of the batches, give the solvers the float32 XᵀX one process would.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..utils.device import full_precision

KINDS = ("none", "norms", "xtx")


def _add_product_(acc: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    if u.dtype == acc.dtype:
        acc.addmm_(u.t(), v)
    else:  # 16-bit product (float32 inside the kernel), rounded once, summed in float32
        acc.add_(torch.mm(u.t(), v))


def _tri_(acc: torch.Tensor, x: torch.Tensor, a: int, b: int, leaf: int) -> None:
    if b - a <= leaf:
        _add_product_(acc[a:b, a:b], x[:, a:b], x[:, a:b])
        return
    m = (a + b) // 2
    _add_product_(acc[a:m, m:b], x[:, a:m], x[:, m:b])
    _tri_(acc, x, a, m, leaf)
    _tri_(acc, x, m, b, leaf)


def syrk_upper_(acc: torch.Tensor, x: torch.Tensor, leaf: int = 200) -> None:
    """acc += xᵀx on the upper triangle (the lower is filled by `symmetrize_`); acc is float32,
    x float32 or 16-bit (see the module docstring).

    XᵀX is symmetric and accumulating it is as costly as the forward pass itself, so only the
    upper triangle is computed: recursively, the off-diagonal half as one large matmul and the two
    diagonal halves the same way, down to full `leaf`-wide diagonal blocks. On 2 CPU cores at SmolLM2's
    widths (576, 1536) that took 13 and ~75 ms per 4096 rows against 21 and 108 ms for the full product.
    """
    _tri_(acc, x, 0, x.shape[1], leaf)


def symmetrize_(acc: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle onto the lower one (in place), making acc exactly symmetric."""
    upper = torch.triu(acc, 1)
    return acc.triu_().add_(upper.t())


@dataclasses.dataclass
class LinearStats:
    """Sums over calibration tokens of the inputs x (rows) of one Linear layer."""

    in_features: int
    want_xtx: bool
    _xtx: torch.Tensor | None = None  # Σ xᵀx, (in, in) float32, made from _acc when first read
    sqnorm: torch.Tensor | None = None  # Σ x², (in,) float32
    n: int = 0
    product_dtype: torch.dtype = torch.float32  # what one batch's XᵀX products are computed in
    _acc: torch.Tensor | None = None  # while accumulating: Σ xᵀx (upper triangle) or Σ x², float64

    def add(self, x: torch.Tensor) -> None:
        with full_precision(x.device):  # hooks run inside autocast forwards
            self._add(x)

    def _start(self, device) -> None:
        if self._xtx is not None:
            raise RuntimeError("statistics were read already; they take no more batches")
        if self._acc is None:
            shape = (self.in_features, self.in_features) if self.want_xtx else (self.in_features,)
            wide = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # MPS has no float64
            self._acc = torch.zeros(shape, dtype=wide, device=device)

    def _add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self._start(x.device)
        if self.want_xtx:  # this batch's product on its own, then into the float64 sum
            batch = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
            syrk_upper_(batch, x.to(self.product_dtype))
            self._acc += batch
        else:
            x = x.float()
            self._acc += (x * x).sum(0)
        self._sqnorm_from_sum()
        self.n += x.shape[0]

    def _sqnorm_from_sum(self) -> None:
        self.sqnorm = (torch.diagonal(self._acc) if self.want_xtx else self._acc).float()

    def reduce(self, device=None) -> "LinearStats":
        """Sum these statistics over the data-parallel ranks (utils.dist), in place; a rank whose
        batches never reached the layer takes part with zeros on `device`."""
        from ..utils.dist import reduce_, reduce_int

        self._start(device if self._acc is None else self._acc.device)
        reduce_(self._acc)
        self.n = reduce_int(self.n, "sum")
        self._sqnorm_from_sum()
        return self

    @classmethod
    def isotropic(cls, in_features: int, want_xtx: bool, device=None) -> "LinearStats":
        """Statistics of inputs that favour no direction (XᵀX/n = I): what a layer that calibration
        barely reached is compressed with. Every operator then becomes its data-free form (GPTQ:
        round to nearest on its grid; SparseGPT / Wanda: magnitude), and relative output errors
        become relative weight errors."""
        st = cls(in_features, want_xtx=want_xtx, n=1)
        st.sqnorm = torch.ones(in_features, dtype=torch.float32, device=device)
        if want_xtx:
            st._xtx = torch.eye(in_features, dtype=torch.float32, device=device)
        return st

    @property
    def xtx(self) -> torch.Tensor | None:
        if self._xtx is None and self.want_xtx and self._acc is not None:
            self._xtx = symmetrize_(self._acc).float()
            self._acc = None
        return self._xtx

    @property
    def hessian(self) -> torch.Tensor:
        """XᵀX / n: the layer-wise squared-error Hessian up to a factor 2."""
        if self.xtx is None:
            raise RuntimeError("XᵀX was not collected for this layer")
        return self.xtx / max(self.n, 1)

    @property
    def col_norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input column j (Wanda's activation norm)."""
        return self.sqnorm.sqrt()


class StatsCollector:
    """Hooks Linear layers and accumulates statistics of their inputs while a block runs.

    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator, so XᵀX is
    computed once per distinct input; who shares with whom is decided in the batch a layer is
    first reached (the first, except for experts the router skipped until then).
    Use as a context manager: hooks are removed on exit, whatever happens.
    """

    def __init__(self, modules: dict[str, nn.Module], kinds: dict[str, str],
                 product_dtype: torch.dtype = torch.float32):
        self.product_dtype = product_dtype
        self.modules = {n: m for n, m in modules.items() if kinds.get(n, "none") != "none"}
        self.kinds = kinds
        self.stats: dict[str, LinearStats] = {}
        self._owners: set[str] = set()
        self._seen: dict[tuple, tuple[torch.Tensor, LinearStats]] = {}
        self._handles: list = []

    def _hook(self, name: str):
        want_xtx = self.kinds[name] == "xtx"

        def hook(mod, args, out):
            x = args[0].detach()
            if name not in self.stats:  # first sight (an expert may first get tokens in a later batch)
                key = (x.data_ptr(), tuple(x.shape), x.dtype)
                prev = self._seen.get(key)
                if prev is not None and (prev[0] is x or torch.equal(prev[0], x)) and (prev[1].want_xtx or not want_xtx):
                    self.stats[name] = prev[1]
                    return
                st = LinearStats(x.shape[-1], want_xtx=want_xtx, product_dtype=self.product_dtype)
                self.stats[name] = st
                self._owners.add(name)
                self._seen[key] = (x, st)
            elif name not in self._owners:
                return
            self.stats[name].add(x)

        return hook

    def end_batch(self) -> None:
        """Call after each batch's forward pass."""
        self._seen.clear()

    def __enter__(self) -> "StatsCollector":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()


class StatsReducer:
    """Sums per-layer statistics over data-parallel ranks (utils.dist), one layer at a time, in the
    same layer order on every rank. Layers fed the same tensor share one LinearStats on a rank that
    saw them; a rank that saw no tokens for a layer cannot tell, so the ranks agree on the sharing
    first (any rank that saw the layer knows the earlier layer it shares with; all that saw it
    agree) and the shared sum is reduced once. For one process it returns the statistics as
    they are."""

    def __init__(self):
        self._local: list[LinearStats | None] = []
        self._global: list[LinearStats | None] = []

    def __call__(self, name: str, st: LinearStats | None, kind: str, module: nn.Module) -> LinearStats | None:
        from ..models.arch import get_weight
        from ..utils.dist import reduce_int, world

        if world()[1] == 1:
            return st
        share = -2 if st is None else next((j for j, s in enumerate(self._local) if s is st), -1)
        agreed = reduce_int(share, "max")
        if agreed >= 0:
            out = self._global[agreed]
        elif agreed == -2 or kind == "none":
            out = None
        else:
            w = get_weight(module)
            out = (st if st is not None else LinearStats(w.shape[1], want_xtx=(kind == "xtx"))).reduce(w.device)
        self._local.append(st)
        self._global.append(out)
        return out
