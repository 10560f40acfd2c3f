"""Hardening (issue 13): each class of hostile or careless input is refused at its root, in one line.

Classes: (1) identifiers never become paths unchecked, and only directories SAHC created are deleted;
(2) a model directory is a trust boundary (index entries, header lengths, no pickle fallback,
non-float dtypes); (3) bounded memory and time for any input size (corpus, plan, TT factors);
(5) the cache never harms a file it does not own; (6) everything checkable is checked before work.
CLI cases go through ``sahc_core.cli.main.main`` and must print exactly one ``error:`` line (never
"unexpected"); the pages' cases are in ``test_hardening_ui.py``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import time
from pathlib import Path

import duckdb
import pytest
import torch

from sahc_core.cache import Cache
from sahc_core.cli.main import EXIT_INTERRUPT, main
from sahc_core.errors import CacheError, ModelError, PlanError
from sahc_core.paths import MARKER, PathError, contained, mark_owned, member, remove_owned, safe_id, safe_label

FFN = "model.layers.0.mlp.down_proj.weight"
EMB = "model.embed_tokens.weight"
INT8 = {"name": "int8", "default": {"method": "int", "bits": 8, "group_size": 32}}


@pytest.fixture()
def cache_path(tmp_path, monkeypatch) -> Path:
    p = tmp_path / "cache" / "c.duckdb"
    monkeypatch.setenv("SAHC_CACHE", str(p))
    return p


def cli_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"\[[\w.-]+\] stage ", ln)]
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0] and "Traceback" not in err
    return lines[0]


def _plan_file(tmp: Path, plan: dict | str, name: str = "plan.json") -> str:
    p = tmp / name
    p.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return str(p)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- (1) identifiers and paths --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["..", ".", "../../victim", "../x", "a/b", "a\\b", "/abs", "", ".hidden",
                                   "x" * 65, "a\nb", "a\0b", "-flag", None, 7])
def test_safe_id_refuses_everything_but_one_plain_component(value):
    with pytest.raises(PathError):
        safe_id(value)


def test_safe_id_and_label_accept_what_sahc_writes():
    from sahc_core.runs.jobs import new_run_id

    assert safe_id(new_run_id()) and safe_id("run-a") == "run-a" and safe_id("r1.retry_2")
    assert safe_label("int4-g64 (report default)") and safe_label("int4+svd r=0.25, g128 ≥5x!")
    assert safe_label("Плaн 4-бит")
    for bad in ("../x", "a/b", "a\\b", " lead", ".hidden", "x" * 101, "tab\tname", "new\nline", "\u202eevil", ""):
        with pytest.raises(PathError):
            safe_label(bad)


def test_contained_resolves_symlinks_and_dotdot(tmp_path):
    parent, outside = tmp_path / "runs", tmp_path / "outside"
    parent.mkdir()
    outside.mkdir()
    (parent / "link").symlink_to(outside)
    assert contained(parent, "r1") == (parent / "r1").resolve()
    for child in ("link", "..", "../outside", "a/../../outside", str(outside), "."):
        with pytest.raises(PathError):
            contained(parent, child)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                  "C:\\x.safetensors", "..\\x.safetensors", "", "a\0b"])
def test_member_refuses_names_that_leave_the_directory(name, tmp_path):
    with pytest.raises(PathError):
        member(tmp_path, name)
    assert member(tmp_path, "sub/model.safetensors") == tmp_path / "sub" / "model.safetensors"


def test_remove_owned_deletes_only_marked_or_empty_directories(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(PathError, match="not created by SAHC"):
        remove_owned(theirs)
    link = tmp_path / "link"
    link.symlink_to(mark_owned(tmp_path / "ours-behind-a-link"))
    with pytest.raises(PathError):
        remove_owned(link)  # a symlink is never followed into a deletion
    assert (theirs / "notes.txt").exists() and (tmp_path / "ours-behind-a-link" / MARKER).exists()
    (tmp_path / "empty").mkdir()
    assert remove_owned(tmp_path / "empty") and remove_owned(mark_owned(tmp_path / "ours"))
    assert remove_owned(tmp_path / "absent") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "ours-behind-a-link", "theirs"]


@pytest.mark.parametrize("run_id", ["..", "../../victim", "../runs", "a/../..", ".", "x" * 80])
def test_cli_run_id_never_becomes_a_path(run_id, tiny_llama_dir, tmp_path, cache_path, capsys):
    cache_path.parent.mkdir(parents=True)
    (cache_path.parent / "keep.txt").write_text("the cache folder holds other files too")
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    plan = _plan_file(tmp_path, INT8)
    before = _tree(tmp_path)
    line = cli_error(capsys, "run", "--plan", plan, "--model", str(tiny_llama_dir), "--run-id", run_id,
                     "--device", "cpu")
    assert "run-id" in line and "not allowed" in line
    after = _tree(tmp_path)
    assert after == before  # nothing removed, nothing written (not even the cache file)


def test_cli_run_id_whose_directory_is_a_planted_symlink(tiny_llama_dir, tmp_path, cache_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    (cache_path.parent / "runs").mkdir(parents=True)
    (cache_path.parent / "runs" / "r1").symlink_to(elsewhere)
    line = cli_error(capsys, "run", "--plan", _plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir),
                     "--run-id", "r1", "--device", "cpu")
    assert "outside" in line
    assert _tree(elsewhere) == {"precious.txt": b"keep"}


def test_cli_delete_files_refuses_a_hostile_run_id(tmp_path, cache_path, capsys):
    Cache(cache_path)
    (tmp_path / "precious.txt").write_text("keep")
    line = cli_error(capsys, "runs", "--delete-files", "../..")
    assert "run id" in line
    assert (tmp_path / "precious.txt").exists() and cache_path.exists()


def test_delete_run_files_never_removes_a_directory_without_the_marker(tmp_path):
    from sahc_core.cache import to_json, utcnow
    from sahc_core.plans.assemble import MANIFEST
    from sahc_core.runs.jobs import delete_run_files, run_files

    cache = Cache(tmp_path / "c.duckdb")
    lookalike = tmp_path / "home"  # has a manifest.json (someone else's), but SAHC did not create it
    lookalike.mkdir()
    (lookalike / MANIFEST).write_text("{}")
    (lookalike / "thesis.tex").write_text("years of work")
    default = tmp_path / "runs" / "b"  # the run's default directory, not created by SAHC either
    default.mkdir(parents=True)
    (default / "x.bin").write_bytes(b"1")
    cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at) VALUES ('b', 'p', 'done', ?, ?)",
                  [to_json({"out_dir": str(lookalike)}), utcnow()])
    assert run_files(cache, "b") is None and delete_run_files(cache, "b") == 0
    assert (lookalike / "thesis.tex").exists() and (default / "x.bin").exists()


def test_assemble_never_replaces_a_directory_it_did_not_create(tiny_llama_dir, tmp_path):
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import assemble
    from sahc_core.plans.plan import CompressionPlan

    src, plan = ModelSource.open(tiny_llama_dir), CompressionPlan.from_dict(INT8)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("a,b")
    with pytest.raises(PathError, match="not created by SAHC"):
        assemble(src, plan, theirs, overwrite=True, device="cpu")
    assert _tree(theirs) == {"data.csv": b"a,b"}
    assert not list(tmp_path.glob("theirs.tmp-*"))
    out = tmp_path / "ours"
    assemble(src, plan, out, device="cpu")
    assert (out / MARKER).is_file()  # every assembly is marked, so it can be replaced or deleted later
    assemble(src, plan, out, overwrite=True, device="cpu")
    (tmp_path / "empty").mkdir()
    assemble(src, plan, tmp_path / "empty", overwrite=True, device="cpu")


def test_manifest_naming_a_file_outside_the_assembly_is_refused(tiny_llama_dir, tmp_path):
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import MANIFEST, assemble, load_assembled
    from sahc_core.plans.plan import CompressionPlan

    out = tmp_path / "asm"
    assemble(ModelSource.open(tiny_llama_dir), CompressionPlan.from_dict(INT8), out, device="cpu")
    manifest = json.loads((out / MANIFEST).read_text())
    entry = next(e for e in manifest["tensors"].values() if e.get("file"))
    entry["file"] = "../../../../etc/passwd"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PathError, match="outside"):
        load_assembled(out)


def test_plan_names_are_labels(tmp_path):
    for name in ("../../etc", "a/b", "x" * 200, "\u202eevil"):
        with pytest.raises(PlanError, match="plan name"):
            from sahc_core.plans.plan import CompressionPlan

            CompressionPlan.from_dict({**INT8, "name": name})


# -- (2) model directories ------------------------------------------------------------------------------
def _index(d: Path) -> Path:
    return d / "model.safetensors.index.json"


@pytest.mark.parametrize("target", ["outside", "absolute", "dotdot-in-subdir", "not-safetensors"])
def test_index_entries_pointing_outside_are_refused_before_opening(target, tiny_llama_dir, tmp_path, capsys,
                                                                   monkeypatch):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"SECRET!!" + b"x" * 100)
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    idx = json.loads(_index(d).read_text())
    name = sorted(idx["weight_map"])[0]
    idx["weight_map"][name] = {"outside": "../secret.safetensors", "absolute": str(secret),
                               "dotdot-in-subdir": "sub/../../secret.safetensors",
                               "not-safetensors": "config.json"}[target]
    _index(d).write_text(json.dumps(idx))
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self.resolve()) or real_open(self, *a, **k))
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert "index" in line and ("outside the model directory" in line or "not a .safetensors" in line)
    assert secret.resolve() not in opened
    assert "SECRET" not in line and str(struct.unpack("<Q", b"SECRET!!")[0]) not in line


def test_header_length_is_checked_against_a_cap_before_reading(tmp_path, capsys):
    """A sparse file claiming a 3 GiB header: refused at once, nothing of that size is read."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with (d / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", 3 * 2**30) + b"{")
        fh.truncate(3 * 2**30 + 64)  # sparse: no disk used
    t0 = time.perf_counter()
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert "header length" in line and "limit" in line and time.perf_counter() - t0 < 5
    assert str(3 * 2**30) not in line


@pytest.mark.parametrize("claim,expect", [(b"root:x:0", "limit"), (struct.pack("<Q", 5000), "truncated or corrupt")],
                         ids=["passwd-like bytes", "longer than the file"])
def test_a_bad_header_length_is_reported_without_echoing_it(claim, expect, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(claim + b":0:root:/root:/bin/bash\n")
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert expect in line and str(struct.unpack("<Q", claim)[0]) not in line


def test_no_pickle_fallback_when_the_safetensors_are_missing(tiny_llama_tok_dir, tmp_path, monkeypatch, capsys):
    """`ppl` and `load_model` refuse a directory whose only weights are pytorch_model.bin; torch.load is never called."""
    from sahc_core.evaluate.model import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_tok_dir, d)
    for p in [*d.glob("*.safetensors"), _index(d)]:
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle that must never be loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ModelError):
        load_model(d, device="cpu")
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be " * 20)
    assert "pickle" in cli_error(capsys, "ppl", "--model", str(d), "--corpus", str(corpus), "--device", "cpu")


def test_load_model_asks_transformers_for_safetensors_only(tiny_llama_tok_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sahc_core.evaluate.model import load_model

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_llama_tok_dir, device="cpu")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


_NON_FLOAT = {"I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2, "I64": torch.int64}


@pytest.fixture(scope="module")
def non_float_models(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny llama whose FFN down_proj is stored in each non-float dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = {}
    shard = json.loads(_index(tiny_llama_dir).read_text())["weight_map"][FFN]
    for name, dtype in _NON_FLOAT.items():
        d = tmp_path_factory.mktemp(f"nf-{name}") / "m"
        shutil.copytree(tiny_llama_dir, d)
        with safe_open(str(d / shard), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        w = tensors[FFN]
        tensors[FFN] = (w > 0) if dtype is torch.bool else (w * 100).to(dtype)
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
        out[name] = d
    return out


@pytest.mark.parametrize("dtype", list(_NON_FLOAT))
def test_non_float_weights_are_named_and_never_analysed(dtype, non_float_models, tmp_path, cache_path, capsys):
    from sahc_core.io.source import ModelSource
    from sahc_core.spectra._blocked import spectrum_blocked
    from sahc_core.spectra.scan import matrix_table

    d = non_float_models[dtype]
    assert main(["inspect", "--model", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    row = next(t for t in info["tensors"] if t["name"] == FFN)
    assert row["dtype"] == dtype and row["analysed"] is False and dtype in info["non_float_note"]
    line = cli_error(capsys, "spectrum", "--model", str(d), "--tensor", FFN, "--device", "cpu", "--no-cache")
    assert f"stored as {dtype}" in line and "not as a 16/32/64-bit float" in line
    with pytest.raises(ModelError, match=f"stored as {dtype}"):  # the bounded-memory path reads slices itself
        spectrum_blocked(ModelSource.open(d), FFN)
    line = cli_error(capsys, "plan", "--model", str(d), "--plan", _plan_file(tmp_path, INT8))
    assert f"stored as {dtype}" in line
    assert FFN not in set(matrix_table(ModelSource.open(d))["name"])  # a scan skips it instead of failing
    with pytest.raises(ModelError, match=dtype):
        ModelSource.open(d).read(FFN, dtype=torch.float32)


def test_every_safetensors_dtype_is_in_the_table():
    from safetensors.torch import _TYPES  # name -> torch dtype, the format's own list

    from sahc_core.io.dtypes import DTYPES

    assert set(_TYPES) <= set(DTYPES), set(_TYPES) - set(DTYPES)
    for name, dt in _TYPES.items():
        if dt.itemsize:
            assert DTYPES[name].bits == 8 * dt.itemsize or name.startswith(("F4", "F6")), name
    assert {n for n, d in DTYPES.items() if d.analysed} == {"F16", "BF16", "F32", "F64"}


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
        path = _plan_file(tmp_path, {**INT8, "description": "x" * (_limits.MAX_PLAN_BYTES + 1)})
    elif kind == "depth":
        path = _plan_file(tmp_path, '{"name": "d", "default": ' + "[" * 50_000 + "]" * 50_000 + "}")
    elif kind == "overrides":
        path = _plan_file(tmp_path, {**INT8, "overrides": [{"pattern": f"t{i}", "method": "keep"}
                                                           for i in range(_limits.MAX_OVERRIDES + 1)]})
    elif kind == "pattern":
        path = _plan_file(tmp_path, {**INT8, "overrides": [{"pattern": "*" * 600, "method": "keep"}]})
    else:
        path = "/dev/zero"
    line = cli_error(capsys, "plan", "--plan", path, "--model", str(tiny_llama_dir))
    assert expect in line, line


def test_shallow_nesting_bomb_inside_a_config_is_refused(tiny_llama_dir, tmp_path, capsys):
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    line = cli_error(capsys, "plan", "--plan", _plan_file(tmp_path, {**INT8, "default": {"method": "int", "x": nested}}),
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
    assert expect in cli_error(capsys, "plan", "--plan", _plan_file(tmp_path, plan), "--model", str(tiny_llama_dir))


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
    required = {"run": ["--plan", _plan_file(tmp_path, INT8)], "export": ["--run", "r1", "--format", "dense",
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
    line = cli_error(capsys, "run", "--plan", _plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir),
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
    extra = ["--plan", _plan_file(tmp_path, INT8)] if command == "run" else []
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
    code = main(["run", "--plan", _plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir), "--run-id", "r1",
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
    assert _tree(theirs) == {"notes.txt": b"keep me"}
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
    assert _tree(victim) == {"notes.txt": b"keep me"} and _tree(theirs) == {"notes.txt": b"keep me too"}
    assert not [p for p in theirs.parent.iterdir() if p.name.startswith(".tmp-")]
