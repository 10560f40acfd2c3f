"""sahc_core.runs.view: what the Runs page shows of runs, from plain rows (tests/test_page_runs.py draws it)."""
from __future__ import annotations

import pandas as pd

from sahc_core.figures.format import no_raw_cells
from sahc_core.runs import view


def _runs() -> pd.DataFrame:
    return pd.DataFrame({"run_id": ["a", "b", "c", "d"], "plan_name": ["p"] * 4,
                         "status": ["done", "running", "failed", "done"], "stage": ["done", None, "ppl", "done"],
                         "checkpoint_mb": [2.0, 0.0, 1.5, 0.0], "gates_failed": [0, None, 2, 0]})


def test_live_table_shows_the_stage_of_active_runs_and_the_sizes_given():
    table = view.live_table(_runs(), {"a": 3.0, "c": 1.5}).set_index("Run")
    assert table.loc["b", "Status (stage)"] == "running (queued)" and table.loc["a", "Status (stage)"] == "done"
    assert not no_raw_cells(table.reset_index()), no_raw_cells(table.reset_index())


def test_subsets_and_gate_warnings():
    runs = _runs()
    assert view.finished(runs)["run_id"].tolist() == ["a", "c", "d"]
    assert view.on_disk(runs)["run_id"].tolist() == ["a", "c"]
    assert view.exportable(runs) == ["a"]
    assert view.gate_warnings(runs) == ["Run c (p): 2.0 quality gate(s) failed; see the gate log."]


def test_progress_line_without_expected_work_uses_the_stage_fraction():
    frac, text = view.progress_line("r1", {"plan_name": "int4", "status": "running", "stage": "gates",
                                           "duration_s": 5.0, "progress": {"fraction": 0.5, "tensors_done": 1,
                                                                           "tensors_total": 2}})
    assert frac == 0.5
    assert text.startswith("**int4** (r1) · running · stage gates (2/4) · tensors 1/2 · elapsed")


def test_evaluation_notes():
    assert view.evaluation_notes("r", {}) == (None, None, {})
    how, note, tensors = view.evaluation_notes("r", {
        "offload": {"offload": True, "reason": "always"}, "protocol": {"dtype_note": "float32"},
        "evaluation": {"note": "1 MTP tensor not evaluated", "not_evaluated_tensors": {"mtp": ["mtp.fc.weight"]}}})
    assert how == "Run r: evaluated one decoder layer at a time (always), float32"
    assert note == "Run r: 1 MTP tensor not evaluated" and tensors == {"mtp": ["mtp.fc.weight"]}


def test_failed_gates_heading_and_sentence():
    gates = pd.DataFrame({"gate": ["rel_error", "theory"], "tensor": ["w1", "w2"], "passed": [True, False]})
    failed, heading = view.failed_gates(gates)
    assert heading == "**Quality gates** (2 decisions, 1 failed)" and failed["gate"].tolist() == ["theory"]
    assert view.failed_gates_sentence(failed) == "1 gate(s) failed in the selected runs: theory on w2"
    assert view.failed_gates(gates.iloc[:0])[1] == "**Quality gates** (0 decisions, 0 failed)"
