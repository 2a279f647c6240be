"""The plan on paper for models far larger than this machine: Llama-3-70B and Qwen3-235B-A22B (MoE).

Measures, on this machine, the rate of the three kinds of work a compression pipeline does —
decoder-block forwards (compute dtype), XᵀX accumulation, and GPTQ's solve — on one random Llama
block 2048 wide (MLP 5632), and fits each to its FLOP count. Then it derives, from the published
shapes of the two models, the FLOPs, memory, disk and time of every stage: calibration forwards,
XᵀX, the level database's solves and size, the evolutionary search's fitness (EvoPress's
published settings), on this CPU at the measured rates and on H100s at stated assumed rates,
and how many H100s a search needs to finish in a day. Writes docs/scale.md (all of it from the
measured rates in bench/results/scale_plan.json and the arithmetic below) and a table of the
rates in docs/benchmarks.md.

    python bench/scale_plan.py [--force] [--render]
"""
from __future__ import annotations

import math
import time

from common import ROOT, RowCache, bench_args, machine, print_table, write_section

# published config.json shapes
MODELS = {
    "Llama-3-70B": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, head_dim=128, vocab=128256,
                        experts=0, topk=0, expert_inter=0),
    "Qwen3-235B-A22B (MoE)": dict(hidden=4096, inter=0, layers=94, heads=64, kv=4, head_dim=128, vocab=151936,
                                  experts=128, topk=8, expert_inter=1536),
}
CALIB_TOKENS = 128 * 2048  # calibration windows x length, as GPTQ / EvoPress use at this scale
LEVELS = (2, 3, 4, 5, 6)  # EvoPress's quantization database: GPTQ 2..6 bits, group 128
GROUP = 128
# EvoPress's published search: 150 generations, 128 offspring, survivors 16/4/1 on 2k/16k/131k tokens
GENERATIONS, OFFSPRING, STAGES = 150, 128, ((2048, 16), (16384, 4), (131072, 1))
# H100 SXM rates assumed (not measured: no GPU was lent): bf16 dense peak 989 TFLOP/s, FP32 67
GPU = {"forward": 400e12, "xtx": 400e12, "solve": 30e12, "memory_gb": 80, "note":
       "bf16 matmuls at 40% of the 989 TFLOP/s dense peak, GPTQ's float32 solve at 45% of 67 TFLOP/s"}
DAY = 86400.0


def measure() -> dict:
    """Rates on this machine, each the best of 3 runs after a warm-up."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from modelpress.calib.stats import LinearStats
    from modelpress.ops import OPERATORS
    from modelpress.utils.device import forward_dtype_name, forwards

    torch.manual_seed(0)
    d, f, T, B = 2048, 5632, 512, 4
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=16, num_key_value_heads=4,
                      num_hidden_layers=1)
    block = LlamaDecoderLayer(cfg, 0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    h = torch.randn(B, T, d)
    pos = rope(h, torch.arange(T)[None].expand(B, T))

    def best(fn, n=3) -> float:
        fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    def fwd():
        with torch.no_grad(), forwards(block):
            block(h, position_embeddings=pos, attention_mask=None)

    params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    fwd_flops = B * T * (2 * params + 2 * T * 16 * 128)  # matmuls + causal attention (scores and values)
    t_fwd = best(fwd)

    x = torch.randn(B * T, f)
    product = torch.bfloat16 if forward_dtype_name(block) == "bfloat16" else torch.float32

    def xtx():
        st = LinearStats(f, want_xtx=True, product_dtype=product)
        st.add(x)
        st.xtx

    t_xtx = best(xtx)
    xtx_flops = B * T * f * f  # the upper triangle of a 2·n·d² product

    solves = {}
    for d_out, d_in in ((2048, 2048), (2048, 5632)):
        w = torch.randn(d_out, d_in) / math.sqrt(d_in)
        st = LinearStats(d_in, want_xtx=True)
        st.add(torch.randn(4096, d_in))
        op = OPERATORS.build("gptq", bits=4, group_size=GROUP)
        solves[f"{d_out}x{d_in}"] = (best(lambda: op.compress(w, st), n=2), 2 * d_out * d_in ** 2)
    t_solve = sum(t for t, _ in solves.values())
    solve_flops = sum(fl for _, fl in solves.values())
    return {"forward_flops_s": fwd_flops / t_fwd, "xtx_flops_s": xtx_flops / t_xtx,
            "solve_flops_s": solve_flops / t_solve, "compute_dtype": forward_dtype_name(block),
            "forward_s": t_fwd, "xtx_s": t_xtx, "solves_s": {k: t for k, (t, _) in solves.items()},
            "threads": torch.get_num_threads(), "machine": machine()}


def shapes(m: dict) -> dict:
    """Per block: its Linear layers as (d_out, d_in, share of the calibration tokens they see)."""
    d, hd = m["hidden"], m["head_dim"]
    q, kv = m["heads"] * hd, m["kv"] * hd
    layers = [(q, d, 1.0), (kv, d, 1.0), (kv, d, 1.0), (d, q, 1.0)]
    if m["experts"]:
        share = m["topk"] / m["experts"]  # each expert sees its routed share of the tokens
        e = m["expert_inter"]
        layers += [(e, d, share), (e, d, share), (d, e, share)] * m["experts"]
    else:
        layers += [(m["inter"], d, 1.0), (m["inter"], d, 1.0), (d, m["inter"], 1.0)]
    return {"layers": layers}


def plan(m: dict, rates: dict) -> dict:
    blocks = m["layers"]
    lin = shapes(m)["layers"]
    params_block = sum(o * i for o, i, _ in lin)
    active_block = sum(o * i * s for o, i, s in lin)
    embed = 2 * m["vocab"] * m["hidden"]
    total = blocks * params_block + embed
    active = blocks * active_block + embed
    attn_per_token = 2 * 2048 * m["heads"] * m["head_dim"] * blocks  # causal, 2048-token windows
    # XᵀX per calibration token: one per distinct input (q/k/v share one, gate/up share one); an
    # expert's inputs only for the tokens routed to it (top-k of E)
    q = m["heads"] * m["head_dim"]
    if m["experts"]:
        xtx_per_token = m["hidden"] ** 2 + q ** 2 + m["topk"] * (m["hidden"] ** 2 + m["expert_inter"] ** 2)
    else:
        xtx_per_token = m["hidden"] ** 2 + q ** 2 + m["hidden"] ** 2 + m["inter"] ** 2
    n = CALIB_TOKENS
    fwd = n * (2 * active + attn_per_token)
    xtx = n * blocks * xtx_per_token
    solve_level = blocks * sum(2 * o * i * i for o, i, _ in lin)
    solves = solve_level * len(LEVELS)
    bits = sum(b + (16 + b) / GROUP for b in LEVELS)  # codes + fp16 scale and b-bit zero per group
    db_bytes = blocks * params_block * bits / 8
    per_gen = sum(tok * keep_in for (tok, _), keep_in in zip(STAGES, (OFFSPRING,) + tuple(s for _, s in STAGES[:-1])))
    per_gen += STAGES[-1][0]  # the parent competes in the last stage
    search_tokens = GENERATIONS * per_gen
    search = search_tokens * (2 * active + attn_per_token)
    weights_bf16 = 2 * total
    largest_in = max(i for _, i, _ in lin)
    acts = n * m["hidden"] * 2 * 2  # a block's calibration inputs and outputs, bf16
    out = {"total_params": total, "active_params": active, "calib_fwd": fwd, "xtx": xtx, "solves": solves,
           "db_bytes": db_bytes, "search_tokens": search_tokens, "search": search, "weights_bf16": weights_bf16,
           "xtx_bytes": largest_in ** 2 * (4 + 8), "acts_bytes": acts,
           "block_bytes": 2 * params_block}
    for where, r in (("cpu", rates), ("gpu", {"forward_flops_s": GPU["forward"], "xtx_flops_s": GPU["xtx"],
                                              "solve_flops_s": GPU["solve"]})):
        out[f"{where}_calib_s"] = fwd / r["forward_flops_s"] + xtx / r["xtx_flops_s"]
        out[f"{where}_db_s"] = out[f"{where}_calib_s"] + solves / r["solve_flops_s"]
        out[f"{where}_search_s"] = search / r["forward_flops_s"]
        out[f"{where}_candidate_s"] = STAGES[0][0] * (2 * active + attn_per_token) / r["forward_flops_s"]
    replica = math.ceil(weights_bf16 * 1.1 / (GPU["memory_gb"] * 1e9))  # weights + 10% for activations, decoded levels
    # a replica's GPUs share its forwards (pipeline / tensor parallel): GPU time / GPUs per day
    replicas = max(1, math.ceil(out["gpu_search_s"] / (replica * DAY)))
    out.update(gpus_per_replica=replica, replicas=replicas, gpus_day=replica * replicas)
    return out


def _h(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * DAY:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY:,.0f} days"


def main() -> None:
    args = bench_args(__doc__)
    cache = RowCache("scale_plan", force=args.force)
    if not args.render and not cache.get("rates"):
        cache.put("rates", measure())
    render(cache.everything())


def render(cache: RowCache) -> None:
    r = cache.get("rates")
    if not r:
        return
    rates_md = print_table([{"what": "decoder-block forward (2048 wide, MLP 5632, 4 x 512 tokens)",
                             "gflops": r["forward_flops_s"] / 1e9, "s": r["forward_s"]},
                            {"what": "XᵀX of 2048 x 5632 inputs (products in the compute dtype, float64 sum)",
                             "gflops": r["xtx_flops_s"] / 1e9, "s": r["xtx_s"]},
                            {"what": "GPTQ 4-bit g128 solve, 2048x2048 + 2048x5632", "gflops": r["solve_flops_s"] / 1e9,
                             "s": sum(r["solves_s"].values())}],
                           [("what", "work"), ("gflops", "GFLOP/s"), ("s", "seconds")])
    write_section("scale_plan", "## Rates behind the plan on paper (`bench/scale_plan.py`, docs/scale.md)\n\n"
                  f"Compute dtype {r['compute_dtype']}, {r['threads']} threads. Machine: {r['machine']}.\n\n" + rates_md)
    rows, detail = [], []
    for name, m in MODELS.items():
        p = plan(m, r)
        rows.append({"model": name, "params": f"{p['total_params'] / 1e9:.1f}B ({p['active_params'] / 1e9:.1f}B active)",
                     "weights": f"{p['weights_bf16'] / 1e9:.0f} GB", "db": f"{p['db_bytes'] / 1e9:.0f} GB",
                     "cpu_db": _h(p["cpu_db_s"]), "gpu_db": _h(p["gpu_db_s"]),
                     "cand": _h(p["gpu_candidate_s"]), "cpu_search": _h(p["cpu_search_s"]),
                     "gpu_search": _h(p["gpu_search_s"]), "gpus": f"{p['gpus_day']} ({p['replicas']} x {p['gpus_per_replica']})"})
        detail.append(
            f"### {name}\n\n"
            f"- Weights: {p['total_params'] / 1e9:.1f}B parameters ({p['active_params'] / 1e9:.1f}B per token), "
            f"{p['weights_bf16'] / 1e9:.0f} GB in bf16; one decoder block {p['block_bytes'] / 1e9:.2f} GB.\n"
            f"- Streamed compression (`compress --stream`) holds one block, its calibration inputs and outputs "
            f"({p['acts_bytes'] / 1e9:.1f} GB for {CALIB_TOKENS:,} tokens in bf16) and the largest layer's XᵀX with "
            f"its float64 sum ({p['xtx_bytes'] / 1e9:.1f} GB): about "
            f"{(p['block_bytes'] + p['acts_bytes'] + p['xtx_bytes']) / 1e9:.0f} GB, whatever the model's size.\n"
            f"- Calibration: forwards {p['calib_fwd'] / 1e15:,.1f} PFLOP, XᵀX {p['xtx'] / 1e15:,.1f} PFLOP; "
            f"the database's {len(LEVELS)} levels' GPTQ solves {p['solves'] / 1e15:,.1f} PFLOP. "
            f"Level database (GPTQ {LEVELS[0]}..{LEVELS[-1]} bits, g{GROUP}): {p['db_bytes'] / 1e9:,.0f} GB on disk. "
            f"Built in {_h(p['cpu_db_s'])} on this CPU, {_h(p['gpu_db_s'])} on one H100 (assumed rates; "
            f"writing {p['db_bytes'] / 1e9:,.0f} GB at ~2 GB/s adds {_h(p['db_bytes'] / 2e9)}).\n"
            f"- Search: {GENERATIONS} generations x ({OFFSPRING} offspring on {STAGES[0][0]:,} tokens, "
            + ", ".join(f"{k} on {t:,}" for (t, _), k in zip(STAGES[1:], (s for _, s in STAGES[:-1])))
            + f", the parent on {STAGES[-1][0]:,}) = {p['search_tokens'] / 1e6:,.0f}M token forwards, "
            f"{p['search'] / 1e18:,.1f} EFLOP: {_h(p['cpu_search_s'])} on this CPU, {_h(p['gpu_search_s'])} of H100 "
            f"time. One first-stage candidate costs {_h(p['gpu_candidate_s'])} on an H100 "
            f"({_h(p['cpu_candidate_s'])} here). A replica of the model needs {p['gpus_per_replica']} H100s (bf16 "
            f"weights + 10%); offspring are scored across replicas (`--workers`), so a search inside a day takes "
            f"{p['replicas']} replica(s): **{p['gpus_day']} H100s**.\n")
    table = print_table(rows, [("model", "model"), ("params", "parameters"), ("weights", "bf16 weights"),
                               ("db", "level database"), ("cpu_db", "database: this CPU"),
                               ("gpu_db", "database: 1 H100"), ("cand", "one candidate (2k tokens), H100"),
                               ("cpu_search", "search: this CPU"), ("gpu_search", "search: H100 time"),
                               ("gpus", "H100s for a 1-day search (replicas x per replica)")])
    text = (
        "# Compressing 70B and 200B+ models: the plan on paper\n\n"
        "Written by `bench/scale_plan.py` from rates measured on this machine (the table `scale_plan` in "
        "docs/benchmarks.md) and the published shapes of the models. GPU figures use assumed H100 rates — "
        f"{GPU['note']} — since no GPU was lent to measure them; FLOPs, bytes and the CPU times are computed from "
        "the measurements. Measured here: "
        f"block forwards {r['forward_flops_s'] / 1e9:.0f} GFLOP/s ({r['compute_dtype']}), XᵀX "
        f"{r['xtx_flops_s'] / 1e9:.0f} GFLOP/s, GPTQ solves {r['solve_flops_s'] / 1e9:.0f} GFLOP/s. "
        f"Calibration: {CALIB_TOKENS:,} tokens (128 x 2048). Database: GPTQ at {len(LEVELS)} bit-widths, one "
        "shared true-sequential pass (`--sequential-level`), so one calibration pass plus one solve per level "
        "and layer. Search: EvoPress's published settings.\n\n"
        + table + "\n\n"
        "What the arithmetic says:\n\n"
        "- The database is cheap in compute and expensive in disk: hours of solves on one GPU at most, but "
        "hundreds of GB to write; build it streamed (one block at a time) and keep it on local NVMe. The "
        "fitness of a model in memory reads only the levels a mutation changes.\n"
        "- The search is the cost, and it is forwards only: it scales with tokens x active parameters, so a "
        "MoE with few active parameters searches faster than a dense model of its total size, but needs "
        "more GPUs to hold one replica (and the H100 rate assumed for its expert matmuls, which are small and "
        "routed, is optimistic). Fitness forwards need no gradients and tolerate bf16, and offspring are "
        "independent, which is what `--workers` splits.\n"
        "- Calibration memory does not grow with depth when streamed: one block, its activations and one "
        "XᵀX. MoE experts each see only their routed share of the tokens (top-8 of 128 here: 1/16), which "
        "is why under-fed experts get isotropic statistics (README, mixture-of-experts).\n"
        "- A model that does not fit one device is searched streamed (`search --stream`, `compress --target-bits "
        "--stream`): the database is built block by block, and every fitness forward brings each block in from "
        "disk as it reaches it, the candidate's levels put in then. It holds one block at a time, the fitness windows' "
        "hidden states, a cache of packed levels (at most 256 MB) and, as in memory, the dense reference: the "
        "fitness keeps top-512 log-probabilities, but an evaluation keeps full-vocabulary float16 ones (about 6 "
        "GB for a 128k vocabulary over 3 domains x 16 windows x 512 tokens; `--no-eval` skips it). The price is "
        "disk reads: every forward batch (4 fitness windows; the reference top-K one window at a time; an "
        "evaluation's batches) reads every block — the model's size — from the page cache or disk and decodes "
        "its levels, so this suits a host whose RAM holds the model's files. Its measured peak memory levels off as the "
        "model grows (docs/benchmarks.md `scale`): what grows first is the level cache and the checkpoint's "
        "unwritten shard (at most 128 MB). Not built: pipeline or tensor parallelism inside a replica (a replica is one "
        "process), and, in a true-sequential pass under `--workers`, only layers fed the same input (q/k/v, "
        "gate/up) are solved side by side; o_proj and down_proj wait for the layers before them.\n\n"
        + "\n".join(detail))
    (ROOT / "docs" / "scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
