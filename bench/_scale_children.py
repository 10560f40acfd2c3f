"""The child processes of ``bench/scale.py`` (``scale.py --child-NAME ARGS``): each measured command that is
not a CLI call runs one of these in its own process, so that its peak RSS is its own.

``--child-gram`` one blocked spectrum; ``--child-page`` a dashboard page under AppTest (:data:`PAGE_STEPS`);
``--child-assemble`` the run's assembly stage; ``--child-measure-calib`` a calibration-aware method with
the statistics ``calib`` captured. Each prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

EMBEDDING = "model.language_model.embed_tokens.weight"
FFN = "model.language_model.layers.0.mlp.gate_proj.weight"
HEAD = "lm_head.weight"
#: The ``calib`` command's statistics, which ``measure-gptq-*`` / ``measure-wsvd-*`` look up.
CALIB = {"tokens": 512, "heldout_tokens": 128, "window": 128}


def child_gram(model: str, tensor: str, precision: str, block_bytes: str, out_file: str) -> None:
    """``--child-gram``: one blocked spectrum; saves σ to ``out_file``, prints a JSON line."""
    from sahc_core.io.source import ModelSource
    from sahc_core.spectra._blocked import spectrum_blocked

    t0 = time.perf_counter()
    r = spectrum_blocked(ModelSource.open(model), tensor, precision=precision, block_bytes=int(block_bytes))
    np.save(out_file, r.singular_values)
    print(json.dumps({"tensor": tensor, "shape": list(r.shape), "method": r.method, "block_rows": r.block_rows,
                      "error_estimate": r.error_estimate, "within_contract": r.within_contract,
                      "seconds": time.perf_counter() - t0}))


#: Per page: the (widget key, value) selections made in turn, each followed by a script run.
PAGE_STEPS: dict[str, tuple[tuple[str, str], ...]] = {
    "model": (),
    "spectrum": (("sp_component", "embedding"), ("sp_component", "ffn"), ("sp_tensor", FFN)),
    "whatif": (("wi_component", "embedding"), ("wi_tensor", EMBEDDING)),
}


def child_page(page: str, model: str) -> None:
    """``--child-page``: ``app_pages/<page>.py`` under AppTest on ``model``, through :data:`PAGE_STEPS`, timed."""
    import shutil

    from streamlit.testing.v1 import AppTest

    sys.path.insert(0, str(ROOT))  # the pages import app_state / app_widgets from the repo root
    tmp = Path(tempfile.mkdtemp(prefix="sahc-scale-page-"))
    os.environ["SAHC_CACHE"] = str(tmp / "sahc.duckdb")
    t0 = time.perf_counter()
    steps: list[dict] = []
    try:
        at = AppTest.from_file(str(ROOT / "app_pages" / f"{page}.py"), default_timeout=7200)
        at.session_state["model_path"] = model
        for key, value in (("open", ""), *PAGE_STEPS[page]):
            if key != "open":
                at.selectbox(key=key).select(value)
            at.run()
            if at.exception or at.error:
                what = (at.exception or at.error)[0].value
                raise SystemExit(f"{page} page after {key}={value!r}: {str(what).splitlines()[0]}")
            steps.append({"step": key if key == "open" else f"{key}={value}", "seconds": round(time.perf_counter() - t0, 2),
                          "metrics": {m.label: m.value for m in at.metric}})  # what the page showed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"page": page, "steps": steps, "seconds": time.perf_counter() - t0}))


def child_assemble(model: str, plan: str, out: str, device: str) -> None:
    """``--child-assemble``: the run's assembly stage of ``plan`` (streaming, tensor by tensor), then delete it."""
    import shutil

    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import assemble
    from sahc_core.plans.plan import CompressionPlan

    t0 = time.perf_counter()
    res = assemble(ModelSource.open(model), CompressionPlan.from_json(plan), out, overwrite=True, device=device)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"ratio_actual": res["ratio_actual"], "ratio_projected": res["ratio_projected"],
                      "n_tensors": res["n_tensors"], "seconds": time.perf_counter() - t0}))


def child_measure_calib(model: str, cache: str, tensor: str, method: str, device: str) -> None:
    """``--child-measure-calib``: ``measure`` of a calibration-aware method (its defaults) on ``tensor``, with
    the statistics the ``calib`` command captured (512 + 128 tokens, window 128: looked up, not recomputed;
    their XᵀX are rank-deficient at that size, so damping carries the solve: the time and memory are what
    this measures)."""
    from sahc_core.cache import Cache
    from sahc_core.calib.stats import CalibConfig
    from sahc_core.calib.store import calibration_stats
    from sahc_core.io.corpus import default_corpus
    from sahc_core.io.source import ModelSource
    from sahc_core.methods import registry
    from sahc_core.whatif.measure import measure_tensor

    source = ModelSource.open(model)
    t0 = time.perf_counter()
    calib = calibration_stats(source, Cache(Path(cache)), default_corpus().calib_text, CalibConfig(**CALIB),
                              device=device)
    t_calib = time.perf_counter() - t0
    res = measure_tensor(source, tensor, registry.config_from_values(method, {}), device=device, log=False, calib=calib)
    print(json.dumps({"tensor": tensor, "method": method, "label": res.get("label"), "bytes": res.get("bytes"),
                      "rel_error": res.get("rel_error"), "output_error": res.get("output_error"),
                      "calib_lookup_seconds": t_calib, "seconds": time.perf_counter() - t0}))


#: ``--child-NAME`` -> the function its arguments go to.
CHILDREN = {"--child-gram": child_gram, "--child-page": child_page, "--child-assemble": child_assemble,
            "--child-measure-calib": child_measure_calib}
