"""Hardening (issue 13), bounds and checks before work: (3) bounded memory and time for any input size
(corpus, plan, TT factors); (5) the cache never harms a file it does not own; (6) everything checkable is
checked before work (window, output folder, corpus that is a device or a pipe, Ctrl-C).

CLI cases go through ``sahc_core.cli.main.main`` and must print exactly one ``error:`` line (never
"unexpected"); identifiers and paths are in ``test_hardening_paths.py``, model directories in
``test_hardening_models.py``, the pages' cases in ``test_hardening_ui.py``.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import duckdb
import pytest
from _hardening_helpers import FFN, INT8, cli_error, file_tree, plan_file

from sahc_core.cache import Cache
from sahc_core.cli.main import EXIT_INTERRUPT, main
from sahc_core.errors import CacheError
from sahc_core.paths import MARKER, PathError


# -- (3) bounded memory and time ------------------------------------------------------------------------
def test_corpus_size_is_capped_before_reading(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    import sahc_core.io.corpus as corpus

    big = tmp_path / "big.txt"
    big.write_text("word " * 10_000)
    monkeypatch.setattr(corpus, "MAX_CORPUS_BYTES", 1000)
    monkeypatch.setattr(corpus, "_read_text", lambda p: pytest.fail("read before the size check"))
    line = cli_error(capsys, "ppl", "--corpus", str(big), "--model", str(tiny_llama_dir), "--device", "cpu")
    assert "limit" in line and str(big) in line


def test_ppl_with_a_token_cap_tokenizes_only_the_start(tiny_llama_tok_dir, tmp_path, monkeypatch):
    """A 20 MB corpus with max_tokens: the perplexity equals that of its first tokens, and the
    tokenizer never sees more than a few kB (a one-shot call would tokenize all 20 MB)."""
    from sahc_core.evaluate import tokens
    from sahc_core.evaluate.model import load_model
    from sahc_core.evaluate.perplexity import PplConfig, perplexity
    from tiny_models import TINY_TEXT

    model, tok = load_model(tiny_llama_tok_dir, device="cpu")
    big = TINY_TEXT * 20_000
    seen: list[int] = []
    real = tokens._encode
    monkeypatch.setattr(tokens, "_encode", lambda t, s: seen.append(len(s)) or real(t, s))
    capped = perplexity(model, tok, big, PplConfig(window=64, max_tokens=100, device="cpu"))
    assert max(seen) < 10_000
    ref = perplexity(model, tok, TINY_TEXT * 3, PplConfig(window=64, max_tokens=100, device="cpu"))
    assert capped.tokens == ref.tokens == 99 - 1 and capped.nll_sum == pytest.approx(ref.nll_sum, rel=1e-12)


@pytest.mark.parametrize("kind,expect", [
    ("size", "larger than"), ("depth", "nested more than"), ("overrides", "overrides, more than"),
    ("pattern", "characters, more than"), ("device", "not a regular file"),
])
def test_plan_file_bounds(kind, expect, tiny_llama_dir, tmp_path, capsys):
    from sahc_core.plans import _limits

    if kind == "size":
        path = plan_file(tmp_path, {**INT8, "description": "x" * (_limits.MAX_PLAN_BYTES + 1)})
    elif kind == "depth":
        path = plan_file(tmp_path, '{"name": "d", "default": ' + "[" * 50_000 + "]" * 50_000 + "}")
    elif kind == "overrides":
        path = plan_file(tmp_path, {**INT8, "overrides": [{"pattern": f"t{i}", "method": "keep"}
                                                           for i in range(_limits.MAX_OVERRIDES + 1)]})
    elif kind == "pattern":
        path = plan_file(tmp_path, {**INT8, "overrides": [{"pattern": "*" * 600, "method": "keep"}]})
    else:
        path = "/dev/zero"
    line = cli_error(capsys, "plan", "--plan", path, "--model", str(tiny_llama_dir))
    assert expect in line, line


def test_shallow_nesting_bomb_inside_a_config_is_refused(tiny_llama_dir, tmp_path, capsys):
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    line = cli_error(capsys, "plan", "--plan", plan_file(tmp_path, {**INT8, "default": {"method": "int", "x": nested}}),
                     "--model", str(tiny_llama_dir))
    assert "nested more than" in line


def test_override_index_is_first_match_wins_like_fnmatch():
    """The compiled, literal-indexed look-up against the reference: fnmatchcase over the list in order."""
    import fnmatch
    import random

    from sahc_core.methods.keep import KeepConfig
    from sahc_core.plans.plan import CompressionPlan, Override

    rng = random.Random(1)
    names = [f"model.layers.{i}.{m}.weight" for i in range(12) for m in ("mlp.up_proj", "mlp.down_proj",
                                                                          "self_attn.q_proj", "input_layernorm")]
    pats = []
    for _ in range(300):
        n = rng.choice(names)
        pats.append(rng.choice([n, n.replace(".weight", "*"), "*" + n[-14:], n.replace("layers.", "layers.?"),
                                "model.layers.[13]*", f"*.{rng.randrange(12)}.*", "nomatch.*"]))
    plan = CompressionPlan("p", overrides=tuple(Override(p, KeepConfig()) for p in pats))
    for n in names:
        ref = next((i for i, p in enumerate(pats) if fnmatch.fnmatchcase(n, p)), None)
        assert plan._index.first(n) == ref, n


def test_a_large_legal_plan_resolves_in_seconds():
    """One literal override per tensor of a 10,000-tensor model (the override cap), plus wildcards."""
    import pandas as pd

    from sahc_core.plans import _limits
    from sahc_core.plans.plan import CompressionPlan, resolve

    n = _limits.MAX_OVERRIDES
    table = pd.DataFrame({"name": [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)],
                          "component": "ffn", "kind": "up_proj", "shape": [(64, 128)] * n})
    overrides = [{"pattern": "*.norm*", "method": "keep"}] + [
        {"pattern": name, "method": "int", "bits": 4 if i % 2 else 8, "group_size": 32}
        for i, name in enumerate(table["name"][: n - 1])]
    plan = CompressionPlan.from_json_text(json.dumps({"name": "per-tensor", "default": {"method": "keep"},
                                                      "overrides": overrides}))
    t0 = time.perf_counter()
    df = resolve(plan, table)
    assert time.perf_counter() - t0 < 20  # linear in tensors; quadratic matching took minutes
    assert df["rule"].iloc[0] == f"override[1] {table['name'][0]}" and df["rule"].iloc[-1] == "default"
    assert df.loc[1, "config"]["bits"] == 4 and df.loc[2, "config"]["bits"] == 8


@pytest.mark.parametrize("cfg,expect", [
    ({"method": "tt", "tt_ranks": [1, 8, 8, 1], "row_factors": [256, 256, 256], "col_factors": [4, 4, 4]},
     "more than twice its size"),
    ({"method": "tt", "tt_ranks": [1, 8, 8, 1], "row_factors": [8, 8, 4], "col_factors": [1, 1, 100000]},
     "more than twice its size"),
    ({"method": "tt", "tt_ranks": [1] + [2] * 30 + [1]}, "at most 8"),
    ({"method": "tt", "tt_ranks": [1, 10**9, 10**9, 1]}, "unfolding"),
])
def test_tt_factors_and_ranks_are_bounded_by_the_real_shape_at_plan_time(cfg, expect, tiny_llama_dir, tmp_path,
                                                                         capsys):
    plan = {"name": "tt", "default": {"method": "keep"}, "components": {"embedding": cfg}}
    assert expect in cli_error(capsys, "plan", "--plan", plan_file(tmp_path, plan), "--model", str(tiny_llama_dir))


# -- (5) the cache and files it does not own -------------------------------------------------------------
def test_a_foreign_duckdb_file_is_refused_and_never_altered(tmp_path, capsys, tiny_llama_dir):
    path = tmp_path / "theirs.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE runs(id INTEGER, owner VARCHAR)")
    conn.execute("INSERT INTO runs VALUES (1, 'me')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(CacheError, match="did not create"):
        Cache(path)
    line = cli_error(capsys, "spectrum", "--tensor", FFN, "--model", str(tiny_llama_dir), "--cache", str(path))
    assert "did not create" in line and "left untouched" in line
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["theirs.duckdb"]
    conn = duckdb.connect(str(path), read_only=True)
    assert conn.execute("SELECT table_name FROM information_schema.tables").fetchall() == [("runs",)]
    assert conn.execute("SELECT column_name FROM information_schema.columns").fetchall() == [("id",), ("owner",)]
    conn.close()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a database" * 50, bytes(range(256)) * 40])
def test_a_non_duckdb_file_is_refused_without_a_stray_lock(content, tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_bytes(content)
    with pytest.raises(CacheError, match="not a DuckDB database"):
        Cache(path)
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb"]


def test_our_own_files_old_and_new_and_empty_databases_are_accepted(tmp_path):
    from sahc_core.cache import MIGRATIONS, OWNER_KEY, OWNER_VALUE

    new = Cache(tmp_path / "new.duckdb")
    assert new.execute("SELECT value FROM meta WHERE key = ?", [OWNER_KEY]) == [(OWNER_VALUE,)]
    old = tmp_path / "old.duckdb"  # written by an SAHC from before the owner key
    conn = duckdb.connect(str(old))
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.close()
    assert Cache(old).execute("SELECT value FROM meta WHERE key = ?", [OWNER_KEY]) == [(OWNER_VALUE,)]
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    assert Cache(empty).schema_version() >= 2
    half = tmp_path / "half.duckdb"  # a 'meta' table alone does not make a file ours
    conn = duckdb.connect(str(half))
    conn.execute("CREATE TABLE meta(key VARCHAR, value VARCHAR)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.close()
    with pytest.raises(CacheError, match="did not create"):
        Cache(half)


@pytest.mark.parametrize("command", ["run", "runs", "calib", "export"])
def test_no_cache_does_not_exist_where_it_cannot_be_honoured(command, tmp_path, capsys):
    required = {"run": ["--plan", plan_file(tmp_path, INT8)], "export": ["--run", "r1", "--format", "dense",
                                                                        "--out", str(tmp_path / "x")]}
    argv = [command, "--no-cache", *required.get(command, [])]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "unrecognized arguments: --no-cache" in capsys.readouterr()[1]


def test_no_cache_does_what_it_says(tiny_llama_dir, cache_path, capsys):
    assert main(["spectrum", "--tensor", FFN, "--model", str(tiny_llama_dir), "--device", "cpu", "--no-cache"]) == 0
    assert not cache_path.parent.exists()


# -- (6) validation before work --------------------------------------------------------------------------
def _no_work(monkeypatch):
    """Make every long step fail the test if it is reached."""
    import sahc_core.evaluate.model as model
    import sahc_core.plans.assemble as asm

    monkeypatch.setattr(asm, "_write_tensors", lambda *a, **k: pytest.fail("assembly started"))
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_window_longer_than_the_model_is_refused_at_launch(tiny_llama_dir, tmp_path, cache_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    line = cli_error(capsys, "run", "--plan", plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir),
                     "--window", "4096", "--device", "cpu")
    assert "exceeds the model's maximum of 128" in line
    assert not (cache_path.parent / "runs").exists()
    assert "128" in cli_error(capsys, "ppl", "--model", str(tiny_llama_dir), "--window", "4096", "--device", "cpu")


def test_start_run_refuses_a_long_window_before_queueing(tiny_llama_dir, tmp_path):
    from sahc_core.runs.jobs import start_run

    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(ValueError, match="maximum of 128"):
        start_run(cache, INT8, tiny_llama_dir, window=4096)
    assert cache.execute("SELECT count(*) FROM runs") == [(0,)]


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_report_out_that_is_a_file_is_refused_before_building(kind, tiny_llama_dir, tmp_path, cache_path, capsys,
                                                             monkeypatch):
    import sahc_core.report.sections as sections

    monkeypatch.setattr(sections, "build_report", lambda *a, **k: pytest.fail("the report was built"))
    f = tmp_path / "report.html"
    f.write_text("an existing file")
    out = f if kind == "file" else f / "sub"
    line = cli_error(capsys, "report", "--out", str(out), "--model", str(tiny_llama_dir), "--no-images")
    assert "is a file, not a folder" in line and f.read_text() == "an existing file"


@pytest.fixture()
def fifo(tmp_path) -> Path:
    p = tmp_path / "pipe.txt"
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("command", ["ppl", "run"])
@pytest.mark.parametrize("which", ["/dev/zero", "fifo"])
def test_corpus_that_is_a_device_or_pipe(command, which, fifo, tiny_llama_dir, tmp_path, cache_path, capsys,
                                         monkeypatch):
    _no_work(monkeypatch)
    corpus = str(fifo) if which == "fifo" else which
    extra = ["--plan", plan_file(tmp_path, INT8)] if command == "run" else []
    line = cli_error(capsys, command, *extra, "--corpus", corpus, "--model", str(tiny_llama_dir), "--device", "cpu")
    assert "not a regular file or a folder" in line and corpus in line


def test_corpus_folder_skips_devices_and_pipes_inside(fifo, tmp_path):
    from sahc_core.io.corpus import load_corpus

    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "test.txt").write_text("a real text")
    c = load_corpus(tmp_path)
    assert c.test_files == ("test.txt",) and c.test_text == "a real text\n"


def test_sigint_of_run_exits_130_and_marks_the_run_cancelled(tiny_llama_dir, tmp_path, cache_path, capsys,
                                                            monkeypatch):
    import sahc_core.plans.assemble as asm

    def interrupted(*a, **k):
        signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers, during the assembly

    monkeypatch.setattr(asm, "_write_tensors", interrupted)
    code = main(["run", "--plan", plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir), "--run-id", "r1",
                 "--device", "cpu"])
    err = capsys.readouterr()[1]
    assert code == EXIT_INTERRUPT == 130 and err.strip().endswith("error: interrupted")
    assert Cache(cache_path).execute("SELECT status FROM runs WHERE run_id = 'r1'") == [("cancelled",)]
    assert not any((cache_path.parent / "runs").glob("r1*"))


def test_gutenberg_markers_are_found_at_the_ends_of_a_large_text_in_bounded_time():
    from sahc_core.io.corpus import strip_gutenberg

    body = ("Tomorrow, and tomorrow, and tomorrow creeps in this petty pace from day to day.\n" * 40_000)  # 3.3 MB
    header = "The Project Gutenberg EBook of Macbeth\n*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\n"
    footer = "*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\nlicence text\n"
    t0 = time.perf_counter()
    assert strip_gutenberg(header + body + footer) == body
    middle = body + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n" + body  # not where Gutenberg puts it
    assert strip_gutenberg(middle) == middle
    assert time.perf_counter() - t0 < 3


def test_export_force_replaces_only_an_earlier_export(tiny_llama_dir, tmp_path):
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import assemble
    from sahc_core.plans.export import export_checkpoint
    from sahc_core.plans.plan import CompressionPlan

    run = tmp_path / "run"
    assemble(ModelSource.open(tiny_llama_dir), CompressionPlan.from_dict(INT8), run, device="cpu")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(PathError, match="not created by SAHC"):
        export_checkpoint(run, tiny_llama_dir, theirs, "dense", force=True)
    assert file_tree(theirs) == {"notes.txt": b"keep me"}
    out = tmp_path / "export"
    export_checkpoint(run, tiny_llama_dir, out, "dense")
    assert (out / MARKER).is_file()
    export_checkpoint(run, tiny_llama_dir, out, "dense", force=True)  # an earlier export of ours: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run", "theirs"]


def test_calibration_folder_named_by_the_cache_stays_inside_it(tiny_llama_tok_dir, tmp_path):
    from sahc_core.calib.stats import CalibConfig
    from sahc_core.calib.store import FORMAT_VERSION, KIND, calibration_stats, stats_dir, text_sha256
    from sahc_core.io.source import ModelSource
    from tiny_models import TINY_TEXT

    cache, src = Cache(tmp_path / "cache" / "c.duckdb"), ModelSource.open(tiny_llama_tok_dir)
    cfg = CalibConfig(tokens=32, heldout_tokens=16)
    key = cfg.key(text_sha256(TINY_TEXT))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    cache.put(KIND, src.fingerprint, key, FORMAT_VERSION, {"dir": "../victim", "meta": {}})
    with pytest.raises(PathError, match="outside"):
        calibration_stats(src, cache, TINY_TEXT, cfg, device="cpu")
    theirs = stats_dir(cache, src.fingerprint, key)  # an incomplete folder SAHC did not create, where ours would go
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("keep me too")
    cache.execute("DELETE FROM results WHERE kind = ?", [KIND])
    with pytest.raises(PathError, match="not created by SAHC"):
        calibration_stats(src, cache, TINY_TEXT, cfg, device="cpu")
    assert file_tree(victim) == {"notes.txt": b"keep me"} and file_tree(theirs) == {"notes.txt": b"keep me too"}
    assert not [p for p in theirs.parent.iterdir() if p.name.startswith(".tmp-")]
