"""Calibration-statistics bench: capture time and memory on the embedded default model.

Captures ``XᵀX`` of every linear input of SmolLM2-135M-Instruct (30 layers) on the default
calibration text with the default :class:`CalibConfig` (8192 fitting + 2048 held-out tokens) into a
fresh temporary cache, then looks the statistics up again, and prints ONE JSON object: capture and
lookup seconds, the capture's process CPU seconds (on a shared machine the wall time
mostly measures the other processes; see ``load_average_1min``), tokens per second, bytes on disk, the process's resident memory after loading the
model and its peak during the capture (Linux ``VmRSS`` / ``VmHWM``), the peak of one plain forward pass
of one window for comparison (attention and MLP temporaries), and one layer's statistics' size.

    nice -n 10 .venv/bin/python bench/calib.py [--tokens N] [--heldout-tokens N] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.cache import Cache  # noqa: E402
from sahc_core.calib.stats import CalibConfig  # noqa: E402
from sahc_core.calib.store import calibration_stats  # noqa: E402
from sahc_core.evaluate.model import load_model  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=CalibConfig.tokens)
    p.add_argument("--heldout-tokens", type=int, default=CalibConfig.heldout_tokens)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cfg = CalibConfig(tokens=args.tokens, heldout_tokens=args.heldout_tokens)
    source = ModelSource.open(default_model_dir())
    model, tokenizer = load_model(source.path, device=args.device, dtype=cfg.dtype)
    from sahc_core.io.corpus import default_corpus

    text = default_corpus().calib_text
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "sahc.duckdb")
        rss_model = _status_mib("VmRSS")
        _reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = calibration_stats(source, cache, text, cfg, model=model, tokenizer=tokenizer)
        capture_s, capture_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak = _status_mib("VmHWM")
        start = time.perf_counter()
        again = calibration_stats(source, cache, text, cfg, model=model, tokenizer=tokenizer)
        lookup_s = time.perf_counter() - start
        assert again.meta["created_at"] == stats.meta["created_at"]
        biggest = max(stats.for_weight(w).xtx.shape[0] for w in stats.weights())
        layer_shard = max(f.stat().st_size for f in stats.path.glob("*.layers.*.safetensors"))
        meta = stats.meta
    rss_before = _status_mib("VmRSS")
    _reset_peak()
    first = tokenizer(text[:100_000])["input_ids"][: min(cfg.tokens, 2048)]
    with torch.inference_mode():  # one plain forward pass of one window (logits included), for comparison
        model(input_ids=torch.tensor([first], device=args.device), use_cache=False)
    forward_peak = _status_mib("VmHWM") - rss_before
    n_layers = model.config.num_hidden_layers
    print(json.dumps({
        "model": source.path.name, "layers": n_layers, "device": args.device, "threads": torch.get_num_threads(),
        "tokens": meta["tokens"], "heldout_tokens": meta["heldout_tokens"], "window": meta["window"],
        "capture_seconds": round(capture_s, 2), "capture_cpu_seconds": round(capture_cpu, 2),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "tokens_per_second": round((cfg.tokens + cfg.heldout_tokens) / capture_s, 1),
        "lookup_seconds": round(lookup_s, 3), "bytes_on_disk": meta["bytes"], "widest_input": biggest,
        "rss_after_model_mib": round(rss_model, 1), "peak_rss_during_capture_mib": round(peak, 1),
        "capture_increment_mib": round(peak - rss_model, 1),
        "one_forward_window_increment_mib": round(forward_peak, 1),
        "one_layer_stats_float64_mib": round(layer_shard * 4 / 2**20, 1),  # both splits: the shard is a float32 triangle
        "python": platform.python_version(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
