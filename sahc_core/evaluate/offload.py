"""Perplexity (and any layer-by-layer pass) of a model larger than RAM: one decoder layer in memory at a time.

The evaluated model is built empty (:func:`sahc_core.evaluate.names.empty_model`: meta parameters,
real buffers) and run by :func:`sahc_core.evaluate.layerwise.run_layerwise`. Its ``prepare(turn)``
seam is a :class:`LayerLoader`: before a turn, the turn's parameters are read from the original
checkpoint (:class:`~sahc_core.evaluate.weights.CheckpointWeights`) or rebuilt from the assembled one
(:class:`~sahc_core.evaluate.weights.AssembledWeights`) by checkpoint name (the family's
:class:`~sahc_core.evaluate.names.NameMap`), cast to the model dtype and put on the device; after
the turn they are replaced by their meta placeholders again and freed. Every layer is read once
per pass, for all windows together (not once per window, as a per-module disk offload would).

Turns: the stem (embeddings up to the first layer: every parameter outside the decoder layers but
the LM head's own) is loaded for the stem pass and again for the head replay; each decoder layer
for its turn; the LM head for the head turn. Peak memory of a pass ≈ the stem and the head (the
embedding and, untied, the LM head) + one decoder layer + the hidden states of every window
(``tokens x hidden`` in the model dtype) + one window's per-layer arguments + one chunk of logits
(``OFFLOAD_LOGITS_BYTES``).

:func:`perplexity_layerwise` scores exactly the windows of :func:`sahc_core.evaluate.perplexity.perplexity`
(same protocol object); the LM head runs in row chunks on the final hidden states, followed by the
model's final logit soft-capping when it applies one: a probe on the stem and head (layers stubbed
to the identity) finds, before the pass, which of "nothing" and "soft-capping" makes
``model(x).logits``, and refuses a model where neither does.

Offload decision (``offload="auto"``, :func:`decide_offload`): in memory when the weights in the run
dtype + two float32 logits tensors of one window (the logits and their log-softmax) + 1.5 GiB of
working memory fit in 90 % of the memory available to this process (``MemAvailable``, capped by a
cgroup limit; on a GPU also its free memory) and, on the CPU, within the model's memory bound
(``bound``: 2.5 x its largest tensor's bf16 bytes + 1.5 GB, :func:`sahc_core.io.rows.memory_bound`);
else layer by layer. The bound is the design's promise for every command: a 9B-shaped model whose
float32 copy would fit in a big machine's RAM is still evaluated layer by layer, which on a CPU costs
about the same time (``bench/offload.py``: 139 vs 144 CPU seconds for 16k tokens of the default model).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sahc_core.errors import ModelError
from sahc_core.evaluate.layerwise import STEM, LayerTurn, _stubbed, decoder_layers, run_layerwise
from sahc_core.evaluate.perplexity import PplConfig, PplResult, protocol, scored

OFFLOAD_MODES = ("auto", "never", "always")
#: Working memory of an in-memory evaluation beside its weights and logits (Python, torch, one window).
HEADROOM_BYTES = 3 * 2**29
#: Share of the available memory an in-memory evaluation may plan to use.
MEMORY_SHARE = 0.9
#: Interpreter, libraries and one window's activations of an in-memory evaluation (for the memory bound).
BOUND_BASE_BYTES = 2**29
#: Bytes of one chunk of float32 logits in the layer-sequential head.
OFFLOAD_LOGITS_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------- decision
def available_memory(device: str = "cpu") -> int:
    """Bytes this process may still allocate: ``MemAvailable`` capped by a cgroup limit (and, on a
    GPU, by its free memory)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text().strip()))
        except OSError:
            continue
    if device.startswith("cuda") and torch.cuda.is_available():
        avail = min(avail, int(torch.cuda.mem_get_info(torch.device(device))[0]))
    return max(0, avail)


@dataclass(frozen=True)
class OffloadDecision:
    """Whether a run evaluates layer by layer, and the numbers that decided it (bytes)."""

    mode: str
    offload: bool
    weights_bytes: int
    need_bytes: int
    available_bytes: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluated_bytes(names, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of the evaluated model's weights in ``dtype`` (every tensor the name map evaluates)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shapes[c]) for c in names.to_model) * itemsize


def decide_offload(mode: str, weights_bytes: int, logits_bytes: int, device: str = "cpu",
                   available: int | None = None, bound: int | None = None) -> OffloadDecision:
    """Apply the rule of the module docstring to ``mode`` (``auto|never|always``).

    ``logits_bytes``: one window's float32 logits (window x vocabulary x 4); ``bound``: the model's
    memory bound in bytes (``None``: no bound, only the available memory counts).
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}.")
    need = weights_bytes + 2 * logits_bytes + HEADROOM_BYTES
    avail = available_memory(device) if available is None else int(available)
    fits = need <= MEMORY_SHARE * avail
    # against the bound: the peak RSS the in-memory path reaches (bench/offload.py: the interpreter's 240 MB
    # + one window's activations on top of weights and logits), not the headroom kept for other processes
    peak = weights_bytes + 2 * logits_bytes + BOUND_BASE_BYTES
    within = bound is None or peak <= bound
    gib = 2**30
    if mode == "auto":
        offload = not (fits and within)
        reason = (f"auto: the in-memory evaluation needs about {need / gib:.1f} GiB "
                  f"({'within' if fits else 'more than'} {MEMORY_SHARE:.0%} of the {avail / gib:.1f} GiB available"
                  + ("" if bound is None else f"; its peak, about {peak / gib:.1f} GiB, is "
                                              f"{'within' if within else 'above'} the model's {bound / gib:.1f} GiB "
                                              "memory bound") + ")")
    else:
        offload = mode == "always"
        reason = f"{mode} (asked for)"
    return OffloadDecision(mode=mode, offload=offload, weights_bytes=int(weights_bytes), need_bytes=int(need),
                           available_bytes=int(avail), reason=reason)


# ------------------------------------------------------------------------------------- loader
class LayerLoader:
    """``prepare(turn)`` for :func:`run_layerwise` on an empty model: loads the turn's weights, frees them after.

    Parameters
    ----------
    model : nn.Module
        The evaluated model with meta parameters (:func:`sahc_core.evaluate.names.empty_model`).
    weights : mapping
        Tensors by checkpoint name (``CheckpointWeights`` / ``AssembledWeights``), read on access.
    names : NameMap
        Checkpoint -> model names (:func:`sahc_core.evaluate.names.build_name_map` against ``model``).
    device : str or torch.device
        Where the loaded weights go (the inputs follow them).

    Attributes
    ----------
    loads : int
        Tensors read so far (a tied pair counts once per load).
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, Tensor], names, device: str | torch.device = "cpu"):
        self.model, self.weights, self.names, self.device = model, weights, names, torch.device(device)
        self.loads = 0
        layers = decoder_layers(model)
        head = model.get_output_embeddings()
        prefixes = [name + "." for name, _ in layers]
        self._slots: dict[int, list[tuple[nn.Module, str]]] = {}  # parameter (by id) -> where it sits
        self._meta: dict[int, nn.Parameter] = {}
        self._ckpt: dict[int, str] = {}
        turn_of: dict[int, int] = {}
        for mod_name, module in model.named_modules():
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                full, g = f"{mod_name}.{leaf}" if mod_name else leaf, id(p)
                self._slots.setdefault(g, []).append((module, leaf))
                self._meta[g] = p
                ckpt = names.checkpoint_name(full)
                if ckpt is not None:
                    self._ckpt.setdefault(g, ckpt)
                layer = next((i for i, pre in enumerate(prefixes) if full.startswith(pre)), None)
                turn = layer if layer is not None else (len(layers) if module is head else STEM)
                turn_of[g] = min(turn_of.get(g, turn), turn)  # a tied head is the embedding's: the stem's
        self._groups: dict[int, list[int]] = {}  # turn index -> parameters it loads (never-run ones: none)
        for g, turn in turn_of.items():
            if g in self._ckpt:
                self._groups.setdefault(turn, []).append(g)
        self._loaded: set[int] = set()

    @contextmanager
    def __call__(self, turn: LayerTurn) -> Iterator[None]:
        mine = [g for g in self._groups.get(turn.index, []) if g not in self._loaded]
        try:
            for g in mine:
                self._materialize(g)
            yield
        finally:
            for g in mine:
                self._release(g)

    def _materialize(self, g: int) -> None:
        meta = self._meta[g]
        read_as = getattr(self.weights, "read_as", None)  # CheckpointWeights: big tensors converted in blocks
        tensor = (read_as(self._ckpt[g], meta.dtype) if read_as is not None
                  else self.weights[self._ckpt[g]]).to(self.device, meta.dtype)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ModelError(f"{self._ckpt[g]} has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(meta.shape)}.")
        param = nn.Parameter(tensor, requires_grad=False)
        for module, leaf in self._slots[g]:
            module._parameters[leaf] = param
        self._loaded.add(g)
        self.loads += 1

    def _release(self, g: int) -> None:
        if g in self._loaded:
            for module, leaf in self._slots[g]:
                module._parameters[leaf] = self._meta[g]
            self._loaded.discard(g)

    @contextmanager
    def loaded(self, *indices: int) -> Iterator[None]:
        """The weights of these turns (``STEM``, a layer index, the head's ``n_layers``), outside a run."""
        with self(LayerTurn(indices[0], "", self.model)):
            if len(indices) > 1:
                with self.loaded(*indices[1:]):
                    yield
            else:
                yield


# ------------------------------------------------------------------------------------- perplexity
def _logit_transforms(model: nn.Module) -> list[Callable[[Tensor], Tensor]]:
    """Candidates for what the model does to ``lm_head(h)``: nothing, or its config's final logit
    soft-capping (Gemma's ``*ForCausalLM`` applies it; Gemma 3's VLM class does not)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(text, "final_logit_softcapping", None)
    out: list[Callable[[Tensor], Tensor]] = [lambda t: t]
    if cap:
        out.append(lambda t: torch.tanh(t / cap) * cap)
    return out


def _head_transform(model: nn.Module, head: nn.Linear, probe: Tensor) -> Callable[[Tensor], Tensor]:
    """The candidate with ``model(x).logits == transform(head(h))`` on a short probe (layers stubbed to
    the identity, so only the stem and the head run); ModelError when none matches."""
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with torch.inference_mode():
            with _stubbed([m for _, m in decoder_layers(model)], lambda i, a, k: a[0]):
                ref = model(input_ids=probe, use_cache=False).logits.float()
            plain = F.linear(seen[0], head.weight, head.bias)
            for transform in _logit_transforms(model):
                got = transform(plain)
                if got.shape == ref.shape and torch.allclose(got.float(), ref, rtol=1e-4, atol=1e-5):
                    return transform
    finally:
        handle.remove()
    raise ModelError(f"the logits of {type(model).__name__} are not its LM head applied to the final hidden "
                     "states (a post-head step the layer-by-layer evaluator does not know); evaluate it in "
                     "memory (offload 'never').")


def perplexity_layerwise(model: nn.Module, tokenizer, text: str, cfg: PplConfig = PplConfig(),
                         prepare: LayerLoader | None = None,
                         progress: Callable[[int, int], None] | None = None) -> PplResult:
    """Perplexity of ``model`` over ``text`` with one decoder layer at a time (the windows of ``perplexity``).

    Parameters
    ----------
    model : nn.Module
        The evaluated model: empty with ``prepare`` (a :class:`LayerLoader`), or loaded without.
    tokenizer, text, cfg
        As :func:`sahc_core.evaluate.perplexity.perplexity`; ``cfg.dtype`` is the model's (set when it
        was built).
    progress : callable, optional
        ``progress(tokens_done, tokens_total)``: every token advances together, one turn at a time, so
        this is the share of turns done times the tokens.

    Returns
    -------
    PplResult
        As :func:`perplexity` (``device`` is where the layers ran).
    """
    device = prepare.device if prepare is not None else next(model.parameters()).device
    proto = protocol(model, tokenizer, text, cfg, device)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{type(model).__name__} has no linear LM head; the layer-by-layer evaluator needs one.")
    n_layers = len(decoder_layers(model))
    start = time.perf_counter()
    with prepare.loaded(STEM, n_layers) if prepare is not None else nullcontext():
        transform = _head_transform(model, head, proto.ids[: min(8, proto.ids.numel())].unsqueeze(0).to(device))
    windows = [proto.inputs(batch) for batch in proto.batches]
    rows = max(1, OFFLOAD_LOGITS_BYTES // (4 * head.weight.shape[0]))
    state = {"nll": 0.0, "done": 0}

    def score(turn: LayerTurn):
        def hook(module: nn.Module, args: tuple) -> None:
            h, x = args[0], windows[turn.window].to(args[0].device)  # (B, L, hidden), (B, L)
            for row, span in enumerate(proto.batches[turn.window]):
                lo, hi = scored(span)
                nll = 0.0
                for i in range(lo, hi, rows):
                    j = min(hi, i + rows)
                    logits = transform(F.linear(h[row, i:j], module.weight, module.bias))
                    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                    nll -= logp.gather(-1, x[row, i + 1:j + 1].unsqueeze(-1)).double().sum().item()
                state["nll"] += proto.window_nll(span, nll)
                state["done"] += hi - lo
        return hook

    @contextmanager
    def on_layer(turn: LayerTurn) -> Iterator[None]:
        handle = head.register_forward_pre_hook(score(turn)) if turn.index == n_layers else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    turns = n_layers + 1
    run_layerwise(model, windows, on_layer, prepare=prepare,
                  progress=None if progress is None else lambda d, t: progress(proto.total * d // turns, proto.total))
    assert state["done"] == proto.total
    return proto.result(model, state["nll"], time.perf_counter() - start, device)
