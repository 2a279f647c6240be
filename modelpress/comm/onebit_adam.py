"""1-bit Adam (Tang et al., 2021): Adam for `warmup` steps with full-precision gradient averaging,
then the variance is frozen and workers exchange only 1-bit compressed momentum (sign + one scale
per tensor) with error compensation on every worker.

Use it without DDP (it does its own communication): `opt.step()` after `loss.backward()`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .compressors.sign import Sign
from .exchange import exchange


class OneBitAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup: int = 50, group=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.warmup = warmup
        self.pg = group
        self.steps = 0
        self.bytes_sent = 0
        self.sign = Sign()

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["onebit"] = {"steps": self.steps, "bytes_sent": self.bytes_sent}  # resuming must not redo the warm-up
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("onebit", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.steps, self.bytes_sent = int(extra["steps"]), int(extra["bytes_sent"])

    def _world(self) -> int:
        return dist.get_world_size(self.pg) if dist.is_available() and dist.is_initialized() else 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        world = self._world()
        compressed = self.steps >= self.warmup
        if not compressed:  # warm-up: plain averaged gradients
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self.bytes_sent += flat.numel() * flat.element_size()
            if world > 1:
                dist.all_reduce(flat, group=self.pg)
            flat /= world
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        items, order = [], []
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                    st["e"] = torch.zeros_like(p)
                g = p.grad
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p
                if not compressed:
                    st["m"].mul_(b1).add_(g, alpha=1 - b1)
                    st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                else:  # local momentum, compensated, then 1-bit averaged
                    local = st["m"] * b1 + (1 - b1) * g + st["e"]
                    items.append((self.sign, local, {}))
                    order.append((p, group, local))
        if compressed and items:
            avgs, locals_, sent = exchange(items, self.pg)
            self.bytes_sent += sent
            for (p, group, local), avg, loc in zip(order, avgs, locals_):
                st = self.state[p]
                st["e"] = local - loc
                st["m"] = avg
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                t = min(self.steps + 1, self.warmup) if self.warmup else self.steps + 1
                b1, b2 = group["betas"]
                v_hat = st["v"] / (1 - b2 ** t)
                m_hat = st["m"] / (1 - b1 ** (self.steps + 1)) if not compressed else st["m"]
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        self.steps += 1
        return loss
