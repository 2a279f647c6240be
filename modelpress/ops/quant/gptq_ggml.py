"""GPTQ on a llama.cpp grid: the codes of a GGML type chosen column by column with the OBS error
update. Legacy block-32 types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) get each block's d (and m) from
ggml's rule; K-quants (Q2_K … Q6_K) get each super-block's scale bytes from ggml's own quantizer,
weighted by the layer's input energy (what an importance matrix holds) unless `importance` is off;
both on the columns as the sweep has updated them (ops/ggml_grids.py). The result is stored in the
type's exact bytes, so llama.cpp decodes what was evaluated; a GGUF file holds it like any other
tensor."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from .. import ggml_grids
from ..base import OPERATORS, WeightOperator
from ..ggmlweight import GGMLWeight, to_gguf_rows
from ..obs import obs_sweep, shrink_hessian


@OPERATORS.register("gptq-ggml")
@dataclasses.dataclass
class GGMLGPTQ(WeightOperator):
    type: str = "Q4_0"
    damp: float = 0.01
    shrink: float = 0.1  # H blended with its diagonal, as GPTQ's default
    importance: bool = True  # K-quant scales weighted by diag(XᵀX/n), as llama-quantize --imatrix
    heads: int | None = None  # q/k rows in llama.cpp's rotary order (set by the GGUF level builder)

    stats: ClassVar[str] = "xtx"
    TYPES: ClassVar[tuple[str, ...]] = (*ggml_grids.LEGACY_GRID, *ggml_grids.KQUANT_CODE_BITS)

    def __post_init__(self) -> None:
        self.type = self.type.upper()
        if self.type not in self.TYPES:
            raise ConfigError(f"GPTQ on a GGML grid takes {', '.join(self.TYPES)}, not {self.type!r}")

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> GGMLWeight:
        rows = to_gguf_rows(weight.float(), self.heads) if self.heads else weight.float()  # rows are independent
        h = stats.hessian  # a new tensor (XᵀX / n): the sweep may overwrite it
        importance = torch.diagonal(h).float().cpu().numpy() if self.importance else None
        grid = ggml_grids.grid(self.type, *rows.shape, importance=importance, device=rows.device)
        res = obs_sweep(rows, shrink_hessian(h, self.shrink, inplace=True), grid=grid, damp=self.damp, own_h=True)
        data = grid.encode(res.codes.cpu().numpy())
        return GGMLWeight(shape=tuple(weight.shape), type=self.type, data=torch.from_numpy(data), heads=self.heads,
                          chosen_by="gptq")

    def label(self) -> str:
        return f"gptq {self.type}"
