import pytest
import torch

from modelpress.ops.packed import PackedWeight, dense_packed
from modelpress.ops.packing import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000, 4099])
def test_pack_roundtrip_bit_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(p, bits, n), v)


def test_pack_is_dense_lsb_first():
    # 4-bit values 1, 2 -> one byte 0x21
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]


def test_mask_roundtrip():
    m = torch.rand(37, 53, generator=torch.Generator().manual_seed(0)) > 0.3
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)


def test_truncated_stream_is_rejected():
    p = pack_bits(torch.zeros(100, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        unpack_bits(p[:-2], 3, 100)


def _quantized(mask: bool, perm: bool, sym: bool):
    from modelpress.ops.quant.rtn import RTN

    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 70, generator=g)
    pw = RTN(bits=3, group_size=32, sym=sym).compress(w, None)
    if perm:
        pw.perm = torch.randperm(70, generator=g)
    if mask:
        m = torch.rand(20, 70, generator=g) > 0.5
        codes = pw.codes.reshape(20, 70)[m]
        pw.mask, pw.codes = m, codes
    return pw


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_packed_weight_roundtrip_and_size(mask, perm, sym):
    pw = _quantized(mask, perm, sym)
    tensors, meta = pw.to_tensors()
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == pw.nbytes()
    back = PackedWeight.from_tensors(tensors, meta)
    assert torch.equal(back.dequantize(), pw.dequantize())
    if mask:
        assert (back.dequantize()[~pw.mask] == 0).all()


def test_dense_and_lowrank_roundtrip():
    w = torch.randn(8, 12)
    pw = dense_packed(w)
    pw.lr_b, pw.lr_a = torch.randn(8, 2).half(), torch.randn(2, 12).half()
    t, meta = pw.to_tensors()
    back = PackedWeight.from_tensors(t, meta)
    assert torch.equal(back.dequantize(), pw.dequantize())
    assert pw.nbytes() == (96 + 16 + 24) * 2
