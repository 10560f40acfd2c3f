"""A new method is one registration: a toy "sign + per-row scale" method, defined here and nowhere else,
works end to end — `methods --json`, `measure --method toy`, a plan JSON, the What-if page, assembly +
reload — with no other file touched."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from apptest_helpers import run_page

from sahc_core.methods.quant import pack_codes, unpack_codes
from sahc_core.methods.registry import MethodSpec, Param, config_to_dict, register, unregister


# ---- the toy method: 40 lines ---------------------------------------------------------------
@dataclass(frozen=True)
class SignConfig:
    scale: str = "mean"  # per-row scale: mean |w| (L1-optimal for signs) or rms

    def __post_init__(self) -> None:
        if self.scale not in ("mean", "rms"):
            raise ValueError(f"scale must be 'mean' or 'rms', got {self.scale!r}.")


@dataclass(frozen=True, eq=False)
class SignTensor:
    shape: tuple[int, ...]
    config: SignConfig
    signs: torch.Tensor   # packed 1-bit codes (1 = non-negative)
    scales: torch.Tensor  # (rows,) float16

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = unpack_codes(self.signs, 1, math.prod(self.shape)).float().reshape(-1, self.shape[-1]) * 2 - 1
        return (s * self.scales.float()[:, None]).reshape(self.shape).to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "scales": self.scales}

    def meta(self) -> dict:
        return {"method": "toy", "config": config_to_dict(self.config), "shape": list(self.shape)}

    @property
    def nbytes(self) -> int:
        return self.signs.numel() + 2 * self.scales.numel()


def _compress(W: torch.Tensor, cfg: SignConfig, calib=None) -> SignTensor:
    x = W.detach().float().reshape(-1, W.shape[-1])
    scale = x.abs().mean(1) if cfg.scale == "mean" else x.square().mean(1).sqrt()
    return SignTensor(tuple(W.shape), cfg, pack_codes((x >= 0).to(torch.uint8), 1), scale.half())


TOY = MethodSpec(
    name="toy", title="Sign + row scale (toy)", config=SignConfig, compress=_compress,
    nbytes=lambda shape, cfg: (math.prod(shape) + 7) // 8 + 2 * math.prod(shape[:-1]),
    load=lambda state, meta, cfg: SignTensor(tuple(meta["shape"]), cfg, state["signs"], state["scales"]),
    params=(Param("scale", "choice", "mean", choices=("mean", "rms")),), label=lambda c: f"sign-{c.scale}",
    candidates=lambda shape, component: [SignConfig("mean"), SignConfig("rms")])
# ---- end of the toy method -------------------------------------------------------------------


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


Q = "model.layers.0.self_attn.q_proj.weight"


def test_toy_appears_in_methods_json(toy, capsys):
    from sahc_core.cli.main import main

    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["methods"]}
    assert listed["toy"]["params"] == [{"name": "scale", "type": "choice", "default": "mean", "nullable": False,
                                        "scope": "both", "choices": ["mean", "rms"]}]
    assert {"int", "svd", "tt", "keep"} <= set(listed)


def test_toy_measure_cli(toy, tiny_llama_dir, tmp_path, capsys):
    from sahc_core.cli.main import main

    rc = main(["measure", "--model", str(tiny_llama_dir), "--tensor", Q, "--method", "toy", "--scale", "rms",
               "--cache", str(tmp_path / "c.duckdb"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from sahc_core.io.source import ModelSource

    x = ModelSource.open(tiny_llama_dir).read(Q, dtype=torch.float32)
    ref = torch.where(x >= 0, 1.0, -1.0) * x.square().mean(1, keepdim=True).sqrt().half().float()
    assert out["label"] == "sign-rms" and out["bytes"] == 64 * 64 // 8 + 2 * 64
    assert out["rel_error"] == pytest.approx(float((x - ref).norm() / x.norm()), rel=1e-6)


def test_toy_in_a_plan_assembles_and_reloads(toy, tiny_llama_dir, tmp_path):
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import assemble, load_assembled
    from sahc_core.plans.plan import CompressionPlan, project

    plan = CompressionPlan.from_dict({"name": "toy-ffn", "default": {"method": "int", "bits": 8, "group_size": None},
                                      "components": {"ffn": {"method": "toy", "scale": "mean"}}})
    src = ModelSource.open(tiny_llama_dir)
    proj = project(plan, src)
    ffn = proj["tensors"][proj["tensors"]["component"] == "ffn"]
    assert (ffn["method"] == "toy").all() and len(ffn) == 6
    res = assemble(src, plan, tmp_path / "out")
    assert res["bytes_payload"] == res["bytes_projected"]
    state = load_assembled(tmp_path / "out")
    name = ffn["name"].iloc[0]
    assert torch.equal(state[name], _compress(src.read(name, dtype=torch.float32), SignConfig()).reconstruct())


def test_toy_on_the_whatif_page(toy, tiny_llama_dir, monkeypatch, tmp_path):
    at = run_page("whatif", tiny_llama_dir, monkeypatch, tmp_path)
    at.selectbox(key="wi_component").select("attention_full").run()
    at.selectbox(key="wi_tensor").select(Q).run()
    assert TOY.title in at.radio(key="wi_method").options
    at.radio(key="wi_method").set_value(TOY.title).run()
    assert not at.exception and not at.error
    at.radio(key="wi_toy_scale").set_value("rms").run()
    ratio = float(next(m.value for m in at.metric if m.label == "Projected ratio vs 16-bit").rstrip("x"))
    assert ratio == pytest.approx(2 * 64 * 64 / (64 * 64 // 8 + 2 * 64), abs=0.005)
    assert 0 < float(next(m.value for m in at.metric if m.label.startswith("Relative error"))) < 1
