"""A source model on no GGML grid, for a fair GGUF comparison (`python bench/llamacpp.py --model fair`).

The default model ships as a Q4_1 GGUF: its weights are exactly on the Q4_1 grid, so a search that
keeps Q4_1 loses nothing and llama.cpp's presets, which requantize, look worse than they are. No
registry package this project can fetch ships a small Llama-family model in 16 or 32 bits (PyPI,
npm and Debian were searched), so one is derived in two steps:
1. smollm2-135m fine-tuned with AdamW on the `wiki` corpus (Wikipedia article summaries: neither a
   calibration source of the GGUF table nor an evaluation domain): new float information, but 150
   steps move the weights only a little (measured: Q4_1 error still 0.06x Q4_0's);
2. every Linear layer's input channels rescaled by random factors in [0.78, 1.28] that the model
   undoes exactly (the RMSNorm gains, v/o, up/down and q/k pairs absorb the inverse), so it computes
   the same function while no 32-weight block lies on a common grid any more.
Weights saved in float32. `grid_distance` says how far they are from the Q4_1 grid: the Q4_1
round-to-nearest error relative to Q4_0's (0 for the shipped model; near 1 for weights on no grid,
Q4_1 having one more parameter per block).

    python bench/fair_source.py      # derives it once into .bench_cache/, prints the grid distance
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from common import SCRATCH

import modelpress as mp
from modelpress.models.arch import Arch, get_weight
from modelpress.ops.ggmlweight import GGMLWeight
from modelpress.utils.device import fast_bf16

TUNED = SCRATCH / "smollm2-135m-wiki-ft"
FAIR = SCRATCH / "smollm2-135m-wiki-ft-rescaled"
SETTINGS = dict(steps=150, lr=3e-4, batch=4, seq_len=512, warmup=10, seed=0)
log = logging.getLogger("fair_source")


def derive(out: Path = FAIR, seed: int = 0) -> Path:
    """The fine-tuned, rescaled float32 model folder (made once; a finished folder is reused)."""
    import json

    if (out / "finetune.json").is_file():
        return out
    model, tok = mp.load_model(str(finetune()), device="cpu")
    ids = mp.get_windows(tok, mp.DataConfig(corpus="pydoc", n_samples=2, seq_len=128)).calib
    with torch.no_grad():
        before = model(ids).logits
        rescale_channels(model, seed)
        after = model(ids).logits
    change = float((after - before).abs().max() / before.abs().max())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = json.loads((finetune() / "finetune.json").read_text())
    (tmp / "finetune.json").write_text(json.dumps({**info, **grid_distance(model), "rescaled": True,
                                                   "max_logit_change_by_rescaling": change}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def finetune(out: Path = TUNED, **overrides) -> Path:
    """smollm2-135m after SETTINGS' AdamW steps on `wiki`, float32 (made once)."""
    s = {**SETTINGS, **overrides}
    if (out / "finetune.json").is_file():
        return out
    torch.manual_seed(s["seed"])
    model, tok = mp.load_model("smollm2-135m", device="cpu")
    ids = mp.get_windows(tok, mp.DataConfig(corpus="wiki", n_samples=s["steps"] * s["batch"], seq_len=s["seq_len"],
                                            seed=s["seed"])).calib
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s["warmup"]))
    model.train()
    losses, t0 = [], time.time()
    for step in range(s["steps"]):
        batch = ids[step * s["batch"]:(step + 1) * s["batch"]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16("cpu")):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == s["steps"] - 1:
            print(f"step {step} loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    import json

    (tmp / "finetune.json").write_text(json.dumps({**s, "corpus": "wiki", "losses": losses,
                                                   "seconds": time.time() - t0, **grid_distance(model)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@torch.no_grad()
def rescale_channels(model, seed: int = 0, spread: float = 0.25) -> None:
    """Multiply every Linear layer's input channels by random factors exp(U(-spread, spread)) and undo
    them where the model allows it exactly: the RMSNorm gains before q/k/v and gate/up, v's rows
    before o, up's rows before down, and k's rows against q's (the same factor for both halves of a
    rotary pair, and for every q head sharing a k head)."""
    g = torch.Generator().manual_seed(seed)

    def factors(n):
        return torch.exp((torch.rand(n, generator=g) * 2 - 1) * spread)

    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        s = factors(c.hidden_size)  # attention input
        layer.input_layernorm.weight.div_(s)
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            lin.weight.mul_(s)
        s = factors(c.hidden_size)  # MLP input
        layer.post_attention_layernorm.weight.div_(s)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.mul_(s)
        s = factors(c.num_key_value_heads * hd)  # v's outputs, o's inputs (every q head of a group)
        at.v_proj.weight.div_(s[:, None])
        at.o_proj.weight.mul_(s.view(c.num_key_value_heads, 1, hd).expand(-1, group, -1).reshape(-1))
        s = factors(c.intermediate_size)  # up's outputs, down's inputs
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        half = factors(c.num_key_value_heads * hd // 2).view(c.num_key_value_heads, hd // 2)
        s = torch.cat([half, half], dim=1)  # rotate_half pairs dimension i with i + hd/2
        at.k_proj.weight.div_(s.reshape(-1)[:, None])
        at.q_proj.weight.mul_(s[:, None, :].expand(-1, group, -1).reshape(-1)[:, None])


@torch.no_grad()
def grid_distance(model) -> dict:
    """Q4_1 and Q4_0 round-to-nearest relative errors over every Linear weight, and their ratio."""
    err = {"Q4_1": 0.0, "Q4_0": 0.0}
    norm = 0.0
    for mod in Arch(model).all_linears().values():
        w = get_weight(mod).float()
        norm += float((w * w).sum())
        for t in err:
            err[t] += float(((GGMLWeight.quantize(w, t).dequantize() - w) ** 2).sum())
    return {"q4_1_rel_error": err["Q4_1"] / norm, "q4_0_rel_error": err["Q4_0"] / norm,
            "q4_1_over_q4_0": err["Q4_1"] / err["Q4_0"]}


if __name__ == "__main__":
    import json

    path = derive()
    print(path, json.dumps({k: v for k, v in json.loads((path / "finetune.json").read_text()).items()
                            if k != "losses"}))
