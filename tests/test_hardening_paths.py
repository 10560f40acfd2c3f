"""Hardening (issue 13), identifiers and paths: an identifier never becomes a path unchecked, and only
directories SAHC created are deleted or replaced (run ids, plan names, manifests, exports).

CLI cases go through ``sahc_core.cli.main.main`` and must print exactly one ``error:`` line (never
"unexpected"); the other classes are in ``test_hardening_models.py`` and ``test_hardening_limits.py``,
the pages' cases in ``test_hardening_ui.py``.
"""
from __future__ import annotations

import json

import pytest
from _hardening_helpers import INT8, cli_error, file_tree, plan_file

from sahc_core.cache import Cache
from sahc_core.errors import PlanError
from sahc_core.paths import MARKER, PathError, contained, mark_owned, member, remove_owned, safe_id, safe_label


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
    plan = plan_file(tmp_path, INT8)
    before = file_tree(tmp_path)
    line = cli_error(capsys, "run", "--plan", plan, "--model", str(tiny_llama_dir), "--run-id", run_id,
                     "--device", "cpu")
    assert "run-id" in line and "not allowed" in line
    after = file_tree(tmp_path)
    assert after == before  # nothing removed, nothing written (not even the cache file)


def test_cli_run_id_whose_directory_is_a_planted_symlink(tiny_llama_dir, tmp_path, cache_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    (cache_path.parent / "runs").mkdir(parents=True)
    (cache_path.parent / "runs" / "r1").symlink_to(elsewhere)
    line = cli_error(capsys, "run", "--plan", plan_file(tmp_path, INT8), "--model", str(tiny_llama_dir),
                     "--run-id", "r1", "--device", "cpu")
    assert "outside" in line
    assert file_tree(elsewhere) == {"precious.txt": b"keep"}


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
    assert file_tree(theirs) == {"data.csv": b"a,b"}
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
