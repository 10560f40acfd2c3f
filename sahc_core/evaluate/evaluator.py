"""The model of one run (or one ``ppl`` call): in memory or one layer at a time, same numbers either way.

An :class:`Evaluator` holds the evaluated model of a checkpoint and answers the three questions a
run asks, in this order: the forward smoke test (:func:`~sahc_core.evaluate.smoke.layer_output_cosines`,
on the ORIGINAL model), the baseline perplexity, the compressed perplexity (Ŵ from the assembled
checkpoint, rebuilt one tensor at a time in the run dtype).

* In memory (``offload=False``): one model (``load_model``); the compressed weights are loaded into
  it, tensor by tensor (``load_state`` on an ``AssembledWeights``), after the baseline.
* Layer by layer (``offload=True``): an empty model; each pass reads the original weights or
  rebuilds the compressed ones one decoder layer at a time (:mod:`sahc_core.evaluate.offload`).

bfloat16 on a CPU: it halves the weights' memory; the matrix products run natively where the CPU has
AVX512-BF16 or AMX, and are emulated (slower than float32) elsewhere — :func:`dtype_note` says which.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from sahc_core.device import resolve_device
from sahc_core.evaluate.model import DTYPES
from sahc_core.evaluate.perplexity import PplConfig, PplResult, perplexity

#: The dtypes a run or ``ppl`` may evaluate in.
RUN_DTYPES = ("float32", "bfloat16")


def bf16_native() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def dtype_note(dtype: str, device: str) -> str:
    """One sentence on what ``dtype`` means on ``device`` (stated in the run result and by ``ppl``)."""
    if dtype != "bfloat16":
        return f"{dtype}: weights and activations in {dtype}."
    if device.startswith("cuda"):
        return "bfloat16 on the GPU: half the weight memory of float32."
    if bf16_native():
        return "bfloat16 on a CPU with native bf16 products (AVX512-BF16/AMX): half the weight memory of float32."
    return ("bfloat16 on a CPU without native bf16 products: half the weight memory of float32, but the "
            "products are emulated and slower than float32.")


class Evaluator:
    """The evaluated model of ``model_dir``, in memory or layer by layer (module docstring).

    Parameters
    ----------
    model_dir : str or Path
    names : NameMap
        Checkpoint -> model names (:func:`sahc_core.evaluate.names.name_map_for`).
    cfg : PplConfig
        Perplexity protocol; ``cfg.dtype`` is the run dtype.
    device : str
    offload : bool
        Layer by layer instead of in memory.
    """

    def __init__(self, model_dir: str | Path, names, cfg: PplConfig, device: str = "auto", offload: bool = False):
        from sahc_core.evaluate.model import load_model, load_tokenizer
        from sahc_core.evaluate.names import empty_model

        self.model_dir, self.names, self.cfg = Path(model_dir), names, cfg
        self.device, self.offload = resolve_device(device), offload
        if offload:
            self.tokenizer = load_tokenizer(self.model_dir)
            self.model = empty_model(self.model_dir, cfg.dtype)
        else:
            self.model, self.tokenizer = load_model(self.model_dir, device=self.device, dtype=cfg.dtype)
        self._compressed = False

    def _original(self) -> Mapping[str, Tensor]:
        from sahc_core.evaluate.weights import CheckpointWeights
        from sahc_core.io.source import ModelSource

        return CheckpointWeights(ModelSource.open(self.model_dir))

    def _loader(self, weights: Mapping[str, Tensor]):
        from sahc_core.evaluate.offload import LayerLoader

        return LayerLoader(self.model, weights, self.names, self.device)

    def smoke(self, text: str, weights: Mapping[str, Tensor], n_tokens: int,
              progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
        """Each compared layer's output cosine, W (the original model) vs Ŵ (``weights``)."""
        from sahc_core.evaluate.smoke import layer_output_cosines

        assert not self._compressed, "the smoke test runs the original model"
        prepare = self._loader(self._original()) if self.offload else None
        return layer_output_cosines(self.model, self.tokenizer, text, weights, n_tokens=n_tokens, progress=progress,
                                    names=self.names, prepare=prepare)

    def perplexity(self, text: str, weights: Mapping[str, Tensor] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> PplResult:
        """Perplexity of the original model (``weights`` None) or of ``weights`` by checkpoint name.

        In memory, ``weights`` are loaded into the one model (the original is gone after that).
        """
        from sahc_core.evaluate.model import load_state
        from sahc_core.evaluate.offload import perplexity_layerwise

        if self.offload:
            loader = self._loader(weights if weights is not None else self._original())
            return perplexity_layerwise(self.model, self.tokenizer, text, self.cfg, prepare=loader, progress=progress)
        if weights is not None:
            load_state(self.model, weights, self.names)
            self._compressed = True
        elif self._compressed:
            raise RuntimeError("the in-memory model holds the compressed weights now; evaluate the original first.")
        return perplexity(self.model, self.tokenizer, text, self.cfg, progress=progress)


def assembled_weights(out_dir: str | Path, dtype: str) -> Mapping[str, Tensor]:
    """The assembled checkpoint's weights, rebuilt on access in ``dtype`` (a run's compressed model)."""
    from sahc_core.evaluate.weights import AssembledWeights

    return AssembledWeights(out_dir, DTYPES[dtype])


def plan_offload(mode: str, source, names, cfg: PplConfig, device: str):
    """The :class:`~sahc_core.evaluate.offload.OffloadDecision` of a run or ``ppl`` on ``source``."""
    from sahc_core.evaluate.offload import decide_offload, evaluated_bytes
    from sahc_core.evaluate.perplexity import DEFAULT_WINDOW
    from sahc_core.io.rows import memory_bound

    shapes = {t.name: tuple(t.shape) for t in source.tensors()}
    text = source.config.get("text_config") if isinstance(source.config.get("text_config"), dict) else source.config
    vocab = int(text.get("vocab_size") or source.config.get("vocab_size") or 0)
    limit = text.get("max_position_embeddings") or text.get("n_positions") or DEFAULT_WINDOW
    window = cfg.window or min(DEFAULT_WINDOW, int(limit))
    dev = resolve_device(device)
    bound = memory_bound(source) if dev == "cpu" else None  # on a GPU its own free memory decides
    return decide_offload(mode, evaluated_bytes(names, shapes, DTYPES[cfg.dtype]), window * vocab * 4,
                          device=dev, bound=bound)
