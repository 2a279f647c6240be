"""Data-parallel training of a small transformer LM on the `pydoc` text with compressed gradients.

    torchrun --nproc_per_node 2 -m modelpress.comm.train --compressor topk --ratio 0.01 --ef ef21

Byte-level tokens, a small Llama-style model, each rank reading its own batches. Logs loss, bytes
sent per step and step time; rank 0 writes the log as JSON (--out-json). gloo on CPU, NCCL on GPUs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist


def byte_stream() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def tiny_lm(hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def batches(stream: torch.Tensor, rank: int, world: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        yield torch.stack([stream[s:s + seq] for s in starts])


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressor", default="none", help="none, fp16, topk, randk, qsgd, sign, powersgd, torch-powersgd")
    ap.add_argument("--ratio", type=float, default=0.01, help="topk / randk ratio")
    ap.add_argument("--bits", type=int, default=4, help="qsgd bits")
    ap.add_argument("--psgd-rank", type=int, default=4, help="powersgd rank")
    ap.add_argument("--scope", default="tensor", help="tensor (per-layer) or bucket (global top-k)")
    ap.add_argument("--ef", default="none", help="none, ef, ef21, econtrol")
    ap.add_argument("--eta", type=float, default=0.03, help="econtrol strength (of the order of the compressor's k/d)")
    ap.add_argument("--lgreco", default=None, help="comma-separated levels for L-GreCo, e.g. 0.005,0.01,0.02,0.05")
    ap.add_argument("--lgreco-every", type=int, default=50)
    ap.add_argument("--lgreco-relative", action="store_true", help="L-GreCo: per-layer errors relative to the layer's norm")
    ap.add_argument("--optimizer", default="adam", help="adam, sgd, onebit-adam")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30, help="1-bit Adam full-precision steps")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default=None, help="JSON log written by rank 0")
    ap.add_argument("--checkpoint", default=None, help="save model, optimizer and hook state at the end "
                                                       "(PATH.rank0, PATH.rank1, ...: workers' states differ)")
    ap.add_argument("--resume", default=None, help="resume from such a checkpoint (give PATH)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    torch.manual_seed(args.seed)
    model = tiny_lm(args.hidden, args.layers, seed=args.seed).to(device)
    state = None
    if args.optimizer == "onebit-adam":
        from .onebit_adam import OneBitAdam

        for p in model.parameters():  # same start everywhere
            dist.broadcast(p.data, 0)
        net = model
        opt = OneBitAdam(model.parameters(), lr=args.lr, warmup=args.warmup)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
        if args.compressor == "torch-powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

            state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=args.psgd_rank, start_powerSGD_iter=2,
                                     min_compression_rate=1.0, use_error_feedback=True, warm_start=True)
            net.register_comm_hook(state, ps.powerSGD_hook)
        elif args.compressor != "none" or args.ef != "none" or args.lgreco:
            from .hooks import compression_hook
            from .lgreco import LGreCo

            kw = {"topk": {"ratio": args.ratio}, "randk": {"ratio": args.ratio}, "qsgd": {"bits": args.bits},
                  "powersgd": {"rank": args.psgd_rank}}.get(args.compressor, {})
            lg = None
            if args.lgreco:
                cast = int if args.compressor in ("qsgd", "powersgd") else float
                lg = LGreCo(tuple(cast(x) for x in args.lgreco.split(",")), every=args.lgreco_every,
                            relative=args.lgreco_relative)
            state, hook = compression_hook(net, args.compressor, ef=args.ef, eta=args.eta if args.ef == "econtrol" else None,
                                           lgreco=lg, scope=args.scope, **kw)
            net.register_comm_hook(state, hook)
        opt = (torch.optim.Adam(net.parameters(), lr=args.lr) if args.optimizer == "adam"
               else torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9))
    start = 0
    if args.resume:  # every worker has its own error-feedback memories: one file per rank
        ck = torch.load(f"{args.resume}.rank{rank}", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if state is not None and ck.get("comm") is not None and hasattr(state, "load_state_dict"):
            state.load_state_dict(ck["comm"], device)
        start = ck["step"]
    stream = byte_stream()
    it = batches(stream, rank, world, args.batch, args.seq, args.seed)
    for _ in range(start):
        next(it)
    log = {"args": vars(args), "loss": [], "bytes": [], "step_s": []}
    dense_per_step = 4 * sum(p.numel() for p in model.parameters())
    prev_bytes = getattr(state, "bytes_sent", None) or getattr(opt, "bytes_sent", 0) if start else 0
    for step in range(start, args.steps):
        x = next(it).to(device)
        t = time.time()
        out = net(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        dt = time.time() - t
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        sent = (state.bytes_sent if hasattr(state, "bytes_sent") else
                getattr(opt, "bytes_sent", None))
        if sent is None:  # uncompressed DDP / torch PowerSGD: count what the protocol sends
            if args.compressor == "torch-powersgd":
                sent = prev_bytes + _torch_powersgd_bytes(model, args.psgd_rank, step)
            else:
                sent = prev_bytes + dense_per_step
        log["loss"].append(loss.item() / world)
        log["bytes"].append(sent - prev_bytes)
        log["step_s"].append(dt)
        prev_bytes = sent
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step} loss {log['loss'][-1]:.4f} bytes/step {log['bytes'][-1]} {dt * 1000:.0f} ms", flush=True)
    log["final_loss"] = sum(log["loss"][-10:]) / len(log["loss"][-10:])
    log["total_bytes"] = sum(log["bytes"])
    log["dense_bytes"] = dense_per_step * (args.steps - start)
    if args.checkpoint:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": args.steps,
                    "comm": state.state_dict() if hasattr(state, "state_dict") else None},
                   f"{args.checkpoint}.rank{rank}")
    if args.out_json and rank == 0:
        with open(args.out_json, "w") as f:
            json.dump(log, f)
    dist.barrier()
    return log


def _torch_powersgd_bytes(model, rank: int, step: int) -> int:
    """Bytes torch's PowerSGD hook sends per step: P and Q of every matrix, vectors uncompressed
    (the first steps before start_powerSGD_iter are plain all-reduce)."""
    if step < 2:
        return 4 * sum(p.numel() for p in model.parameters())
    n = 0
    for p in model.parameters():
        if p.dim() >= 2:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            r = min(rank, rows, cols)
            n += 4 * (r * (rows + cols)) if r * (rows + cols) < rows * cols else 4 * p.numel()
        else:
            n += 4 * p.numel()
    return n


def shutdown() -> None:
    """End this worker's process group cleanly, after the work is done.

    DDP's reducer and communication hooks sit in reference cycles that keep the gloo process group alive
    past destroy_process_group() until the interpreter exits, where its threads are torn down during
    finalization and the process may abort ("terminate called without an active exception": seen in
    2 of ~75 two-worker launches here). Collecting them first, and leaving together, ends it while Python is alive.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    shutdown()
