"""Capture calibration statistics layer by layer (:func:`sahc_core.evaluate.layerwise.run_layerwise`).

For each turn (decoder layer, then LM head) a forward pre-hook on every ``nn.Linear`` of the turn's
module sees the input ``x``. Linears fed the very same tensor object in one window (q/k/v after the
input norm, gate/up after the post-attention norm) share one input: its statistics are computed
once, under the first linear's name, and the others are mapped to it. The tensors of a window are
held until the next window, so a Python ``id`` cannot be reused for another input meanwhile.

Accumulation: per window, ``xᵀx`` of the ``(L, n)`` float32 input is formed in float32 and added to
an float64 accumulator. Measured on 8192 heavy-tailed rows (n = 576 and 1536): relative error
3e-8 to 7e-8 (Frobenius; at most 1.5e-7 per entry relative to ``sqrt(H_ii H_jj)``) against a pure
float64 product, at half the time for n = 1536 (1.0 s vs 2.0 s on two CPU cores).

After each turn its statistics (both splits) are handed to ``write(turn_index, name, tensors,
inputs)`` and freed: memory stays at one layer's statistics + the model + the windows' hidden states.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core.evaluate.layerwise import LayerTurn, TurnContext, run_layerwise

#: Per-channel extras: ``name -> (partial(x (L, n) float32) -> (n,) float64, combine(old, new))``.
_EXTRA_OPS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "abs_mean": (lambda x: x.abs().sum(0, dtype=torch.float64), Tensor.add_),  # divided by tokens at the end
    "abs_max": (lambda x: x.abs().amax(0).double(), torch.maximum),
}

#: ``write(turn_index, turn_name, tensors {"<split>/<input>[/<extra>]": Tensor}, inputs)``;
#: ``inputs``: ``{input: {"in_features", "tokens": {split: n}, "weights": [module weight names]}}``.
Writer = Callable[[int, str, dict[str, Tensor], dict[str, dict[str, Any]]], None]


class _TurnStats:
    """Accumulators of one turn: per shared input and split, ``XᵀX`` (float64), token count, extras."""

    def __init__(self, turn: LayerTurn, split_of: list[str], extras: tuple[str, ...]) -> None:
        self.turn, self.split_of, self.extras = turn, split_of, extras
        self.window = -1
        self.seen: dict[int, tuple[Tensor, str]] = {}  # id(x) -> (x kept alive, input name), this window
        self.input_of: dict[str, str] = {}  # module weight name -> input name
        self.acc: dict[str, Tensor] = {}  # "<split>/<input>[/<extra>]" -> accumulator
        self.tokens: dict[str, dict[str, int]] = {}  # input -> split -> tokens
        self.in_features: dict[str, int] = {}

    def hook(self, weight_name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            if self.turn.window != self.window:
                self.window, self.seen = self.turn.window, {}
            x = args[0]
            if id(x) in self.seen:
                group = self.seen[id(x)][1]
            else:
                group = weight_name.removesuffix(".weight")
                self.seen[id(x)] = (x, group)
                self._add(group, x)
            known = self.input_of.setdefault(weight_name, group)
            assert known == group, f"{weight_name} shares its input differently across windows"
        return pre_hook

    def _add(self, group: str, x: Tensor) -> None:
        split = self.split_of[self.window]
        x2 = x.reshape(-1, x.shape[-1]).float()  # (L, n)
        self._merge(f"{split}/{group}", (x2.T @ x2).double(), Tensor.add_)  # float32 product, float64 sum
        for name in self.extras:
            partial, combine = _EXTRA_OPS[name]
            self._merge(f"{split}/{group}/{name}", partial(x2), combine)
        counts = self.tokens.setdefault(group, {})
        counts[split] = counts.get(split, 0) + x2.shape[0]
        self.in_features[group] = x2.shape[1]

    def _merge(self, key: str, value: Tensor, combine: Callable[[Tensor, Tensor], Tensor]) -> None:
        old = self.acc.get(key)
        self.acc[key] = value if old is None else combine(old, value)

    def result(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """``(tensors on the CPU, inputs)`` as the :data:`Writer` takes them."""
        for group, n in self.in_features.items():  # a split whose windows never reached a linear: zeros
            for split in set(self.split_of) - set(self.tokens[group]):
                self.tokens[group][split] = 0
                self.acc[f"{split}/{group}"] = torch.zeros(n, n, dtype=torch.float64)
                for name in self.extras:
                    self.acc[f"{split}/{group}/{name}"] = torch.zeros(n, dtype=torch.float64)
        tensors = {}
        for key, value in self.acc.items():
            if key.endswith("/abs_mean"):
                split, group = key.split("/")[0], key.split("/")[1]
                value = value / max(1, self.tokens[group][split])
            tensors[key] = value.cpu()
        inputs = {g: {"in_features": self.in_features[g], "tokens": dict(self.tokens[g]),
                      "weights": sorted(w for w, gg in self.input_of.items() if gg == g)} for g in self.tokens}
        return tensors, inputs


def _linears(turn: LayerTurn) -> list[tuple[str, nn.Linear]]:
    """``(qualified weight name, linear)`` of the turn's module (the module itself for the LM head)."""
    prefix = f"{turn.name}." if turn.name else ""
    return [(f"{prefix}{n}.weight" if n else f"{prefix}weight", m)
            for n, m in turn.module.named_modules() if isinstance(m, nn.Linear)]


def capture_stats(model: nn.Module, windows: list[Tensor], split_of: list[str], write: Writer,
                  extras: tuple[str, ...] = (), progress: Callable[[int, int], None] | None = None,
                  prepare: TurnContext | None = None) -> None:
    """Accumulate every linear input's ``XᵀX`` over ``windows``, one layer at a time, and ``write`` each turn.

    Parameters
    ----------
    model : nn.Module
        A causal LM in eval mode (see :func:`run_layerwise` for the supported families).
    windows : list of Tensor
        ``(1, L)`` token ids per window; ``split_of[w]`` names the split window ``w`` counts for.
    write : callable
        Receives each turn's statistics (see :data:`Writer`), decoder layers first, the LM head last.
    extras : tuple of str
        Per-channel extras to capture (``abs_mean``, ``abs_max``).
    prepare : callable, optional
        The runner's ``prepare(turn)``: a :class:`sahc_core.evaluate.offload.LayerLoader` captures a
        model larger than RAM, one decoder layer in memory at a time.
    """
    assert len(split_of) == len(windows)

    @contextmanager
    def on_layer(turn: LayerTurn) -> Iterator[None]:
        stats = _TurnStats(turn, split_of, extras)
        handles = [lin.register_forward_pre_hook(stats.hook(name)) for name, lin in _linears(turn)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        tensors, inputs = stats.result()
        del stats
        write(turn.index, turn.name, tensors, inputs)

    # the head's statistics need its input only: its own weights are never loaded (pre-hooks stop the forward)
    run_layerwise(model, windows, on_layer, prepare=prepare, head_weights=False, progress=progress)
