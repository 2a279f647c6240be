"""Bit-packing of small unsigned integers and boolean masks into uint8 streams (LSB first)."""
from __future__ import annotations

import torch


_CHUNK = 1 << 20  # values per step of the general packer (a multiple of 8: chunks end on a byte)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2^bits) into ceil(n*bits/8) bytes.

    Works in place-sized steps: a few bytes of scratch per value at most, so packing a large
    layer does not cost many times the layer's codes in memory."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return v.clone()
    if 8 % bits == 0:  # whole codes per byte: OR the shifted codes together
        per = 8 // bits
        pad = (-v.numel()) % per
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        v = v.reshape(-1, per)
        out = v[:, 0].clone()
        for j in range(1, per):
            out |= v[:, j] << (j * bits)
        return out
    shifts = torch.arange(bits, device=v.device, dtype=torch.uint8)
    weights = (1 << torch.arange(8, device=v.device, dtype=torch.uint8))
    parts = []
    for s in range(0, v.numel(), _CHUNK):
        bitstream = ((v[s:s + _CHUNK].unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = (-bitstream.numel()) % 8
        if pad:
            bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
        parts.append((bitstream.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8))
    return torch.cat(parts) if parts else v.new_zeros(0)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: n integers as uint8."""
    p = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return p[:n].clone()
    need = -(-n * bits // 8)
    if p.numel() < need:
        raise ValueError(f"packed stream too short: {p.numel()} bytes, need {need}")
    if 8 % bits == 0:  # codes never straddle a byte: shift and mask, no bit stream (the packed runtime's path)
        shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.uint8)
        return ((p[:need].unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    shifts = torch.arange(8, device=p.device, dtype=torch.uint8)
    bitstream = ((p[:need].unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = (1 << torch.arange(bits, device=p.device, dtype=torch.int32))
    return (bitstream.reshape(n, bits).to(torch.int32) * weights).sum(1).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return unpack_bits(packed, 1, n).bool().reshape(shape)


def packed_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)
