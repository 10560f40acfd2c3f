"""Export bench: bytes on disk of each export format vs the run's checkpoint, and that each export
loads (transformers alone, float32) with the run's weights and perplexity.

On the embedded default model (SmolLM2-135M-Instruct) it assembles the shipped plans int8 and
int4-g128 (asym) and three symmetric / GGML-shaped variants, exports each in every format (a refusal
is recorded with its message), and prints ONE JSON object: per plan and format the bytes of the
export, of its weight files and of the run's checkpoint, the compressed-tensors overhead, the
number of tensors that differ from ``load_assembled`` (float32) and the perplexity of the export vs
that of the run's weights on the first ``--max-tokens`` tokens of the default corpus (same windows).

    .venv/bin/python bench/export_sizes.py                  # ~5 min on 2 busy CPU cores
    .venv/bin/python bench/export_sizes.py --plans int8-sym --formats compressed-tensors
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.errors import SahcError  # noqa: E402
from sahc_core.evaluate.model import load_model  # noqa: E402
from sahc_core.evaluate.perplexity import PplConfig, perplexity  # noqa: E402
from sahc_core.io.corpus import default_corpus  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.plans.assemble import assemble, load_assembled  # noqa: E402
from sahc_core.plans.export import export_checkpoint  # noqa: E402
from sahc_core.plans.plan import CompressionPlan  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NORMS = {"pattern": "*norm*", "method": "keep"}
VARIANTS = {
    "int8-sym": {"default": {"method": "int", "bits": 8, "group_size": None, "scheme": "sym"}, "overrides": [NORMS]},
    "int4-sym-g32": {"default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "sym"},
                     "components": {"embedding": {"method": "int", "bits": 8, "group_size": 32, "scheme": "sym"}},
                     "overrides": [NORMS]},
    "int4-asym-g32": {"default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "asym"},
                      "components": {"embedding": {"method": "int", "bits": 8, "group_size": 32, "scheme": "sym"}},
                      "overrides": [NORMS]},
}


def _plans() -> dict[str, CompressionPlan]:
    out = {name: CompressionPlan.from_json(REPO / "plans" / f"{name}.json") for name in ("int8", "int4-g128")}
    out.update({name: CompressionPlan.from_dict({"name": name, **d}) for name, d in VARIANTS.items()})
    return out


def _load_export(out: Path, fmt: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": "model.gguf"} if fmt == "gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # compressed-tensors decompresses on the first forward
    return model, AutoTokenizer.from_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", nargs="+", default=None, help="plan names (default: all)")
    ap.add_argument("--formats", nargs="+", default=["dense", "compressed-tensors", "gguf"])
    ap.add_argument("--max-tokens", type=int, default=2048)
    args = ap.parse_args()
    model_dir = default_model_dir()
    source = ModelSource.open(model_dir)
    text = default_corpus().test_text
    cfg = PplConfig(max_tokens=args.max_tokens, device="cpu")
    plans = _plans()
    report = {"model": str(model_dir), "max_tokens": args.max_tokens, "plans": {}}
    with tempfile.TemporaryDirectory(prefix="sahc-export-bench-") as tmp:
        for name in args.plans or list(plans):
            t0 = time.perf_counter()
            run = Path(tmp) / name
            asm = assemble(source, plans[name], run, device="cpu")
            ref = load_assembled(run)
            model, tok = load_model(model_dir, device="cpu", state_dict=ref)
            entry = {"run_bytes": asm["bytes_actual"], "ratio_actual": asm["ratio_actual"],
                     "ppl_run": perplexity(model, tok, text, cfg).ppl, "exports": {}}
            del model
            for fmt in args.formats:
                out = Path(tmp) / f"{name}.{fmt}"
                try:
                    res = export_checkpoint(run, model_dir, out, fmt)
                except SahcError as exc:
                    entry["exports"][fmt] = {"refused": str(exc)}
                    continue
                exported, etok = _load_export(out, fmt)
                sd = exported.state_dict()
                diff = sorted(n for n, t in ref.items() if not torch.equal(sd[n], t))
                entry["exports"][fmt] = {
                    "bytes": res["bytes"], "bytes_weights": res["bytes_weights"],
                    "weights_vs_run": res["bytes_weights"] / res["bytes_run"], "tensors": res["tensors"],
                    "differing_tensors_float32": len(diff), "differing_examples": diff[:3],
                    "ppl": perplexity(exported, etok, text, cfg).ppl, "overhead": res.get("overhead"),
                    "ggml_types": res.get("ggml_types"), "notes": res["notes"]}
                del exported
                shutil.rmtree(out)
            entry["seconds"] = time.perf_counter() - t0
            report["plans"][name] = entry
            shutil.rmtree(run)
            print(f"{name}: done in {entry['seconds']:.0f} s: {json.dumps(entry)}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
