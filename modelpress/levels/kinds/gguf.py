"""gguf: units = Linear layers and the embedding (and an untied output head); levels = llama.cpp
(GGML) tensor types, each with its exact bytes in the GGUF file."""
from __future__ import annotations

import dataclasses

from ...errors import ConfigError
from ...models.arch import Arch, get_weight
from ...ops.base import output_error
from ..build import on_dense_inputs
from .base import KINDS, Kind, UnitInfo, pareto


IMATRIX = "+imatrix"  # suffix of a level quantized with the layer's importance matrix
GPTQ = "+gptq"  # suffix of a level whose codes GPTQ chose on the type's grid


def ggml_type(level: str) -> str:
    """The GGML type a gguf level stores ("Q4_K+imatrix" -> "Q4_K")."""
    return level.removesuffix(IMATRIX).removesuffix(GPTQ)


@KINDS.register("gguf")
@dataclasses.dataclass
class GGUFKind(Kind):
    """Levels are llama.cpp (GGML) tensor types, each with its exact bytes in the GGUF file. A unit
    only gets the types its row width allows (K-quants need multiples of 256 weights per row).
    The input embedding is a unit too (it is a fifth of a small model's file).

    `imatrix`: every Linear layer also gets each type quantized with llama.cpp's quantizer weighted
    by the layer's importance matrix (the mean x² per input column over the calibration windows, on
    the dense model's inputs), as `llama-quantize --imatrix` does: level "Q4_K+imatrix" beside
    "Q4_K", the same bytes, so the search keeps whichever quantizer errs less (the other is
    dominated). The embedding gets none (llama.cpp has none for it: it is no matmul input), nor does
    an untied output head (the block-by-block pass does not see its inputs).

    `gptq`: every Linear layer also gets each type with its codes chosen by GPTQ on that type's grid
    ("Q4_K+gptq", ops/quant/gptq_ggml.py; the K-quants' scales are ggml's, weighted by the layer's
    importance): llama.cpp decodes it exactly, but its own quantizer cannot make it (the
    llama-quantize recipe lists such tensors)."""

    types: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
    embedding: bool = True
    imatrix: bool = False
    gptq: bool = False

    budgets = ("mb",)
    options = {"types": "types", "imatrix": "imatrix", "gptq": "gptq"}
    legacy = {"imatrix": False, "gptq": False}
    ylabel = "GGML type"
    streams = False  # its fixed bytes and its file come from a GGUF export of the model held in memory

    def __post_init__(self) -> None:
        from ...ops import ggml

        self.types = tuple(ggml.qtype(t).name for t in self.types)
        if self.imatrix and ggml.backend() != "llama.cpp (ggml)":
            raise ConfigError("--imatrix levels need llama.cpp's library, which is unavailable here (the log says "
                              "why); set MODELPRESS_LLAMA_CPP_LIB to a llama.cpp build's libraries")

    def discover(self, model) -> list[UnitInfo]:
        out = []
        if self.embedding:
            from ...export.ggufio import embedding_name

            arch = Arch(model)
            emb = model.get_input_embeddings()
            out.append(UnitInfo(embedding_name(model), tuple(emb.weight.shape), emb.weight.numel(), 0, "embedding"))
            head = model.get_output_embeddings()
            if head is not None and head.weight is not emb.weight:  # an untied lm_head is stored as output.weight
                name = next(n for n, m in model.named_modules() if m is head)
                out.append(UnitInfo(name, tuple(head.weight.shape), head.weight.numel(), len(arch) - 1, "output"))
        return out + super().discover(model)

    def unit_extra(self, name: str, model) -> dict:
        from ...export.ggufio import unit_heads

        return {"heads": unit_heads(name, model)}

    def fixed_bytes(self, model, units, tokenizer=None) -> int:
        from ...export.ggufio import check_architecture, gguf_fixed_bytes

        check_architecture(model)
        return gguf_fixed_bytes(model, {u.name: u.shape for u in units}, tokenizer)

    def values(self, unit: UnitInfo) -> list:
        from ...ops import ggml
        from ...ops.quant.gptq_ggml import GGMLGPTQ

        ok = [t for t in self.types if ggml.supported(ggml.qtype(t), unit.shape[1])]
        if not ok:
            raise ConfigError(f"none of the GGML types {self.types} can store {unit.name} "
                              f"(rows of {unit.shape[1]} weights)")
        if unit.group not in ("embedding", "output"):
            ok += [t + IMATRIX for t in ok if self.imatrix] + [t + GPTQ for t in ok if self.gptq and t in GGMLGPTQ.TYPES]
        return sorted(ok, key=lambda t: (ggml.bytes_per_row(ggml.qtype(ggml_type(t)), unit.shape[1]), t))

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        return pareto(built)

    def build(self, db, model, windows, batch_size, device) -> None:
        from ...ops.ggmlweight import GGMLWeight
        from ...ops.quant.gptq_ggml import GGMLGPTQ
        from ...utils.dist import share

        missing = db.missing()
        mods = dict(model.named_modules())
        # data-parallel workers (utils.dist): each quantizes and writes its share
        for u in share([u for u in missing if db.units[u].group in ("embedding", "output")]):
            w = get_weight(mods[u]).float()
            new = {}
            for t in missing[u]:
                gw = GGMLWeight.quantize(w, t)
                new[t] = (gw, float(((gw.dequantize() - w) ** 2).sum() / (w ** 2).sum()))
            db.add_levels(u, new)

        def per_layer(n, mod, st, want) -> None:
            w = get_weight(mod).float()
            importance = (st.sqnorm / max(st.n, 1)).float().cpu()  # mean x² per input column
            new = {}
            heads = db.units[n].extra.get("heads")
            for v in want:
                if v.endswith(GPTQ):
                    gw = GGMLGPTQ(type=ggml_type(v), heads=heads).compress(w, st)
                else:
                    gw = GGMLWeight.quantize(w, ggml_type(v), heads=heads,
                                             imatrix=importance if v.endswith(IMATRIX) else None)
                new[v] = (gw, output_error(w, gw.dequantize().to(w.device), st.hessian))
            db.add_levels(n, new)

        on_dense_inputs(db, model, windows, batch_size, device, "database gguf", per_layer)


def plan_for_types(db, types: dict[str, str]):
    """A gguf plan storing each unit as the GGML type `types` gives it (unit name -> type, e.g. what
    a llama.cpp preset chose: `types_of_file`), with the database's most accurate level of that
    type (plain, +imatrix or +gptq, whichever survived); where every level of the type was
    dominated, the most accurate usable level costing no more. A search scores it among its
    candidate starts (`search.allocate(starts=)`)."""
    from ...allocate.plan import Plan

    missing = [u for u in db.units if u not in types]
    if missing:
        raise ConfigError(f"no GGML type given for {len(missing)} units, e.g. {missing[0]} (a file of another model?)")
    levels = {}
    for u in db.units:
        usable = {v: db.level_meta(u, v) for v in db.values(u)}
        same = [v for v in usable if ggml_type(v) == types[u].upper()]
        if not same:
            from ...ops import ggml

            nbytes = ggml.bytes_per_row(ggml.qtype(types[u]), db.units[u].shape[1]) * db.units[u].shape[0]
            same = [v for v, m in usable.items() if m["nbytes"] <= nbytes] or [min(usable, key=lambda v: usable[v]["nbytes"])]
        levels[u] = min(same, key=lambda v: usable[v]["error"])
    return Plan(kind="gguf", levels=levels)


def types_of_file(model, path) -> dict[str, str]:
    """Unit name -> GGML type of the matrix a GGUF file (e.g. a llama.cpp preset made from this
    model) stores for it."""
    from ...export.ggufio import gguf_names
    from ...export.llamacpp import tensor_types

    stored = tensor_types(path)
    types = {u: stored[g] for u, g in gguf_names(model).items() if g in stored}
    if not types:
        raise ConfigError(f"{path} stores none of the model's matrices; give a GGUF file made from this model "
                          "(e.g. by `modelpress export gguf MODEL --preset Q4_K_M`)")
    return types
