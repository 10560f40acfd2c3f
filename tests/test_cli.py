"""CLI contract (design.md): --json puts one JSON object on the last stdout line; errors are one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sahc_core.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def run_json(capsys, *argv: str) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def run_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture()
def cache_path(tmp_path, monkeypatch):
    p = tmp_path / "c.duckdb"
    monkeypatch.setenv("SAHC_CACHE", str(p))
    return p


def test_inspect_contract(capsys, tiny_qwen35_dir, cache_path):
    d = run_json(capsys, "inspect", "--model", str(tiny_qwen35_dir))
    assert d["architecture"] == "qwen3_5"
    assert d["total_params"] == sum(t["params"] for t in d["tensors"])
    comps = {c["component"]: c for c in d["components"]}
    assert {"ffn", "attention_full", "attention_linear", "embedding", "vision", "mtp"} <= set(comps)
    assert sum(c["share"] for c in d["components"]) == pytest.approx(1.0)
    for t in d["tensors"]:
        assert {"name", "shape", "dtype", "component"} <= set(t)


def test_spectrum_contract_and_cache(capsys, tiny_llama_dir, cache_path):
    name = "model.layers.1.mlp.gate_proj.weight"
    d = run_json(capsys, "spectrum", "--model", str(tiny_llama_dir), "--tensor", name, "--device", "cpu")
    assert d["tensor"] == name and d["shape"] == [128, 64] and d["device"] == "cpu"
    s = d["singular_values"]
    assert len(s) == 64 and all(a >= b for a, b in zip(s, s[1:]))
    assert {"sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank"} <= set(d["stats"])
    assert set(d["min_rank"]) == {"0.1", "0.05", "0.01"}
    assert len(d["rank_error"]["ranks"]) == len(d["rank_error"]["rel_error"])
    again = run_json(capsys, "spectrum", "--model", str(tiny_llama_dir), "--tensor", name, "--device", "cpu")
    assert again["singular_values"] == s


def test_measure_contract(capsys, tiny_llama_dir, cache_path):
    name = "model.layers.0.mlp.down_proj.weight"  # 64 x 128
    d = run_json(capsys, "measure", "--model", str(tiny_llama_dir), "--tensor", name, "--method", "int",
                 "--bits", "4", "--group-size", "32")
    assert {"bytes", "ratio", "bits_per_weight", "rel_error", "weight_cosine", "gates"} <= set(d)
    assert d["ratio"] == pytest.approx(2 * 64 * 128 / d["bytes"])
    assert 0 < d["rel_error"] < 0.2 and d["weight_cosine"] > 0.98


def test_plan_contract(capsys, tiny_llama_dir, cache_path, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"name": "int8", "default": {"method": "int", "bits": 8, "group_size": 32}}))
    d = run_json(capsys, "plan", "--model", str(tiny_llama_dir), "--plan", str(plan))
    assert {"ratio_projected", "bytes_projected", "components"} <= set(d)
    assert 1.5 < d["ratio_projected"] < 2.0


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["spectrum", "--tensor", "no.such.tensor"], "no.such.tensor"),
    (["measure", "--tensor", "model.layers.0.mlp.down_proj.weight", "--method", "int", "--bits", "17"], "bits"),
    (["measure", "--tensor", "model.layers.0.mlp.down_proj.weight", "--method", "svd", "--rank", "0"], "rank"),
    (["plan", "--plan", "/nonexistent/plan.json"], "plan"),
])
def test_errors_are_one_line(capsys, tiny_llama_dir, cache_path, argv, needle):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_llama_dir)]
    line = run_error(capsys, *argv)
    assert needle in line


def test_pickle_checkpoint_refused(capsys, tiny_llama_dir, tmp_path, cache_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    line = run_error(capsys, "inspect", "--model", str(bad))
    assert "pickle" in line and "safe_serialization" in line


def test_module_entry_point(tiny_llama_dir, tmp_path):
    """`python -m sahc_core` in a subprocess: JSON on the last stdout line, exit 0; bad path: exit != 0."""
    env = {"SAHC_CACHE": str(tmp_path / "c.duckdb"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "sahc_core", "inspect", "--model", str(tiny_llama_dir), "--json"],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["architecture"] == "llama"
    bad = subprocess.run([sys.executable, "-m", "sahc_core", "inspect", "--model", str(tmp_path / "nope")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_run_prints_progress_on_stderr_and_json_last(capsys, tiny_llama_tok_dir, cache_path, tmp_path):
    """`run` end to end on a tiny model with a tiny corpus: progress lines on stderr, JSON on stdout."""
    from tiny_models import TINY_TEXT

    model = tiny_llama_tok_dir
    corpus = tmp_path / "c.txt"
    corpus.write_text(TINY_TEXT)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"name": "int8", "default": {"method": "int", "bits": 8, "group_size": None}}))
    code = main(["run", "--model", str(model), "--plan", str(plan), "--corpus", str(corpus), "--window", "32",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out.strip().splitlines()[-1])
    assert {"run_id", "ratio_projected", "ratio_actual", "ppl", "baseline_ppl", "gates"} <= set(d)
    # payload is exactly the projection; on disk only the safetensors headers come on top
    assert d["bytes_payload"] == d["bytes_projected"] < d["bytes_actual"]
    smoke = [g for g in d["gates"] if g["gate"] == "output_cosine"]
    assert len(smoke) == 2 * 7 + 2  # 7 linear layers per block, the embedding, the tied lm_head
    assert "stage 'assemble'" in err and "stage 'ppl'" in err and d["run_id"] in err


def test_runs_delete_files(capsys, cache_path):
    from sahc_core.cache import Cache, to_json, utcnow
    from sahc_core.paths import MARKER, mark_owned

    cache = Cache(cache_path)
    now = utcnow()
    cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at, finished_at) VALUES "
                  "('r1', 'p', 'done', ?, ?, ?)", [to_json({"ppl": 9.0}), now, now])
    out = mark_owned(cache_path.parent / "runs" / "r1")  # what an assembly leaves
    (out / "model.safetensors").write_bytes(b"\0" * 4096)
    size = 4096 + (out / MARKER).stat().st_size
    assert run_json(capsys, "runs")["runs"][0]["checkpoint_mb"] == pytest.approx(size / 1e6)
    assert run_json(capsys, "runs", "--delete-files", "r1") == {"run_id": "r1", "bytes_freed": size}
    assert not out.exists() and run_json(capsys, "runs")["runs"][0]["ppl"] == 9.0
    assert "no run with id" in run_error(capsys, "runs", "--delete-files", "nope")


def test_ppl_offload_and_dtype(capsys, tiny_tok_dirs, cache_path, tmp_path):
    """`ppl --offload always` gives the in-memory number (Qwen3.5 hybrid); --dtype is stated; bad values refused."""
    from tiny_models import TINY_TEXT

    corpus = tmp_path / "c.txt"
    corpus.write_text(TINY_TEXT)
    args = ["ppl", "--model", str(tiny_tok_dirs["qwen3_5"]), "--corpus", str(corpus), "--window", "32"]
    mem = run_json(capsys, *args, "--offload", "never")
    off = run_json(capsys, *args, "--offload", "always")
    assert not mem["offload"]["offload"] and off["offload"]["offload"]
    assert abs(mem["ppl"] - off["ppl"]) / mem["ppl"] < 1e-5 and mem["tokens"] == off["tokens"]
    assert off["evaluation"]["not_evaluated"] == {"mtp": 15, "vision": 21}
    bf = run_json(capsys, *args, "--dtype", "bfloat16", "--offload", "always")
    assert bf["dtype"] == "bfloat16" and "bfloat16" in bf["dtype_note"] and abs(bf["ppl"] - mem["ppl"]) / mem["ppl"] < 0.05
    with pytest.raises(SystemExit):
        main([*args, "--dtype", "int8"])
    with pytest.raises(SystemExit):
        main([*args, "--offload", "sometimes"])
