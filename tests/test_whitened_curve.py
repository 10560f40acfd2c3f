"""spectra.whitened: the rank-vs-output-error curve on calibration activations against independent
computations (the output error of an actually truncated whitened SVD, the plain EYM curve)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sahc_core.cache import Cache
from sahc_core.calib.stats import CalibConfig
from sahc_core.calib.store import calibration_stats
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods.wsvd import WSVDConfig
from sahc_core.metrics import output_error
from sahc_core.spectra.spectrum import rank_error_curve, singular_values
from sahc_core.spectra.whitened import output_rank_curve
from tiny_models import TINY_TEXT

NAME = "model.layers.0.self_attn.o_proj.weight"  # 64 x 64, its inputs span ~64 directions on 256 tokens


@pytest.fixture(scope="module")
def setup(tiny_llama_tok_dir: Path, tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("wc") / "c.duckdb")
    src = ModelSource.open(tiny_llama_tok_dir)
    stats = calibration_stats(src, cache, TINY_TEXT * 3, CalibConfig(tokens=256, heldout_tokens=128))
    return src, cache, stats


def test_curves_against_truncation_and_plain_eym(setup):
    src, cache, stats = setup
    c = output_rank_curve(src, NAME, stats, cache=cache)
    W = src.read(NAME, dtype=torch.float32)
    assert np.allclose(c["weight_error"], rank_error_curve(singular_values(W)), atol=1e-12)
    H = stats.for_weight(NAME).xtx
    for r in (4, 16, 40):
        W_hat = registry.compress(W, WSVDConfig(rank=r, bits=None), stats.for_weight(NAME)).reconstruct()
        assert c["output_error"][r] == pytest.approx(output_error(W, W_hat, H), rel=2e-2, abs=2e-3)  # fp16 factors
    assert c["output_error"][0] == pytest.approx(1.0) and c["output_error"][-1] == pytest.approx(0.0, abs=1e-6)
    r10 = c["min_rank_output"]["0.1"]
    assert c["output_error"][r10] <= 0.1 < c["output_error"][r10 - 1]
    assert output_rank_curve(src, NAME, stats, cache=cache) == c  # cached


def test_cli_spectrum_calib(setup, tiny_llama_tok_dir, capsys):
    import json

    from sahc_core.cli.main import main

    src, cache, stats = setup
    assert main(["spectrum", "--model", str(tiny_llama_tok_dir), "--tensor", NAME, "--cache", str(cache.path),
                 "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "output_rank_error" not in plain
