"""Data-parallel workers on torch.distributed (gloo on CPU, NCCL on GPUs).

Run any verb under `torchrun --nproc_per_node N -m modelpress …` (or `--workers N`, which starts
torchrun itself). Every rank loads the model and the same calibration windows; calibration
batches are dealt out round-robin (batch b goes to rank b mod N), each rank runs its batches
through the block, and the per-layer statistics are summed across ranks before every solve.
`compress` and the level database builds give each layer to one rank (calib.driver `split`), which
solves it and hands the result to the others (`compress`: the packed weight, so every rank holds
the same compressed model and rank 0 writes it; a database: the weight, the owner writes the
levels). Layers fed the same input tensor (q/k/v, gate/up, found by running one batch through
the block) are solved side by side, also in a true-sequential pass; a layer whose input comes
from the layers before it waits for their results. The evolutionary
search scores offspring across ranks (allocate.evolutionary `score_all`).

Statistics are summed in float64 (calib.stats), so the order in which ranks and batches are
added does not change the float32 XᵀX the solvers see: the same seed gives the same results for
any number of workers, at the same threads per process (CPU kernels may split a matmul's sums by
thread). Outside torchrun everything here is a no-op for one process.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def launched() -> bool:
    """Whether this process was started by torchrun as one of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL when the
    device is CUDA); each rank takes GPU LOCAL_RANK. Returns whether there are several workers."""
    if not launched():
        return False
    if not active():
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 works alone for long stretches (a GGUF conversion, sampled text, the dense
        # reference, the final save) while the others wait in a collective: the default timeout
        # (10 min for NCCL) would end the run
        hours = float(os.environ.get("MODELPRESS_DIST_TIMEOUT_HOURS", "12"))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(hours=hours))
        rank, size = world()
        log.info("worker %d of %d (%s)", rank, size, "nccl" if cuda else "gloo")
    return True


def worker_device(device: str | torch.device | None) -> str | torch.device | None:
    """A rank's own device: `cuda` means cuda:LOCAL_RANK under torchrun."""
    if device is not None and launched() and str(device) == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def finish() -> None:
    """Leave the process group once every rank is done (rank 0 may still be writing files)."""
    if active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches: a converted model, sampled text), then the
    others, which find the caches made."""
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `t` in place across ranks ("sum", "max" or "min"), through the backend's device
    (CPU for gloo, this rank's GPU for NCCL); a no-op for one process."""
    if not active() or world()[1] == 1:
        return t
    buf = _comm(t)
    torch.distributed.all_reduce(buf, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
    if buf is not t:
        t.copy_(buf)
    return t


def _comm(t: torch.Tensor) -> torch.Tensor:
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    return t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Rank `src`'s `t` on every rank, in place; a no-op for one process."""
    if not active() or world()[1] == 1:
        return t
    buf = _comm(t)
    torch.distributed.broadcast(buf, src=src)
    if buf is not t:
        t.copy_(buf)
    return t


def share(items: list) -> list:
    """This rank's share of `items` (item k goes to rank k mod N); all of them for one process."""
    rank, size = world()
    return items[rank::size]


def merged_dicts(d: dict) -> dict:
    """The union of every rank's `d` (later ranks win on shared keys); `d` itself for one process."""
    if not active() or world()[1] == 1:
        return d
    parts: list = [None] * world()[1]
    torch.distributed.all_gather_object(parts, d)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def from_rank(value, src: int):
    """Rank `src`'s (picklable) `value` on every rank; `value` itself for one process."""
    if not active() or world()[1] == 1:
        return value
    box = [value if world()[0] == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def from_main(make):
    """`make()` run on rank 0 only, its (picklable) result handed to every rank."""
    if not active() or world()[1] == 1:
        return make()
    box = [make() if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reduce_int(value: int, op: str) -> int:
    """An integer agreed by all ranks (their max or min)."""
    if not active() or world()[1] == 1:
        return value
    return int(reduce_(torch.tensor([value], dtype=torch.int64), op).item())


def relaunch(workers: int, argv: list[str], device: str | None = None) -> int:
    """Run `python -m modelpress ARGV` as `workers` data-parallel processes under torchrun (this
    machine, rendezvous on localhost) and return its exit code. On CPU each worker gets an equal
    share of the cores (OpenMP threads of several processes spinning on the same cores slow
    them all down many times)."""
    import subprocess
    import sys

    env = dict(os.environ)
    if device is None or not str(device).startswith("cuda"):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "modelpress", *argv]
    log.info("starting %d workers: %s", workers, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out
