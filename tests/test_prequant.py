"""io.prequant: weights already on a k-bit grid per block are found (block and bits), others are not."""
from __future__ import annotations

import pytest
import torch

from sahc_core.io.prequant import artifact_note, detect_grid, model_grids, summary, tensor_grid
from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig, fake_quantize


def _q4_1(W: torch.Tensor, block: int) -> torch.Tensor:
    """GGUF Q4_1, written independently of our quantizer: per block d = (max - min)/15 and m = min in
    fp16, q = round((w - m)/d), dequantized in float32 as d*q + m."""
    x = W.reshape(-1, block)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    q = ((x - m) / d).round().clamp(0, 15)
    return (d * q + m).reshape(W.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ordinary_weights_are_not_a_grid(dtype):
    torch.manual_seed(0)
    assert detect_grid((torch.randn(256, 512) * 0.02).to(dtype)) is None


@pytest.mark.parametrize("block", [16, 32, 64])
def test_gguf_like_blocks_are_found_with_their_block_size(block):
    torch.manual_seed(1)
    g = detect_grid(_q4_1(torch.randn(128, 256), block))
    assert g is not None and (g["bits"], g["block"]) == (4, block)  # larger blocks mix grids and fail


@pytest.mark.parametrize("bits,group", [(3, 64), (5, 32), (8, 128)])
def test_our_own_rtn_grid_is_found(bits, group):
    torch.manual_seed(2)
    g = detect_grid(fake_quantize(torch.randn(64, 256), QuantConfig(bits, group)))
    assert g is not None and g["bits"] <= bits and g["block"] == group


def test_artifact_note_only_when_the_setting_can_reproduce_the_grid():
    grid = {"bits": 4, "block": 32}
    assert artifact_note(grid, QuantConfig(4, 32))["prequantized_artifact"] is True
    assert artifact_note(grid, QuantConfig(4, 16))["prequantized_artifact"] is True  # groups tile the blocks
    assert artifact_note(grid, QuantConfig(4, 64))["prequantized_artifact"] is False
    assert artifact_note(grid, QuantConfig(3, 32))["prequantized_artifact"] is False
    assert artifact_note(None, QuantConfig(4, 32)) == {}


def test_default_model_is_found_prequantized_and_its_error_flagged(default_model, tmp_path):
    """SmolLM2 comes from a Q4_1 GGUF: int4 g32 asym reproduces it (error 0), and the result says so."""
    from sahc_core.cache import Cache
    from sahc_core.whatif.measure import measure_tensor

    src = ModelSource.open(default_model)
    name = "model.layers.15.mlp.down_proj.weight"
    assert tensor_grid(src, name) == {"bits": 4, "block": 32, "fraction": 1.0}
    m = measure_tensor(src, name, QuantConfig(4, 32))
    assert m["rel_error"] < 1e-6 and m["prequantized_artifact"] and "artifact" in m["prequantized_note"]
    assert not measure_tensor(src, name, QuantConfig(4, 64))["prequantized_artifact"]
    cache = Cache(tmp_path / "c.duckdb")
    grids = model_grids(src, cache=cache)
    assert model_grids(src, cache=cache) == grids  # second call from the cache
    s = summary(grids)
    assert (s["bits"], s["block"]) == (4, 32) and s["n_prequantized"] >= 200
