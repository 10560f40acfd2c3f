"""Perplexity bench: sahc_core.evaluate.perplexity vs the plain Hugging Face perplexity-guide loop.

Runs on the embedded default model (SmolLM2-135M-Instruct) and the default corpus test text
(Macbeth + The Tempest), on the same windows, and prints ONE JSON object: both perplexities, their
relative difference (must be < 0.1 %), both throughputs (tokens/s) and their ratio (ours/theirs).

    .venv/bin/python bench/ppl.py                      # first 16k tokens (a few minutes on 2 CPU cores)
    .venv/bin/python bench/ppl.py --whole              # the whole test text
    .venv/bin/python bench/ppl.py --skip-reference     # only our perplexity (e.g. whole-text baseline)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.io.corpus import default_corpus  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.evaluate.perplexity import DEFAULT_WINDOW, PplConfig, perplexity  # noqa: E402
from sahc_core.evaluate.model import _max_positions, load_model  # noqa: E402


def hf_guide_ppl(model, encodings: torch.Tensor, max_length: int, stride: int) -> tuple[float, int, float, float]:
    """The loop of the transformers docs ("Perplexity of fixed-length models"), one window at a time.

    Copied as the docs give it (``labels=`` loss per window weighted by its token count); returns
    ``(ppl, tokens, wall seconds, process CPU seconds)``.
    """
    device = next(model.parameters()).device
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return math.exp(float(nll_sum / n_tokens)), n_tokens, seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384, help="first N tokens of the test text")
    parser.add_argument("--whole", action="store_true", help="use the whole test text (ignores --max-tokens)")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the library's (1 on CPU, 8 on GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="alternate ours / HF loop this many times; best of each")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-reference", action="store_true", help="run only our perplexity")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model_dir = default_model_dir()
    convert_s = time.perf_counter() - t0
    model, tokenizer = load_model(model_dir, device=args.device)
    text = default_corpus().test_text
    cfg = PplConfig(window=args.window, max_tokens=None if args.whole else args.max_tokens,
                    batch_size=args.batch_size, device=args.device)
    with torch.inference_mode():  # warm-up (allocator, kernels) so neither timed loop pays it
        model(tokenizer(text[:2000], return_tensors="pt").input_ids[:, :256].to(next(model.parameters()).device))
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    if not args.whole:
        ids = ids[:, : args.max_tokens]
    # Alternate the two loops (theirs first, then ours first, ...) and keep the best of each: one slow
    # pass (another process, a cold cache) must not decide the comparison, nor must going first. The
    # HF loop runs first of all, before perplexity() ever touches the allocator settings.
    ours, ours_cpu, ref = None, math.inf, None
    window = cfg.window or min(DEFAULT_WINDOW, _max_positions(model) or DEFAULT_WINDOW)  # what perplexity() picks
    for i in range(max(1, args.repeats)):
        if i % 2 == 0 and not args.skip_reference:
            r = hf_guide_ppl(model, ids, window, window)
            ref = r if ref is None or r[2] < ref[2] else ref
        cpu_start = time.process_time()
        res = perplexity(model, tokenizer, text, cfg)
        cpu = time.process_time() - cpu_start
        if ours is None or res.seconds < ours.seconds:
            ours, ours_cpu = res, cpu
        if i % 2 and not args.skip_reference:
            r = hf_guide_ppl(model, ids, res.window, res.stride)
            ref = r if ref is None or r[2] < ref[2] else ref
    out = {
        "model": model_dir.name, "corpus": "shakespeare test (macbeth + tempest)",
        "device": ours.device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "default_model_dir_seconds": round(convert_s, 3), "repeats": args.repeats, "timing": "best of repeats, alternating which loop goes first (the HF loop first of all)",
        "text_tokens": ours.text_tokens, "window": ours.window, "stride": ours.stride, "windows": ours.windows,
        "batch_size": ours.batch_size, "ours": {"ppl": ours.ppl, "tokens": ours.tokens, "seconds": round(ours.seconds, 3),
                                                 "cpu_seconds": round(ours_cpu, 3), "tokens_per_s": round(ours.tokens / ours.seconds, 1)},
    }
    if ref is not None:
        ref_ppl, ref_tokens, ref_s, ref_cpu = ref
        out["hf_guide"] = {"ppl": ref_ppl, "tokens": ref_tokens, "seconds": round(ref_s, 3),
                           "cpu_seconds": round(ref_cpu, 3), "tokens_per_s": round(ref_tokens / ref_s, 1)}
        out["ppl_rel_diff"] = abs(ours.ppl - ref_ppl) / ref_ppl
        out["throughput_ratio"] = round((ours.tokens / ours.seconds) / (ref_tokens / ref_s), 3)
        # CPU-time ratio: less sensitive to other processes sharing the cores than wall time
        out["cpu_throughput_ratio"] = round((ours.tokens / ours_cpu) / (ref_tokens / ref_cpu), 3)
        out["ok"] = bool(out["ppl_rel_diff"] < 1e-3 and ours.tokens == ref_tokens and ours.window == window
                         and out["throughput_ratio"] >= 1.0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
