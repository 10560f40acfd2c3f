"""What-if service on the tiny llama fixture: numerics against independent numpy computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sahc_core.whatif import sweeps
from sahc_core.whatif import measure as whatif
from sahc_core.cache import Cache
from sahc_core.gates import audit_log
from sahc_core.methods.lowrank import SVDConfig, lowrank, svd_factors
from sahc_core.methods.registry import compress, measure
from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.tt import TTConfig, rank_options
from sahc_core.workspace import Workspace

FFN = "model.layers.0.mlp.gate_proj.weight"      # (128, 64): m >= n, fast SVD path
DOWN = "model.layers.0.mlp.down_proj.weight"     # (64, 128): m < n, methods.measure path
Q = "model.layers.1.self_attn.q_proj.weight"
EMB = "model.embed_tokens.weight"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


class ByteTokenizer:
    """A real byte-level tokenizer (vocab 256 = the tiny llama's vocab): one id per UTF-8 byte."""

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture
def source(tiny_llama_dir):
    return ModelSource.open(tiny_llama_dir)


@pytest.fixture
def ws():
    return Workspace()


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "w.duckdb")


@pytest.fixture(scope="module")
def net(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _np_rel(W: np.ndarray, W_hat: np.ndarray) -> float:
    return float(np.linalg.norm(W - W_hat) / np.linalg.norm(W))


def _np_rowcos(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.mean((A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))))


def test_projected_matches_byte_formula(source):
    p = whatif.projected((128, 64), QuantConfig(4, 32))
    assert p["bytes"] == 128 * 64 * 4 // 8 + 4 * 128 * (64 // 32)  # codes + fp16 scale and zero per group
    assert p["ratio"] == pytest.approx(2 * 128 * 64 / p["bytes"])
    assert p["bits_per_weight"] == pytest.approx(8 * p["bytes"] / (128 * 64))
    s = whatif.projected((128, 64), SVDConfig(rank=16, bits=None))
    assert s["bytes"] == 2 * 16 * (128 + 64)
    with pytest.raises(ValueError):
        whatif.projected((128, 60), QuantConfig(4, 32))


def test_measure_int_against_numpy(source):
    W = source.read(FFN, dtype=torch.float32)
    cfg = QuantConfig(4, 32)
    m = whatif.measure_tensor(source, FFN, cfg)
    W_hat = compress(W, cfg).reconstruct().numpy().astype(np.float64)
    Wn = W.numpy().astype(np.float64)
    assert m["rel_error"] == pytest.approx(_np_rel(Wn, W_hat), rel=1e-9)
    assert m["weight_cosine"] == pytest.approx(_np_rowcos(Wn, W_hat), rel=1e-9)
    assert m["bytes"] == whatif.projected(W.shape, cfg)["bytes"]
    # Uniform-noise prediction, independently: step per group of 32 along rows, asym min-max / 15.
    g = Wn.reshape(128, 2, 32)
    step = (g.max(-1) - g.min(-1)) / 15
    pred = math.sqrt((32 * step**2).sum() / 12) / np.linalg.norm(Wn)
    assert m["predicted_error"] == pytest.approx(pred, rel=2e-3)  # fp16-rounded scales in the service
    gates = {x["gate"]: x for x in m["gates"]}
    assert gates["theory_vs_actual"]["passed"] and 0.7 < gates["theory_vs_actual"]["value"] < 1.3


@pytest.mark.parametrize("name", [FFN, DOWN, EMB])
@pytest.mark.parametrize("cfg", [SVDConfig(rank=8, bits=4, group_size=32), SVDConfig(rank=40, bits=8, group_size=None),
                                 SVDConfig(rank=64, bits=None), SVDConfig(rank=3, bits=2, group_size=None, scheme="sym")])
def test_measure_svd_matches_methods_and_eym(source, name, cfg):
    W = source.read(name, dtype=torch.float32)
    m = whatif.measure_tensor(source, name, cfg, device="cpu")
    ref = measure(W, cfg, compressed=lowrank(W, cfg, factors=svd_factors(W, "cpu")))
    for key in ("rel_error", "weight_cosine", "trunc_error", "quant_error", "eym_error"):
        assert m[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-6), key
    assert m["bytes"] == ref["bytes"] and m["rank"] == cfg.rank
    s = np.linalg.svd(W.numpy().astype(np.float64), compute_uv=False)
    assert m["eym_error"] == pytest.approx(math.sqrt((s[cfg.rank:] ** 2).sum() / (s**2).sum()), rel=1e-5, abs=1e-6)
    if cfg.bits is None:  # fp16 factors: total error is the EYM error up to fp16 rounding
        assert m["rel_error"] == pytest.approx(m["eym_error"], abs=2e-3)


def test_svd_computed_once_per_workspace(source, ws, monkeypatch):
    calls = []
    real = whatif.svd_factors
    monkeypatch.setattr(whatif, "svd_factors", lambda W, device="auto": calls.append(1) or real(W, device))
    for r in (4, 8, 16):
        for bits in (4, 8):
            whatif.measure_tensor(source, FFN, SVDConfig(rank=r, bits=bits, group_size=32), device="cpu", workspace=ws)
    assert len(calls) == 1
    whatif.measure_tensor(source, FFN, SVDConfig(rank=4, group_size=32), device="cpu")  # a private workspace
    assert len(calls) == 2


def test_cache_hit_for_repeated_measure(source, cache, monkeypatch):
    cfg = SVDConfig(rank=8, bits=4, group_size=32)
    first = whatif.measure_tensor(source, FFN, cfg, cache=cache)
    assert first["cached"] is False
    n_log = len(audit_log(cache, model_fp=source.fingerprint))
    assert n_log == len(first["gates"])
    monkeypatch.setattr(whatif, "svd_factors", lambda *a, **k: pytest.fail("recomputed despite a cache hit"))
    second = whatif.measure_tensor(source, FFN, cfg, cache=cache)
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k != "cached"} == json.loads(json.dumps(
        {k: v for k, v in first.items() if k != "cached"}))
    assert len(audit_log(cache, model_fp=source.fingerprint)) == n_log  # a hit logs nothing new


def test_gates_fire_on_svd_worse_than_zeros(source, cache):
    # 2-bit symmetric factors have the grid {-s, 0, s}: the product is worse than deleting the tensor.
    m = whatif.measure_tensor(source, FFN, SVDConfig(rank=8, bits=2, group_size=None, scheme="sym"), cache=cache)
    assert m["rel_error"] > 1.0
    failed = {g["gate"] for g in m["gates"] if not g["passed"]}
    assert "rel_error" in failed
    log = audit_log(cache, model_fp=source.fingerprint)
    row = log[log.gate == "rel_error"].iloc[0]
    assert not row.passed and row.value == pytest.approx(m["rel_error"])


def test_output_cosine_against_independent_forward(source, net):
    cfg = QuantConfig(3, 32)
    r = whatif.output_cosine_for(source, FFN, cfg, model=(net, ByteTokenizer()), calib_text=TEXT, n_tokens=200)
    captured = []
    mod = net.get_submodule(FFN.removesuffix(".weight"))
    h = mod.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach().reshape(-1, 64)))
    ids = list(TEXT.encode())[:200]
    with torch.no_grad():  # windows of the model's 128 positions, as the service cuts them
        for i in range(0, 200, 128):
            net(input_ids=torch.tensor([ids[i:i + 128]]))
    h.remove()
    X = torch.cat(captured).double().numpy()
    W = source.read(FFN, dtype=torch.float32)
    W_hat = compress(W, cfg).reconstruct().double().numpy()
    assert r["n_tokens"] == 200
    assert r["output_cosine"] == pytest.approx(_np_rowcos(X @ W.double().numpy().T, X @ W_hat.T), rel=1e-6)
    assert r["block"] == "model.layers.0.mlp" and 0 < r["block_output_cosine"] <= 1
    assert {g["gate"] for g in r["gates"]} == {"output_cosine", "block_output_cosine"}


def test_output_cosine_attention_and_embedding(source, net, cache):
    tok = ByteTokenizer()
    good = whatif.output_cosine_for(source, Q, QuantConfig(8, 32), model=(net, tok), calib_text=TEXT,
                                    n_tokens=128, cache=cache)
    assert good["attention_output_cosine"] == good["block_output_cosine"] > 0.999
    assert all(g["passed"] for g in good["gates"])
    again = whatif.output_cosine_for(source, Q, QuantConfig(8, 32), model=(net, tok), calib_text=TEXT,
                                     n_tokens=128, cache=cache)
    assert again["cached"] and again["output_cosine"] == good["output_cosine"]
    bad = whatif.output_cosine_for(source, Q, SVDConfig(rank=8, bits=2, group_size=None, scheme="sym"),
                                   model=(net, tok), calib_text=TEXT, n_tokens=128)
    assert not {g["gate"]: g["passed"] for g in bad["gates"]}["output_cosine"]
    emb = whatif.output_cosine_for(source, EMB, QuantConfig(4, 32), model=(net, tok), calib_text=TEXT, n_tokens=100)
    W = source.read(EMB, dtype=torch.float32)
    W_hat = compress(W, QuantConfig(4, 32)).reconstruct()
    ids = list(TEXT.encode())[:100]
    assert emb["output_cosine"] == pytest.approx(_np_rowcos(W[ids].double().numpy(), W_hat[ids].double().numpy()),
                                                 rel=1e-7)
    assert emb["tied"] and 0.9 < emb["lm_head_output_cosine"] <= 1


def test_pareto_grid_and_frontier(source):
    done = []
    df = sweeps.pareto(source, Q, progress=lambda i, n: done.append((i, n)))
    assert done[-1] == (len(df), len(df))
    assert set(df.method) == {"keep", "int", "hqq", "svd"}  # TT only for the embedding; no gptq/wsvd without stats
    assert len(df[df.method == "int"]) == 7 * 3  # bits 2..8 x groups 32, 64, per row (128 does not divide 64)
    assert len(df[df.method == "hqq"]) == 4 * 3  # bits 2, 3, 4, 8 x the same groups
    front = df[df.frontier]
    for _, p in front.iterrows():  # nothing strictly better on both axes
        assert not ((df.bytes <= p.bytes) & (df.rel_error < p.rel_error)).any()
    assert df.loc[df.rel_error.idxmin(), "frontier"] and df.loc[df.bytes.idxmin(), "frontier"]
    assert df.ratio.tolist() == pytest.approx((2 * 64 * 64 / df.bytes).tolist())
    again = sweeps.pareto(source, Q)
    assert again.drop(columns=["frontier", "frontier_output"]).equals(df.drop(columns=["frontier", "frontier_output"]))
    assert df["failed_gates"].map(lambda s: isinstance(s, str)).all()


def test_matrix_only_methods_refuse_1d(source):
    from sahc_core.errors import ModelError

    with pytest.raises((ModelError, ValueError)):
        whatif.measure_tensor(source, "model.norm.weight", SVDConfig(rank=1))


def test_tt_sweep_table(source, cache):
    ranks = ((1, 2, 2, 1), (1, 8, 8, 1))
    df = sweeps.tt_sweep(source, EMB, ranks_list=ranks, cos_threshold=0.5, cache=cache)
    assert df.tt_ranks.tolist() == ["[1, 2, 2, 1]", "[1, 8, 8, 1]"]
    W = source.read(EMB, dtype=torch.float32)
    for (_, row), r in zip(df.iterrows(), ranks):
        c = compress(W, TTConfig(ranks=r))
        shape = c.tt_shape
        modes = [i * j for i, j in zip(shape["row_factors"], shape["col_factors"])]
        assert row.bytes == sum(2 * r[k] * n * r[k + 1] for k, n in enumerate(modes))  # fp16 cores
        assert row.ratio == pytest.approx(2 * W.numel() / row.bytes)
        W_hat = c.reconstruct().double().numpy()
        assert row.cosine == pytest.approx(_np_rowcos(W.double().numpy(), W_hat), rel=1e-6)
        assert row.passed == (row.cosine >= 0.5)
    assert df.cosine.iloc[1] > df.cosine.iloc[0] and df.ratio.iloc[1] < df.ratio.iloc[0]
    assert sweeps.tt_sweep(source, EMB, ranks_list=ranks, cos_threshold=0.5, cache=cache).cached.all()
    with pytest.raises(ValueError):
        sweeps.tt_sweep(source, EMB, ranks_list=((1, 100000, 8, 1),))
    default = sweeps.tt_sweep(source, EMB, cache=cache)  # the study's list minus what 256x64 cannot hold
    assert 1 <= len(default) <= len(sweeps.DEFAULT_TT_RANKS)


def test_pareto_offers_tt_for_embedding_only(source):
    cfgs = sweeps.pareto_configs((256, 64), "embedding")
    assert any(isinstance(c, TTConfig) for c in cfgs)
    assert not any(isinstance(c, TTConfig) for c in sweeps.pareto_configs((256, 64), "ffn"))


def test_tt_rank_options_follow_the_unfoldings():
    from sahc_core.methods.tt import suggest_factors

    # 49152 x 576 with 3 cores: modes (i_k j_k) bound r1 <= m1 and r2 <= min(r1 m2, m3)
    modes = [i * j for i, j in zip(suggest_factors(49152, 3), suggest_factors(576, 3))]
    r1s = rank_options((49152, 576))
    assert r1s[-1] == 2 ** int(math.log2(modes[0]))
    r2s = rank_options((49152, 576), r1=4)
    assert r2s[-1] == 2 ** int(math.log2(min(4 * modes[1], modes[2])))


@pytest.mark.parametrize("name,cfg", [("model.norm.weight", QuantConfig(8, None)),
                                      (EMB, TTConfig(ranks=(1, 4, 4, 1))), (Q, QuantConfig(2, 16, "sym"))])
def test_fast_measure_matches_methods_measure(source, name, cfg):
    W = source.read(name, dtype=torch.float32)
    m = whatif.measure_tensor(source, name, cfg)
    ref = measure(W, cfg)
    for key in ("rel_error", "weight_cosine", "bytes", "ratio", "bits_per_weight"):
        assert m[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    assert m.get("tt_shape") == ref.get("tt_shape")


@pytest.mark.parametrize("cfg", [QuantConfig(3, 32, "asym"), QuantConfig(5, None, "sym"), QuantConfig(8, 16, "asym"),
                                 SVDConfig(rank=20, bits=3, group_size=32), SVDConfig(rank=64, bits=5, group_size=None),
                                 SVDConfig(rank=33, bits=None)])
def test_blocked_measure_matches_methods_measure(source, monkeypatch, cfg):
    """Tiny blocks (odd row counts, a last partial block) give the numbers of the unblocked reference."""
    import sahc_core.methods.quant as quant

    import sahc_core.methods.svd as svd

    monkeypatch.setattr(svd, "_BLOCK_ELEMS", 7 * 64)
    monkeypatch.setattr(quant, "_FAKE_CHUNK_ELEMS", 5 * 64)
    W = source.read(FFN, dtype=torch.float32)
    m = whatif.measure_tensor(source, FFN, cfg, device="cpu")
    ref = measure(W, cfg, compressed=lowrank(W, cfg, factors=svd_factors(W, "cpu")) if isinstance(cfg, SVDConfig) else None)
    keys = ["rel_error", "weight_cosine", "ratio", "bits_per_weight", "predicted_error"]
    keys += ["trunc_error", "quant_error", "eym_error", "predicted_quant_error"] if isinstance(cfg, SVDConfig) else []
    assert "quant_error" not in m or isinstance(cfg, SVDConfig)  # int: it would only repeat rel_error
    for key in keys:
        assert m[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-6), key
    assert m["bytes"] == ref["bytes"] == compress(W, cfg).nbytes
