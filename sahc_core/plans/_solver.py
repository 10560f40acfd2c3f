"""Exact plan optimisation: one candidate per tensor, least predicted damage under a byte budget.

Given a tidy candidate table (one row per tensor x option with the columns :data:`COLUMNS`),
:func:`solve` picks exactly one feasible, allowed option ``j(i)`` per tensor ``i`` to

    minimise  sum_i damage[i, j(i)]   subject to   sum_i bytes[i, j(i)] <= B,

a multiple-choice knapsack problem (MCKP) [1]_ [2]_. ``damage`` is a predicted Δloss contribution
(additive across tensors), ``bytes`` the exact stored bytes (a tied LM head: 0), ``B`` the budget;
``ratio = original_bytes / bytes`` with original = 2 bytes per parameter (:mod:`sahc_core.plans.plan`).

How: per tensor, dominated options are dropped; a Lagrangian relaxation over the lower convex hulls
gives the LP lower bound and a plan that provably meets the budget; if the gap is open, the search
branches on the critical tensor, reduced-cost fixing shrinks each open branch and HiGHS solves it
exactly as a MILP (``scipy.optimize.milp``) under a time limit and relative gap;
:mod:`sahc_core.plans._mckp` has the algorithm and its references. ``method="milp"`` runs HiGHS on
the Pareto-reduced table alone (the cross-check; the Lagrangian plan stands in only when HiGHS
finds none); ``method="lagrangian"`` stops after the relaxation.

Status: ``"optimal"`` when ``damage - lower_bound <= rel_gap * damage``; ``"feasible (gap 0.12%)"``
when a plan exists but the relative gap is still open (time limit); ``"infeasible"`` when no plan
fits, with a message naming the best reachable ratio ``original_bytes / min_bytes`` or the
constraints that contradict each other.

References
----------
.. [1] P. Sinha, A. A. Zoltners, "The multiple-choice knapsack problem", Operations Research 27(3),
   503-515, 1979.
.. [2] H. Kellerer, U. Pferschy, D. Pisinger, "Knapsack Problems", Springer, 2004, ch. 11.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from sahc_core.plans.plan import TIED
from sahc_core.plans import _mckp

#: Columns a candidate table must have.
COLUMNS = ("tensor", "component", "method", "config", "bits", "group_size", "bytes", "damage", "feasible")
KEEP = "keep"
METHODS = ("auto", "milp", "lagrangian")
_EXEMPT = (KEEP, TIED)  # never removed by only_methods / keep_components
_NO_WIDTH_BITS = 16.0  # code width of an option without one (keep, 16-bit factors or cores)
_LIST_MAX = 3  # tensors named in one sentence


@dataclass(frozen=True)
class Constraints:
    """What a plan may use on top of the quality gates (``feasible``); all are hard constraints.

    Attributes
    ----------
    keep_components : frozenset of str
        Components whose tensors must use method ``"keep"`` (16-bit).
    only_methods : frozenset of str or None
        The methods allowed (e.g. ``{"int"}``); ``"keep"`` and a tied head (``"tied"``) always are.
        None allows every method.
    max_bits, min_bits : Mapping[str, float]
        Per component, the allowed code width (``bits``); an option without one (``bits`` NaN, e.g.
        keep) counts as 16 bits. Tied rows are exempt.
    one_group_size : bool
        Hardware-friendly: all options that have a group size (``group_size`` not NaN) share one;
        options without groups are unaffected. Solved once per offered group size, best kept.
    """

    keep_components: frozenset[str] = frozenset()
    only_methods: frozenset[str] | None = None
    max_bits: Mapping[str, float] = field(default_factory=dict)
    min_bits: Mapping[str, float] = field(default_factory=dict)
    one_group_size: bool = False

    def __post_init__(self) -> None:
        for name in ("keep_components", "only_methods"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a set of names such as {{{value!r}}}, not the string {value!r}.")
            if value is not None:
                object.__setattr__(self, name, frozenset(str(v) for v in value))
        for name in ("max_bits", "min_bits"):
            widths = dict(getattr(self, name))
            bad = {k: w for k, w in widths.items()
                   if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0}
            if bad:
                raise ValueError(f"{name} must map components to positive bit widths, got {bad}.")
            object.__setattr__(self, name, MappingProxyType({str(k): float(w) for k, w in widths.items()}))
        clash = sorted(c for c in self.min_bits if self.min_bits[c] > self.max_bits.get(c, math.inf))
        clash += sorted(c for c in self.keep_components
                        if self.max_bits.get(c, math.inf) < _NO_WIDTH_BITS or self.min_bits.get(c, 0) > _NO_WIDTH_BITS)
        if clash:
            raise ValueError(f"the bit limits of component(s) {', '.join(clash)} leave no width (keep counts as "
                             "16 bits); lower min_bits, raise max_bits or drop them from keep_components.")


@dataclass(frozen=True)
class Solution:
    """A plan from :func:`solve` / :func:`frontier`.

    Attributes
    ----------
    choice : DataFrame
        The chosen candidate row per tensor (all candidate columns, ``config`` as a dict), in the
        tensor order of the candidates; the index is the row's label there. Empty when infeasible.
    bytes : int
        Stored bytes of the choice (<= ``budget_bytes``); 0 when infeasible.
    ratio : float
        ``original_bytes / bytes``; NaN when infeasible.
    damage : float
        Sum of the chosen damages; NaN when infeasible.
    lower_bound : float
        Proven lower bound on the damage of every plan within the budget; NaN when infeasible.
    gap : float
        ``damage - lower_bound`` (>= 0).
    status : str
        ``"optimal"``, ``"feasible (gap x%)"`` (relative gap) or ``"infeasible"``.
    budget_bytes : int
    seconds : float
        Wall time (in :func:`frontier`: this budget's share, the shared reduction in the first).
    solver : str
        ``"lagrangian"``, ``"highs"`` or ``"lagrangian+highs"`` (empty when infeasible).
    message : str
        What was solved, or the one sentence saying why nothing fits.
    """

    choice: pd.DataFrame
    bytes: int
    ratio: float
    damage: float
    lower_bound: float
    gap: float
    status: str
    budget_bytes: int
    seconds: float
    solver: str
    message: str


@dataclass(frozen=True)
class _Table:
    """The validated candidates as arrays; row ``r`` is ``frame.iloc[r]``, tensors coded 0..n-1."""

    frame: pd.DataFrame  # the candidates, config parsed to dicts
    t: np.ndarray  # (N,) tensor code, in first-appearance order
    names: np.ndarray  # (n,) tensor names
    comp: np.ndarray  # (n,) component of each tensor
    method: np.ndarray  # (N,) str
    width: np.ndarray  # (N,) code width in bits (16 where bits is NaN)
    group: np.ndarray  # (N,) group size, NaN = no groups
    b: np.ndarray  # (N,) int64 bytes
    d: np.ndarray  # (N,) float64 damage
    ok: np.ndarray  # (N,) bool quality gates passed


def _floats(col: pd.Series, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(col).to_numpy(dtype="float64", na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"candidate column {name!r} must be numeric ({exc}).") from exc


def _config(value: object) -> dict:
    try:
        cfg = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise ValueError(f"candidate config {value!r} is not valid JSON ({exc}).") from exc
    if not isinstance(cfg, Mapping):
        raise ValueError(f"candidate config must be a plan-JSON object like {{\"method\": \"int\"}}, got {value!r}.")
    return dict(cfg)


def _table(candidates: pd.DataFrame) -> _Table:
    """Check the candidate table (one ValueError sentence per problem) and turn it into arrays."""
    if not isinstance(candidates, pd.DataFrame) or candidates.empty:
        raise ValueError("the candidate table is empty; give every tensor at least its 16-bit keep option.")
    missing = [c for c in COLUMNS if c not in candidates.columns]
    if missing:
        raise ValueError(f"the candidate table lacks column(s) {', '.join(missing)}; it needs {', '.join(COLUMNS)}.")
    if not all(isinstance(x, str) and x for x in candidates["tensor"]):
        raise ValueError("every candidate row needs a non-empty tensor name; fill or drop the rows without one.")
    t, names = pd.factorize(candidates["tensor"], sort=False)
    comps = candidates["component"].astype(str).to_numpy()
    mixed = pd.Series(comps).groupby(t).nunique().to_numpy() > 1
    if mixed.any():
        raise ValueError(f"tensor {names[np.argmax(mixed)]!r} has candidate rows in several components; give each "
                         "tensor one component.")
    b, d = _floats(candidates["bytes"], "bytes"), _floats(candidates["damage"], "damage")
    if not np.all(np.isfinite(b) & (b >= 0) & (b == np.round(b))):
        raise ValueError("candidate bytes must be non-negative whole numbers; fix the rows with missing, negative or "
                         "fractional bytes.")
    if not np.all(np.isfinite(d) & (d >= 0)):
        raise ValueError("candidate damage must be a finite number >= 0; fix the rows with NaN, infinite or negative "
                         "damage.")
    feasible = candidates["feasible"]
    if feasible.isna().any() or not feasible.isin([True, False]).all():
        raise ValueError("candidate column 'feasible' must hold True or False in every row.")
    ok = feasible.to_numpy(dtype=bool)
    lonely = np.bincount(t[ok], minlength=len(names)) == 0
    if lonely.any():
        raise ValueError(f"tensor {names[np.argmax(lonely)]!r} has no feasible option, not even its 16-bit keep; "
                         "every tensor needs a feasible keep row.")
    bits = _floats(candidates["bits"], "bits")
    frame = candidates.copy()
    frame["config"] = [_config(c) for c in candidates["config"]]
    first = np.unique(t, return_index=True)[1]  # (n,) first row of each tensor code
    return _Table(frame=frame, t=t, names=np.asarray(names, dtype=object), comp=comps[first],
                  method=candidates["method"].astype(str).to_numpy(),
                  width=np.where(np.isnan(bits), _NO_WIDTH_BITS, bits),
                  group=_floats(candidates["group_size"], "group_size"), b=b.astype(np.int64), d=d, ok=ok)


def _removed(tab: _Table, cons: Constraints, group: float | None) -> dict[str, np.ndarray]:
    """Per reason (gates, each constraint, the shared group size), the rows it excludes."""
    comp_row = pd.Series(tab.comp[tab.t])
    exempt = np.isin(tab.method, _EXEMPT)
    tied = tab.method == TIED
    out = {"the quality gates": ~tab.ok}
    if cons.keep_components:
        out["keep_components"] = comp_row.isin(cons.keep_components).to_numpy() & ~exempt
    if cons.only_methods is not None:
        out["only_methods"] = ~np.isin(tab.method, sorted(cons.only_methods)) & ~exempt
    if cons.max_bits:
        out["max_bits"] = ~tied & (tab.width > comp_row.map(cons.max_bits).to_numpy(dtype=float, na_value=np.inf))
    if cons.min_bits:
        out["min_bits"] = ~tied & (tab.width < comp_row.map(cons.min_bits).to_numpy(dtype=float, na_value=-np.inf))
    if group is not None:
        out[f"one_group_size (group size {group:g})"] = ~np.isnan(tab.group) & (tab.group != group)
    return out


def _contradiction(tab: _Table, removed: dict[str, np.ndarray], empty: np.ndarray) -> str:
    """One sentence naming the tensors left without options and the rules that removed them."""
    idx = np.flatnonzero(empty)
    rows = np.isin(tab.t, idx)
    why = [name for name, mask in removed.items() if (mask & rows).any()]
    names = ", ".join(tab.names[idx[:_LIST_MAX]]) + (", ..." if len(idx) > _LIST_MAX else "")
    return (f"The constraints contradict each other: {len(idx)} tensor(s) of component(s) "
            f"{', '.join(sorted(set(tab.comp[idx])))} ({names}) have no option left after {' and '.join(why)}; "
            "relax one of them.")


@dataclass(frozen=True)
class _Problem:
    """The validated table, constraints and the reduced table per shared group size."""

    tab: _Table
    cons: Constraints
    reds: tuple[_mckp.Reduced, ...]
    contradiction: str  # the sentence when no reduced table exists
    note: str


def _problem(candidates: pd.DataFrame | None, cons: Constraints, tab: _Table | None = None) -> _Problem:
    """Validate (unless ``tab`` is given), apply the constraints and reduce, per shared group size."""
    tab = _table(candidates) if tab is None else tab
    if not isinstance(cons, Constraints):
        raise ValueError(f"constraints must be a Constraints instance, got {type(cons).__name__}.")
    base = _removed(tab, cons, None)
    groups: list[float | None] = [None]
    if cons.one_group_size:
        allowed = ~np.logical_or.reduce(list(base.values()))
        groups = sorted({float(g) for g in tab.group[allowed] if not np.isnan(g)}) or [None]
    reds, sentences = [], []
    for g in groups:
        removed = _removed(tab, cons, g)
        allowed = ~np.logical_or.reduce(list(removed.values()))
        empty = np.bincount(tab.t[allowed], minlength=len(tab.names)) == 0
        if empty.any():
            sentences.append(_contradiction(tab, removed, empty))
        else:
            reds.append(_mckp.reduce(tab.t, tab.b, tab.d, len(tab.names), allowed, "" if g is None else f"{g:g}"))
    note = ""
    if cons.one_group_size:
        tried = ", ".join(r.label for r in reds) or "none"
        note = f"one_group_size: solved for group size(s) {tried}" + (
            "" if groups != [None] else " (no option has a group size)")
    return _Problem(tab, cons, tuple(reds), sentences[0] if sentences else "", note)


def _ratio(original: int, nbytes: int) -> float:
    return original / nbytes if nbytes else math.inf


def _min_bytes(prob: _Problem) -> int | None:
    return min((r.min_bytes for r in prob.reds), default=None)


def _fits(prob: _Problem, budget: int) -> bool:
    mb = _min_bytes(prob)
    return mb is not None and mb <= budget


def _infeasible(prob: _Problem, budget: int, original: int, t0: float) -> Solution:
    mb = _min_bytes(prob)
    if mb is None:
        msg = prob.contradiction
    else:
        defaults = Constraints()
        lift = [name for name in ("keep_components", "only_methods", "max_bits", "min_bits", "one_group_size")
                if getattr(prob.cons, name) != getattr(defaults, name)
                and _fits(_problem(None, replace(prob.cons, **{name: getattr(defaults, name)}), prob.tab), budget)]
        free = _min_bytes(_problem(None, defaults, prob.tab))
        tail = (f"; without {' or '.join(lift)} it would be reachable" if lift else
                f"; the constraints cost this, the gates alone allow {_ratio(original, free):.2f}x"
                if free < mb else "")
        msg = (f"The budget of {budget:,} bytes ({original / budget:.2f}x) is out of reach: the smallest plan "
               f"under the quality gates and constraints takes {mb:,} bytes, so the best reachable ratio is "
               f"{_ratio(original, mb):.2f}x{tail}.")
    return Solution(choice=prob.tab.frame.iloc[:0], bytes=0, ratio=math.nan, damage=math.nan, lower_bound=math.nan,
                    gap=math.nan, status="infeasible", budget_bytes=budget, seconds=time.perf_counter() - t0,
                    solver="", message=msg)


def _solve_budget(prob: _Problem, budget: int, original: int, method: str, time_limit: float, rel_gap: float,
                  t0: float) -> Solution:
    fits = [r for r in prob.reds if r.min_bytes <= budget]
    if not fits:
        return _infeasible(prob, budget, original, t0)
    deadline = time.perf_counter() + time_limit
    results = [_mckp.solve_reduced(r, budget, method, deadline, rel_gap) for r in fits]
    best = min(results, key=lambda r: r.damage)
    lower = min(r.lower for r in results)  # the optimum is the best over the group sizes
    pick = best.red.pos[best.cur]
    choice = prob.tab.frame.iloc[pick]
    nbytes, gap = int(prob.tab.b[pick].sum()), max(best.damage - lower, 0.0)
    assert nbytes <= budget and len(choice) == len(prob.tab.names)
    closed = _mckp.closed(best.red, gap, best.damage, rel_gap)
    status = "optimal" if closed else f"feasible (gap {gap / best.damage:.2%})"
    msg = " ".join(s for s in (
        f"{best.solver} over {len(best.red.t)} Pareto options of {len(prob.tab.t)} candidates for "
        f"{len(prob.tab.names)} tensors: {_ratio(original, nbytes):.2f}x, damage {best.damage:.6g} "
        f"(lower bound {lower:.6g}).", best.note,
        prob.note + (f"; group size {best.red.label} gives the least damage." if best.red.label else "."
                     ) if prob.note else "") if s)
    return Solution(choice=choice, bytes=nbytes, ratio=_ratio(original, nbytes), damage=best.damage, lower_bound=lower,
                    gap=gap, status=status, budget_bytes=budget, seconds=time.perf_counter() - t0,
                    solver=best.solver, message=msg)


def _check_args(original_bytes: int, method: str, time_limit: float, rel_gap: float) -> None:
    if isinstance(original_bytes, bool) or not isinstance(original_bytes, (int, np.integer)) or original_bytes <= 0:
        raise ValueError(f"original_bytes must be a positive whole number of bytes, got {original_bytes!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    if not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")
    if not (isinstance(rel_gap, (int, float)) and 0 <= rel_gap < 1):
        raise ValueError(f"rel_gap must be in [0, 1), got {rel_gap!r}.")


def _budget(b: int) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
        raise ValueError(f"a byte budget must be a positive whole number, got {b!r}.")
    return int(b)


def solve(candidates: pd.DataFrame, budget_bytes: int, original_bytes: int, constraints: Constraints = Constraints(),
          time_limit: float = 30.0, rel_gap: float = 1e-6, method: str = "auto") -> Solution:
    """The plan of least total damage within ``budget_bytes`` (one allowed, feasible option per tensor).

    Parameters
    ----------
    candidates : DataFrame
        One row per (tensor, option) with :data:`COLUMNS`; bytes exact (int), damage >= 0 additive.
    budget_bytes : int
        Most stored bytes the plan may take (``original_bytes / target_ratio``, rounded down).
    original_bytes : int
        16-bit bytes of the model (2 per parameter; a tied head 0), for the ratio.
    constraints : Constraints
    time_limit : float
        Seconds for the whole solve (HiGHS stops there and the best plan so far is returned).
    rel_gap : float
        Relative gap ``(damage - lower_bound) / damage`` at which a plan counts as optimal.
    method : {"auto", "milp", "lagrangian"}
        See the module docstring.

    Returns
    -------
    Solution

    Raises
    ------
    ValueError
        Bad candidates (empty, missing columns, a tensor without a feasible option, negative or
        fractional bytes, NaN or negative damage, bad config) or bad arguments.
    """
    t0 = time.perf_counter()
    _check_args(original_bytes, method, time_limit, rel_gap)
    budget = _budget(budget_bytes)
    return _solve_budget(_problem(candidates, constraints), budget, int(original_bytes), method, time_limit,
                         rel_gap, t0)


def frontier(candidates: pd.DataFrame, budgets: Sequence[int], original_bytes: int,
             constraints: Constraints = Constraints(), time_limit: float = 30.0, rel_gap: float = 1e-6,
             method: str = "auto") -> list[Solution]:
    """:func:`solve` for each budget in one pass (one validation, reduction and hull for all).

    ``time_limit`` applies per budget; the solutions come in the order of ``budgets``.
    """
    t0 = time.perf_counter()
    _check_args(original_bytes, method, time_limit, rel_gap)
    budgets = [_budget(b) for b in budgets]
    prob = _problem(candidates, constraints)
    out = []
    for b in budgets:
        out.append(_solve_budget(prob, b, int(original_bytes), method, time_limit, rel_gap, t0))
        t0 = time.perf_counter()
    return out


def min_bytes(candidates: pd.DataFrame, constraints: Constraints = Constraints()) -> int:
    """The smallest plan size reachable under the quality gates and ``constraints`` (bytes).

    Raises
    ------
    ValueError
        Bad candidates, or constraints that leave some tensor no option (the sentence names them).
    """
    prob = _problem(candidates, constraints)
    mb = _min_bytes(prob)
    if mb is None:
        raise ValueError(prob.contradiction)
    return mb
