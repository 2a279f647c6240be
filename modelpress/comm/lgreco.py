"""L-GreCo (Markov et al., 2024): layer-wise compression levels re-chosen every `every` steps.

For every layer and candidate level (Top-K ratio, QSGD bits, PowerSGD rank), the compression error
‖x − C(x)‖² is measured on the tensor error feedback is about to compress; the tables are summed
over workers (so all pick the same levels). Dynamic programming then minimises the total bytes
subject to total error ≤ the error of the uniform (default) level.

`relative=True` measures each layer's error relative to its own norm, ‖x − C(x)‖² / ‖x‖², instead
of in absolute terms: with adaptive optimizers (Adam) a layer's update does not scale with its
gradient's size, so an absolutely small error can still move that layer a lot.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import ConfigError
from .compressors.powersgd import PowerSGD


@dataclasses.dataclass
class LGreCo:
    levels: tuple  # candidate values of the compressor's level field
    every: int = 50
    bins: int = 2000  # resolution of the error budget in the dynamic program
    relative: bool = False  # per-layer errors divided by the layer's squared norm

    def __post_init__(self):
        self.levels = tuple(self.levels)
        if len(self.levels) < 2 or self.every < 1:
            raise ConfigError("L-GreCo needs at least two levels and every >= 1")

    def table(self, compressor, xs: dict[str, torch.Tensor]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, errors[layer, level], bytes[layer, level]) on this worker."""
        names = list(xs)
        err = np.zeros((len(names), len(self.levels)))
        size = np.zeros_like(err)
        for i, n in enumerate(names):
            x = xs[n]
            for j, lv in enumerate(self.levels):
                c = compressor.with_level(lv)
                if isinstance(c, PowerSGD):
                    err[i, j] = c.local_error(x)
                    size[i, j] = c.nbytes_for(x)
                else:
                    payload = c.compress(x, {"key": i, "step": 0})
                    err[i, j] = float(((x - c.decompress(payload, x, {"key": i, "step": 0})) ** 2).sum())
                    size[i, j] = c.nbytes(payload)
            if self.relative:
                err[i] /= max(float((x.float() ** 2).sum()), 1e-30)
        return names, err, size

    def solve(self, err: np.ndarray, size: np.ndarray, base: int) -> list[int]:
        """Level index per layer: minimal total bytes with total error <= that of level `base` everywhere."""
        budget = err[:, base].sum()
        n, m = err.shape
        if budget <= 0:
            return [int(np.argmin(size[i])) for i in range(n)]
        w = np.ceil(err / budget * self.bins).astype(int)  # rounding up keeps the error bound
        inf = float("inf")
        best = np.full(self.bins + 1, inf)
        best[0] = 0.0
        arg = np.zeros((n, self.bins + 1), dtype=np.int32)
        for i in range(n):
            new = np.full(self.bins + 1, inf)
            for j in range(m):
                if w[i, j] > self.bins:
                    continue
                cand = np.full(self.bins + 1, inf)
                cand[w[i, j]:] = best[: self.bins + 1 - w[i, j]] + size[i, j]
                better = cand < new
                new[better] = cand[better]
                arg[i][better] = j
            best = new
        if not np.isfinite(best).any():
            return [base] * n
        c = int(np.argmin(best))
        choice = [0] * n
        for i in range(n - 1, -1, -1):
            j = int(arg[i][c])
            choice[i] = j
            c -= w[i, j]
        return choice
