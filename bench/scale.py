"""Scale bench: wall time and peak RSS of each CLI command on a Qwen3.5-9B-shaped checkpoint, as JSON.

Writes once (cached in ``--dir``) a random checkpoint with the real Qwen3.5-9B tensor names and
full-size embedding (248,320 x 4,096), FFN, vision tower and MTP head, but ``--layers`` text layers
(default 4: ~7.2 GB bf16; ``sahc_core.io.synthetic``), then runs each command as a child process
(``nice -n 10 python -m sahc_core ... --json --no-cache --device DEVICE``, default cpu, or one of the
``--child-*`` functions of ``bench/_scale_children.py`` for what is not a CLI call) and records per command

* ``seconds``      wall time of the child; ``cpu_seconds`` its user + system CPU time (steadier than
                   wall time on a shared machine);
* ``peak_rss_gb``  its peak resident set (``ru_maxrss`` from ``os.wait4`` of that one child: VmHWM,
                   file-backed mapped pages included), 1 GB = 1e9 bytes;
* ``tree_rss_gb``  the largest sum of VmRSS over the child and its descendants, sampled every 0.2 s;
* ``bound_gb``     the design's memory bound, 2.5 x the largest tensor's bf16 bytes + 1.5 GB;
* ``within_bound``, ``rc`` (-9 and ``timed_out`` after ``--timeout``), ``stderr_tail`` (last line),
  ``result`` (the scalar fields of the command's JSON answer).

``gram64-*`` / ``gram32-*`` run ``sahc_core.spectra._blocked.spectrum_blocked`` (float64 / float32
block products) in a child the same way; ``comparisons`` gives max |Δσ| / σ_max between any two of
gram64, gram32 and the ``spectrum`` command for the same tensor (σ are kept in ``<dir>-spectra/``
across invocations, per checkpoint fingerprint).
Prints ONE JSON object on stdout (progress on stderr); ``--out FILE`` also merges it into FILE.

    .venv/bin/python bench/scale.py --list
    .venv/bin/python bench/scale.py --only inspect plan measure-int-ffn
    .venv/bin/python bench/scale.py --only gram --out /tmp/scale.json
    .venv/bin/python bench/scale.py --only spectrum-embedding --timeout 3600 --out /tmp/scale.json
    .venv/bin/python bench/scale.py --device cuda --out /tmp/scale-cuda.json

``page-model``, ``page-spectrum`` and ``page-whatif`` run the dashboard page itself (``app_pages/<page>.py``
under Streamlit's ``AppTest``, a fresh cache) on the checkpoint and drive it to its heaviest views: the Model
page opens (header reads only); the Spectrum page shows the first tensor, then the embedding component
(the 248,320-row LM head's spectrum) and an FFN tensor; the What-if page measures its default method on
the first tensor, then the LM head and the embedding in the same process (its in-process caches are
bounded in bytes); ``result.steps`` gives the time at which each view was drawn;
``assemble-int4`` the run's assembly stage (written next to ``--dir``, then deleted). ``ppl-offload``
(512 tokens, one decoder layer at a time, bf16), ``calib`` (XᵀX of every text-model linear input,
512 + 128 tokens) and ``run-int4`` (the int4-g128 plan end to end: assembly, gates, smoke test,
baseline and compressed perplexity on 512 tokens, offload decided by the run) and ``measure-gptq-*`` /
``measure-wsvd-*`` (the method's defaults on an FFN matrix and the LM head with the statistics ``calib``
captured, looked up in the cache) use ``<dir>-tok``: the
same shards linked plus a word-level tokenizer trained on the default corpus (random weights: the
perplexities mean nothing, the time and memory do), with a cache next to ``--dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _scale_children import CALIB, CHILDREN, EMBEDDING, FFN, HEAD, PAGE_STEPS  # noqa: E402 - bench/ is sys.path[0]

GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def commands(model: Path, spectra: Path, block_bytes: int, device: str = "cpu",
             work: Path | None = None) -> dict[str, list[str]]:
    """Every measurable command: name -> argv of the child (without ``nice``); gram children save σ in ``spectra``."""
    cli = [sys.executable, "-m", "sahc_core"]
    common = ["--model", str(model), "--json", "--no-cache", "--device", device]
    me = [sys.executable, str(Path(__file__).resolve())]
    work = work or Path(tempfile.gettempdir())
    out: dict[str, list[str]] = {
        "inspect": [*cli, "inspect", *common],
        "spectrum-embedding": [*cli, "spectrum", "--tensor", EMBEDDING, *common],
        "spectrum-ffn": [*cli, "spectrum", "--tensor", FFN, *common],
        "scan": [*cli, "scan", *common],
        "scan-ray-attention": [*cli, "scan", "--ray", "local:2", "--component", "attention_full", *common],
        "measure-int-embedding": [*cli, "measure", "--tensor", EMBEDDING, "--method", "int", "--bits", "4",
                                  "--group-size", "128", *common],
        "measure-int-ffn": [*cli, "measure", "--tensor", FFN, "--method", "int", "--bits", "4", "--group-size", "128",
                            *common],
        "measure-svd-ffn": [*cli, "measure", "--tensor", FFN, "--method", "svd", "--rank", "512", *common],
        "measure-svd-embedding": [*cli, "measure", "--tensor", EMBEDDING, "--method", "svd", "--rank", "512", *common],
        "measure-keep-embedding": [*cli, "measure", "--tensor", EMBEDDING, "--method", "keep", *common],
        "measure-hqq-embedding": [*cli, "measure", "--tensor", EMBEDDING, "--method", "hqq", *common],
        "measure-tt-embedding": [*cli, "measure", "--tensor", EMBEDDING, "--method", "tt", *common],
        "sweep-embedding": [*cli, "sweep", "--tensor", EMBEDDING, *common],
        "plan": [*cli, "plan", "--plan", str(ROOT / "plans" / "int4-g128.json"), *common],
        **{f"page-{p}": [*me, "--child-page", p, str(model)] for p in PAGE_STEPS},
        "assemble-int4": [*me, "--child-assemble", str(model), str(ROOT / "plans" / "int4-g128.json"),
                          str(work / "sahc-scale-assembled"), device],
    }
    # ppl / calib / run need a tokenizer: the same shards (linked) plus a word-level one (with_tokenizer)
    tok = Path(f"{model}-tok")
    small = ["--window", "128", "--dtype", "bfloat16"]
    cache = str(work / "sahc-scale-cache.duckdb")
    cached = ["--model", str(tok), "--json", "--cache", cache, "--device", device]
    out.update({
        "ppl-offload": [*cli, "ppl", "--max-tokens", "512", *small, "--offload", "always", *cached],
        "calib": [*cli, "calib", *(x for k, v in CALIB.items() for x in (f"--{k.replace('_', '-')}", str(v))), *cached],
        **{f"measure-{m}-{what}": [*me, "--child-measure-calib", str(tok), cache, t, m, device]
           for m in ("gptq", "wsvd") for what, t in (("ffn", FFN), ("head", HEAD))},
        "run-int4": [*cli, "run", "--plan", str(ROOT / "plans" / "int4-g128.json"), "--max-tokens", "512", *small,
                     "--offload", "auto", *cached],
    })
    for what, tensor in (("embedding", EMBEDDING), ("ffn", FFN)):
        for bits in ("64", "32"):
            out[f"gram{bits}-{what}"] = [*me, "--child-gram", str(model), tensor, f"float{bits}", str(block_bytes),
                                         str(spectra / f"gram{bits}-{what}.npy")]
    return out


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat parent ids)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    parent[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass  # ended between listing and reading: it holds no memory any more
    return 0


def run_measured(argv: list[str], timeout: float) -> dict:
    """Run one child under ``nice -n 10``; wall time, peak RSS (wait4), sampled tree RSS, rc, output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["nice", "-n", "10", *argv], stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        tree_peak, timed_out = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, sum(_rss_kib(p) for p in _children(proc.pid)))
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    answer = None
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if last.startswith("{"):
        answer = json.loads(last)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
            "tree_rss_gb": round(tree_peak * 1024 / GB, 3), "rc": proc.returncode, "timed_out": timed_out,
            "stderr_tail": lines[-1] if lines else "", "answer": answer}


def _scalars(answer: dict | None) -> dict:
    """The scalar top-level fields of a command's JSON answer (lists and tables left out; a page's steps kept)."""
    if not isinstance(answer, dict):
        return {}
    return {k: v for k, v in answer.items() if isinstance(v, str | int | float | bool) or v is None or k == "steps"}


def ensure_model(directory: Path, layers: int, tied: bool, timeout: float) -> dict:
    """Write the synthetic checkpoint in a measured child unless a complete one with these parameters exists."""
    from sahc_core.io.synthetic import synthetic_params

    want = {"n_layers": layers, "full_size": True, "dtype": "bfloat16", "seed": 0, "tie_word_embeddings": tied}
    have = synthetic_params(directory)
    if have is not None and all(have.get(k) == v for k, v in want.items()):
        return {"cached": True, **have}
    log(f"writing the synthetic checkpoint to {directory} (several minutes) ...")
    code = ("import sys; from sahc_core.io.synthetic import write_qwen35_like; "
            f"write_qwen35_like({str(directory)!r}, n_layers={layers}, tie_word_embeddings={tied})")
    rec = run_measured([sys.executable, "-c", code], timeout)
    rec.pop("answer")
    if rec["rc"] != 0:
        raise SystemExit(f"generating the checkpoint failed (rc {rec['rc']}): {rec['stderr_tail']}")
    return {"cached": False, **rec, **(synthetic_params(directory) or {})}


def compare(results: dict, spectra_dir: Path) -> dict:
    """max |Δσ| / σ_max between the spectra of one tensor: this run's and earlier runs' on the same checkpoint."""
    out = {}
    for what in ("embedding", "ffn"):
        answer = results.get(f"spectrum-{what}", {}).pop("answer", None)
        if isinstance(answer, dict) and "singular_values" in answer:
            np.save(spectra_dir / f"spectrum-{what}.npy", np.asarray(answer["singular_values"], dtype=np.float64))
        spectra = {f.stem.split("-")[0]: np.load(f) for f in sorted(spectra_dir.glob(f"*-{what}.npy"))}
        names = sorted(spectra)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                s, t = spectra[a], spectra[b]
                out[f"{what}: {a} vs {b}"] = float(np.max(np.abs(s - t)) / max(s[0], t[0]))
    return out


def with_tokenizer(model: Path) -> Path:
    """``<model>-tok``: every file of ``model`` linked, plus a word-level tokenizer (ids far below the
    248,320 vocabulary) trained on the default corpus, so that ``ppl``, ``calib`` and ``run`` have one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sahc_core.io.corpus import default_corpus

    out = Path(f"{model}-tok")
    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    text = default_corpus()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text.calib_text, text.test_text],
                            trainers.WordLevelTrainer(vocab_size=32000, special_tokens=["[UNK]", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>").save_pretrained(out)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        CHILDREN[sys.argv[1]](*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sahc-qwen35-9b-like"), help="checkpoint directory (cache)")
    parser.add_argument("--layers", type=int, default=4, help="text decoder layers of the checkpoint")
    parser.add_argument("--tied", action=argparse.BooleanOptionalAction, default=False,
                        help="store the embedding once (Qwen3.5-9B itself stores lm_head: --no-tied)")
    parser.add_argument("--only", nargs="+", help="command names or prefixes (e.g. gram, measure, spectrum-ffn)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    parser.add_argument("--block-mib", type=int, default=256, help="block size of the gram commands (MiB)")
    parser.add_argument("--out", type=Path, help="also merge the JSON into this file")
    parser.add_argument("--list", action="store_true", help="list the command names and exit")
    parser.add_argument("--device", default="cpu", help="device of every command (cpu, cuda)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()

    names = list(commands(args.dir, Path(), 0))
    if args.list:
        print("\n".join(names))
        return
    chosen = [n for n in names if not args.only or any(n.startswith(p) for p in args.only)]
    if not chosen:
        raise SystemExit(f"no command matches {args.only}; see --list.")
    generated = ensure_model(args.dir, args.layers, args.tied, args.timeout)
    if any(n in ("ppl-offload", "calib", "run-int4") for n in chosen):
        with_tokenizer(args.dir)

    from sahc_core.io.source import ModelSource

    source = ModelSource.open(args.dir)
    spectra = Path(f"{args.dir}-spectra") / source.fingerprint[:16]  # σ kept across runs, per checkpoint
    spectra.mkdir(parents=True, exist_ok=True)
    table = commands(args.dir, spectra, args.block_mib * 2**20, args.device, args.dir.parent)
    largest = max(source.tensors(), key=lambda t: t.numel)
    bound_gb = 2.5 * largest.numel * 2 / GB + 1.5
    results: dict[str, dict] = {}
    for name in chosen:
        log(f"{name} ...")
        rec = run_measured(table[name], args.timeout)
        rec.update(bound_gb=round(bound_gb, 3), within_bound=rec["peak_rss_gb"] <= bound_gb, command=table[name][1:])
        rec["result"] = _scalars(rec["answer"])
        results[name] = rec
        log(f"{name}: rc {rec['rc']}, {rec['seconds']} s, peak {rec['peak_rss_gb']} GB (bound {bound_gb:.2f})"
            + (f" - {rec['stderr_tail']}" if rec["rc"] else ""))
    comparisons = compare(results, spectra)
    for rec in results.values():
        rec.pop("answer", None)
    report = {"model_dir": str(args.dir), "generated": generated, "largest_tensor": largest.name,
              "largest_shape": list(largest.shape), "bound_gb": round(bound_gb, 3),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_at_start": load_at_start},
              "commands": results, "comparisons": comparisons}
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        old_commands, old_comparisons = old.get("commands", {}), old.get("comparisons", {})
        merged = {**old, **report, "commands": {**old_commands, **results},
                  "comparisons": {**old_comparisons, **comparisons}}
        args.out.write_text(json.dumps(merged, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
