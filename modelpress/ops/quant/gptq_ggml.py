"""GPTQ on a llama.cpp grid: the codes of a legacy block-32 GGML type (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0) chosen column by column with the OBS error update, each block's d (and m) fixed by ggml's
own rule on the columns as the sweep has updated them. The result is stored in the type's exact
bytes, so llama.cpp decodes what was evaluated; a GGUF file holds it like any other tensor."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from .. import ggml
from ..base import OPERATORS, WeightOperator
from ..ggmlweight import GGMLWeight, to_gguf_rows
from ..obs import obs_sweep, shrink_hessian


@OPERATORS.register("gptq-ggml")
@dataclasses.dataclass
class GGMLGPTQ(WeightOperator):
    type: str = "Q4_0"
    damp: float = 0.01
    shrink: float = 0.1  # H blended with its diagonal, as GPTQ's default
    heads: int | None = None  # q/k rows in llama.cpp's rotary order (set by the GGUF level builder)

    stats: ClassVar[str] = "xtx"

    def __post_init__(self) -> None:
        self.type = self.type.upper()
        if self.type not in ggml.LEGACY_GRID:
            raise ConfigError(f"GPTQ on a GGML grid takes {', '.join(ggml.LEGACY_GRID)}, not {self.type!r}")

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> GGMLWeight:
        if weight.shape[1] % 32:
            raise ConfigError(f"{self.type} stores rows of whole 32-weight blocks, not {weight.shape[1]}")
        rows = to_gguf_rows(weight.float(), self.heads) if self.heads else weight.float()  # rows are independent
        res = obs_sweep(rows, shrink_hessian(stats.hessian, self.shrink), ggml_type=self.type, damp=self.damp)
        m = res.zeros.cpu().numpy() if self.type.endswith("_1") else None
        data = ggml.encode_legacy(self.type, res.scales.cpu().numpy(), m, res.codes.cpu().numpy())
        return GGMLWeight(shape=tuple(weight.shape), type=self.type, data=torch.from_numpy(data), heads=self.heads,
                          chosen_by="gptq")

    def label(self) -> str:
        return f"gptq {self.type}"
