"""Tests of sahc_core.methods.quant against an independent numpy RTN and numpy bit packing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sahc_core.methods.quant import QuantConfig, dequantize, pack_codes, quant_bytes, quantize, unpack_codes

BITS = list(range(2, 9))


def _np_rtn(w: np.ndarray, bits: int, g: int | None, scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Plain numpy round-to-nearest (same definitions, written independently): codes, scales, zeros."""
    rows, cols = int(np.prod(w.shape[:-1])), w.shape[-1]
    g = cols if g is None else g
    x = w.astype(np.float32).reshape(rows, cols // g, g)
    if scheme == "sym":
        Q = 2 ** (bits - 1) - 1
        s = (np.abs(x).max(-1) / np.float32(Q)).astype(np.float16)
        sf = s.astype(np.float32)
        sf = np.where(sf > 0, sf, np.float32(1))[..., None]
        q = np.clip(np.round(x / sf), -Q, Q) + Q
        return q.astype(np.uint8).reshape(-1), s, None
    Q = 2 ** bits - 1
    z = x.min(-1).astype(np.float16)
    s = ((x.max(-1) - z.astype(np.float32)) / np.float32(Q)).astype(np.float16)
    sf = s.astype(np.float32)
    sf = np.where(sf > 0, sf, np.float32(1))[..., None]
    q = np.clip(np.round((x - z.astype(np.float32)[..., None]) / sf), 0, Q)
    return q.astype(np.uint8).reshape(-1), s, z


def _np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """LSB-first bitstream with numpy's unpackbits/packbits (independent of the torch block packer)."""
    bitarr = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitarr.reshape(-1), bitorder="little")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_matches_numpy_and_roundtrips(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2 ** bits, size=n, dtype=np.uint8)
    packed = pack_codes(torch.from_numpy(codes), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(packed.numpy(), _np_pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, n).numpy(), codes)


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("shape,g", [((16, 64), 32), ((8, 48), None), ((3, 5, 32), 16), ((96,), 32)])
def test_quantize_matches_numpy_rtn(seed: int, bits: int, scheme: str, shape: tuple, g: int | None) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=shape[:-1] + (1,)) + rng.uniform(-0.5, 0.5)).astype(np.float32)
    cfg = QuantConfig(bits=bits, group_size=g, scheme=scheme)
    q = quantize(torch.from_numpy(w), cfg)
    codes, s, z = _np_rtn(w, bits, g, scheme)
    np.testing.assert_array_equal(unpack_codes(q.codes, bits, w.size).numpy(), codes)
    np.testing.assert_array_equal(q.scales.numpy(), s)
    if scheme == "asym":
        np.testing.assert_array_equal(q.zeros.numpy(), z)
        ref = codes.reshape(s.shape + (-1,)) * s.astype(np.float32)[..., None] + z.astype(np.float32)[..., None]
    else:
        assert q.zeros is None
        Q = 2 ** (bits - 1) - 1
        ref = (codes.reshape(s.shape + (-1,)).astype(np.float32) - Q) * s.astype(np.float32)[..., None]
    w_hat = dequantize(q)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    np.testing.assert_allclose(w_hat.numpy(), ref.reshape(w.shape), rtol=1e-6, atol=1e-7)
    # Error bound: half a step, plus fp16 rounding of the scale (times the code span) and the zero.
    sf = s.astype(np.float32)
    span = 2 ** bits - 1
    slack = sf * span * 2.0 ** -10 + (np.abs(z.astype(np.float32)) * 2.0 ** -10 if z is not None else 0) + 1e-7
    err = np.abs(w - w_hat.numpy()).reshape(s.shape + (-1,)).max(-1)
    assert np.all(err <= sf / 2 + slack)
    # Exact bytes = the stored tensors' nbytes = the formula.
    stored = sum(t.numel() * t.element_size() for t in q.state().values())
    assert q.nbytes == stored == quant_bytes(shape, cfg)
    assert q.bits_per_weight == pytest.approx(8 * stored / w.size)


def test_gpt_fast_reference_formula_4bit_asym() -> None:
    """gpt-fast group_quantize_tensor (4-bit asym, zero = min + s*2^(k-1), ŵ = (q-8)s + zero), in fp32.

    With unrounded parameters the two formulas describe the same grid, so reconstructions agree
    to within fp16 parameter rounding, except rare near-ties where that rounding flips a code by one.
    """
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    g, nb = 64, 4
    x = w.reshape(-1, g)
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scales = (mx - mn).clamp(min=1e-6) / (2 ** nb - 1)
    zeros = mn + scales * 2 ** (nb - 1)
    q_ref = x.sub(mn).div(scales).round().clamp(0, 2 ** nb - 1)
    ref = ((q_ref - 2 ** (nb - 1)) * scales + zeros).reshape(w.shape)
    ours = dequantize(quantize(w, QuantConfig(bits=4, group_size=g, scheme="asym")))
    step = scales.expand(-1, g).reshape(w.shape)
    diff = (ours - ref).abs()
    assert torch.all(diff <= 1.01 * step)  # never more than one grid step apart
    close = diff <= 0.01 * step + 1e-3
    assert close.float().mean() > 0.99


def test_bytes_examples() -> None:
    assert quant_bytes((4096, 4096), QuantConfig(4, 128, "asym")) * 8 / 4096 ** 2 == pytest.approx(4.25)
    assert quant_bytes((4096, 4096), QuantConfig(4, 128, "sym")) * 8 / 4096 ** 2 == pytest.approx(4.125)
    # 3-bit: 10 codes -> 30 bits -> 4 bytes (2 padding bits), one row scale
    assert quant_bytes((1, 10), QuantConfig(3, None, "sym")) == 4 + 2


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_zero_and_constant_groups_are_exact(scheme: str) -> None:
    w = torch.zeros(4, 64)
    w[1] = 0.75
    w[2, 32:] = -3.0
    q = quantize(w, QuantConfig(4, 32, scheme))
    w_hat = dequantize(q)
    if scheme == "asym":
        assert torch.equal(w_hat, w)
    else:
        assert torch.equal(w_hat[0], w[0]) and torch.allclose(w_hat, w, atol=1e-3)
    assert torch.isfinite(w_hat).all()


@pytest.mark.parametrize("bits", [0, 1, 9, 17, 4.0, True])
def test_bad_bits(bits) -> None:
    with pytest.raises(ValueError, match="bits must be an integer"):
        QuantConfig(bits=bits)


def test_bad_group_and_scheme() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(4, 100), QuantConfig(4, 128))
    with pytest.raises(ValueError, match="does not divide"):
        quant_bytes((4, 96), QuantConfig(4, 64))
    with pytest.raises(ValueError, match="positive integer"):
        QuantConfig(4, 0)
    with pytest.raises(ValueError, match="scheme"):
        QuantConfig(4, 128, "nf4")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize(torch.tensor(1.0), QuantConfig(4, None))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), QuantConfig(4, None))
    with pytest.raises(ValueError, match="overflow float16"):
        quantize(torch.tensor([[1e6, -1e6]]), QuantConfig(4, None, "asym"))


def test_bf16_input_and_output_dtype() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    q = quantize(w, QuantConfig(8, 64, "sym"))
    out = dequantize(q, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert (out.float() - w.float()).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(37, 96), (3, 5, 32), (64,)])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_fake_quantize_is_bit_identical_to_the_packed_round_trip(monkeypatch, shape, bits, scheme):
    import sahc_core.methods.quant as quant

    monkeypatch.setattr(quant, "_FAKE_CHUNK_ELEMS", 7 * 32)  # several blocks, the last one partial
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) * 0.05
    W.reshape(-1)[3] = 0.0
    for g in (None, 16, 32):
        cfg = quant.QuantConfig(bits, g, scheme)
        fake = quant.fake_quantize(W, cfg)
        assert fake.shape == W.shape and torch.equal(fake, quant.dequantize(quant.quantize(W, cfg)))
        chunks = list(quant.fake_quant_chunks(W, cfg))
        assert len(chunks) > 1 or W.ndim == 1
        assert torch.equal(torch.cat([c.scales for c in chunks]), quant.quantize(W, cfg).scales)


def test_fake_quantize_refuses_what_quantize_refuses():
    import sahc_core.methods.quant as quant

    W = torch.ones(4, 32)
    W[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.fake_quantize(W, quant.QuantConfig(4, 16))
    with pytest.raises(ValueError, match="does not divide"):
        quant.fake_quantize(torch.ones(4, 30), quant.QuantConfig(4, 16))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_blockwise_quantize_packs_the_same_bitstream_as_one_block(monkeypatch, bits, scheme):
    """Blocks of 8k rows (any bf16 W converted block by block) give the codes, scales, zeros of one pass."""
    import sahc_core.methods.quant as quant

    W = (torch.randn(61, 48, generator=torch.Generator().manual_seed(bits)) * 0.05).to(torch.bfloat16)
    for g in (None, 16):
        cfg = quant.QuantConfig(bits, g, scheme)
        whole = quant.quantize(W, cfg)
        monkeypatch.setattr(quant, "_QUANT_CHUNK_ELEMS", 17 * 48)  # 16-row blocks, a last block of 13 rows
        parts = quant.quantize(W, cfg)
        monkeypatch.undo()
        assert torch.equal(parts.codes, whole.codes) and torch.equal(parts.scales, whole.scales)
        assert (parts.zeros is None) == (whole.zeros is None) and (parts.zeros is None or torch.equal(parts.zeros, whole.zeros))
        assert torch.equal(quant.dequantize(parts), quant.fake_quantize(W.float(), cfg))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_dequantize_in_row_blocks_equals_one_whole_decode(bits, scheme, monkeypatch):
    """The blocked decode (64 MB temporaries, the 248k embedding) is bit for bit the whole-tensor decode,
    for block sizes that cut the bitstream anywhere, and any row range decodes alone."""
    from sahc_core.methods import quant as Q

    W = torch.randn(203, 96, generator=torch.Generator().manual_seed(bits))
    for g in (None, 32):
        q = Q.quantize(W, Q.QuantConfig(bits, g, scheme))
        rows, cols, gg = Q._layout(q.shape, q.config)
        codes = Q.unpack_codes(q.codes, bits, rows * cols).to(torch.float32).reshape(rows, cols // gg, gg)
        if scheme == "sym":
            codes -= 2 ** (bits - 1) - 1
        ref = Q._decode(codes, q.scales, q.zeros).reshape(q.shape)  # the whole tensor at once
        monkeypatch.setattr(Q, "DEQUANT_BLOCK_ELEMS", 96 * 16)  # blocks of 16 rows
        assert torch.equal(Q.dequantize(q), ref)
        assert torch.equal(q.row_block(13, 77), ref[13:77]) and torch.equal(q.row_block(200, 203), ref[200:])
