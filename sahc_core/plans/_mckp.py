"""Multiple-choice knapsack on arrays: Pareto reduction, Lagrangian bound and plan, HiGHS MILP.

The problem (MCKP [1]_ [2]_): options ``j`` of tensors ``i`` with bytes ``b_ij`` (whole numbers)
and damage ``d_ij >= 0``; choose one option per tensor to minimise ``sum d`` with ``sum b <= B``.
:mod:`sahc_core.plans._solver` turns a candidate table into these arrays; this module knows
nothing of tensors, methods or constraints.

1. :func:`reduce`: options dominated by another of the same tensor (no fewer bytes and no less
   damage) are dropped, leaving a Pareto staircase per tensor (bytes strictly up, damage strictly
   down); its lower convex hull gives segments of efficiency ``Δdamage / Δbytes``, sorted once for
   every budget.
2. :func:`lagrangian`: taking segments in decreasing efficiency from the smallest plan while they
   fit is the greedy of Sinha and Zoltners [1]_; completed fractionally by the first segment that
   does not fit (the critical one), it is the LP optimum, equal to the Lagrangian dual
   ``max_{λ>=0} L(λ)``, ``L(λ) = sum_i min_j (d_ij + λ b_ij) - λB`` [3]_, at ``λ*`` = the critical
   segment's efficiency (found exactly, no bisection). Two integral plans follow: the prefix, and
   the prefix plus the critical segment minus the least efficient earlier segments until it fits;
   each is then filled greedily. Every move is checked in exact integer bytes, so the plan provably
   meets the budget whenever the smallest plan does.
3. :func:`solve_reduced`: if that plan is not already within the gap, the search branches on the
   critical tensor (a large one, e.g. the embedding, is what keeps the LP bound loose): one
   Lagrangian bound and plan per option of it. In each branch whose bound is still below the best
   plan, options whose bound with them forced, ``L(λ) + d_ij + λ b_ij - min_k (d_ik + λ b_ik)``,
   exceeds the best plan's damage are removed (reduced-cost fixing [2]_) and HiGHS [4]_ solves the
   rest through ``scipy.optimize.milp``: binary ``x_ij``, one equality row per tensor, one knapsack
   row in units far below a byte of tolerance; its plan is re-checked in exact integer bytes.

References
----------
.. [1] P. Sinha, A. A. Zoltners, "The multiple-choice knapsack problem", Operations Research 27(3),
   503-515, 1979.
.. [2] H. Kellerer, U. Pferschy, D. Pisinger, "Knapsack Problems", Springer, 2004, ch. 11.
.. [3] M. L. Fisher, "The Lagrangian relaxation method for solving integer programming problems",
   Management Science 27(1), 1-18, 1981.
.. [4] Q. Huangfu, J. A. J. Hall, "Parallelizing the dual revised simplex method", Mathematical
   Programming Computation 10, 119-142, 2018 (HiGHS).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp


_FD_LOCK = threading.Lock()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to stderr while the block runs.

    HiGHS (through ``scipy.optimize.milp``) prints some internal lines with C ``printf`` whatever its
    ``disp`` option says (e.g. ``HighsMipSolverData::transformNewIntegerFeasibleSolution``); on the
    CLI's stdout they would break the ``--json`` answer, so the descriptor itself is redirected (a
    Python-level ``redirect_stdout`` does not reach C code). Serialised by a lock: the descriptor is
    process-wide.
    """
    with _FD_LOCK:
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no usable fd 1 (closed, replaced): nothing to guard
            yield
            return
        try:
            os.dup2(2, 1)
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


@dataclass(frozen=True)
class Reduced:
    """Pareto options of one allowed set (tensor-major, bytes up) and hull segments in greedy order."""

    pos: np.ndarray  # (m,) row of each option in the caller's table
    t: np.ndarray  # (m,) tensor code 0..n-1
    b: np.ndarray  # (m,) int64 bytes, strictly increasing within a tensor
    d: np.ndarray  # (m,) damage, strictly decreasing within a tensor
    start: np.ndarray  # (n + 1,) tensor k's options are [start[k], start[k + 1])
    seg_t: np.ndarray  # (s,) tensor of each hull segment, by decreasing efficiency
    seg_from: np.ndarray  # (s,) option index of the segment's lower (fewer bytes) end
    seg_to: np.ndarray  # (s,) option index of its upper end
    seg_db: np.ndarray  # (s,) int64 Δbytes > 0
    seg_dd: np.ndarray  # (s,) Δdamage > 0
    seg_eff: np.ndarray  # (s,) Δdamage / Δbytes, non-increasing
    cum_db: np.ndarray  # (s,) int64 cumulative Δbytes
    cum_dd: np.ndarray  # (s,) cumulative Δdamage
    label: str  # what the caller solved this table for ("" or a group size)

    @property
    def min_bytes(self) -> int:
        """Bytes of the smallest plan."""
        return int(self.b[self.start[:-1]].sum())

    @property
    def spread(self) -> float:
        """Sum over tensors of (most - least) damage: the scale of the objective."""
        return float((self.d[self.start[:-1]] - self.d[self.start[1:] - 1]).sum())


def hull(b: np.ndarray, d: np.ndarray) -> list[int]:
    """Lower convex hull (monotone chain) of a staircase, b up, d down; collinear points kept."""
    h: list[int] = []
    for i in range(len(b)):
        while len(h) >= 2 and (b[h[-1]] - b[h[-2]]) * (d[i] - d[h[-2]]) < (d[h[-1]] - d[h[-2]]) * (b[i] - b[h[-2]]):
            h.pop()  # h[-1] lies above the chord h[-2] -> i
        h.append(i)
    return h


def reduce(t: np.ndarray, b: np.ndarray, d: np.ndarray, n: int, allowed: np.ndarray, label: str = "") -> Reduced:
    """Pareto options and hull segments of the ``allowed`` rows; every tensor 0..n-1 must have one."""
    pos = np.flatnonzero(allowed)
    pos = pos[np.lexsort((d[pos], b[pos], t[pos]))]
    bounds = np.searchsorted(t[pos], np.arange(n + 1))
    keep, seg_t, seg_from, seg_to, seg_db, seg_dd, seg_eff, k_of = ([] for _ in range(8))
    n_kept = 0
    for k in range(n):
        p = pos[bounds[k]:bounds[k + 1]]
        assert len(p), "every tensor has an allowed option"
        p = p[d[p] < np.minimum.accumulate(np.r_[np.inf, d[p][:-1]])]  # less damage than every cheaper one
        h = np.asarray(hull(b[p].astype(float), d[p]))
        db, dd = np.diff(b[p[h]]), -np.diff(d[p[h]])
        seg_t.append(np.full(len(db), k)), k_of.append(np.arange(len(db)))
        seg_from.append(n_kept + h[:-1]), seg_to.append(n_kept + h[1:])
        seg_db.append(db), seg_dd.append(dd)
        seg_eff.append(np.minimum.accumulate(dd / db) if len(db) else dd)  # rounding must not reorder a tensor
        keep.append(p)
        n_kept += len(p)
    cat = np.concatenate
    seg_eff = cat(seg_eff)
    order = np.lexsort((cat(k_of), cat(seg_t), -seg_eff))  # ties keep a tensor's segments in hull order
    pos = cat(keep)
    return Reduced(pos=pos, t=t[pos], b=b[pos].astype(np.int64), d=d[pos].astype(float),
                   start=np.r_[0, np.cumsum([len(p) for p in keep])].astype(np.int64),
                   seg_t=cat(seg_t)[order], seg_from=cat(seg_from)[order], seg_to=cat(seg_to)[order],
                   seg_db=cat(seg_db)[order], seg_dd=cat(seg_dd)[order], seg_eff=seg_eff[order],
                   cum_db=np.cumsum(cat(seg_db)[order]), cum_dd=np.cumsum(cat(seg_dd)[order]), label=label)


def fix(red: Reduced, k: int, j: int) -> tuple[Reduced, np.ndarray]:
    """``red`` with tensor ``k`` fixed to its option ``j`` (a branch), and each new option's old index."""
    keep = (red.t != k) | (np.arange(len(red.t)) == j)
    old = np.flatnonzero(keep)
    new = np.cumsum(keep) - 1  # old option index -> new
    seg = red.seg_t != k  # the other tensors' segments, still in greedy order
    counts = np.bincount(red.t[old], minlength=len(red.start) - 1)
    sub = Reduced(pos=red.pos[old], t=red.t[old], b=red.b[old], d=red.d[old], start=np.r_[0, np.cumsum(counts)],
                  seg_t=red.seg_t[seg], seg_from=new[red.seg_from[seg]], seg_to=new[red.seg_to[seg]],
                  seg_db=red.seg_db[seg], seg_dd=red.seg_dd[seg], seg_eff=red.seg_eff[seg],
                  cum_db=np.cumsum(red.seg_db[seg]), cum_dd=np.cumsum(red.seg_dd[seg]), label=red.label)
    return sub, old


def fill(red: Reduced, cur: np.ndarray, budget: int) -> np.ndarray:
    """Repeat the single upgrade that removes the most damage and still fits, until none does."""
    cur = cur.copy()
    used = int(red.b[cur].sum())
    assert used <= budget
    while True:
        gain = np.where(red.b - red.b[cur][red.t] <= budget - used, red.d[cur][red.t] - red.d, 0.0)
        j = int(np.argmax(gain))
        if gain[j] <= 0:
            return cur
        used += int(red.b[j] - red.b[cur[red.t[j]]])
        cur[red.t[j]] = j


def lagrangian(red: Reduced, budget: int) -> tuple[np.ndarray, float, float, int]:
    """``(option per tensor, LP = Lagrangian bound, λ*, critical tensor or -1)``; ``budget >= min_bytes``."""
    slack = budget - red.min_bytes
    assert slack >= 0
    p = int(np.searchsorted(red.cum_db, slack, side="right"))  # segments that fit
    prefix = red.start[:-1].copy()
    np.maximum.at(prefix, red.seg_t[:p], red.seg_to[:p])
    lb, lam, k, plans = float(red.d[red.start[:-1]].sum() - (red.cum_dd[p - 1] if p else 0.0)), 0.0, -1, [prefix]
    if p < len(red.cum_db):  # the critical segment p, taken fractionally in the LP
        lam = float(red.seg_eff[p])
        lb -= lam * (slack - (int(red.cum_db[p - 1]) if p else 0))
        k, over = int(red.seg_t[p]), int(red.cum_db[p]) - slack
        back = np.arange(p - 1, -1, -1)
        back = back[red.seg_t[back] != k]  # earlier segments of other tensors, least efficient first
        q = int(np.searchsorted(np.cumsum(red.seg_db[back]), over))  # undo back[:q + 1] to fit
        if q < len(back):
            alt = prefix.copy()
            alt[k] = red.seg_to[p]
            np.minimum.at(alt, red.seg_t[back[:q + 1]], red.seg_from[back[:q + 1]])
            plans.append(alt)
    plans = [fill(red, c, budget) for c in plans]
    return min(plans, key=lambda c: float(red.d[c].sum())), lb, lam, k


def highs(red: Reduced, budget: int, mask: np.ndarray, ub: float, time_limit: float, rel_gap: float
          ) -> tuple[np.ndarray | None, float, str]:
    """HiGHS on the options in ``mask``: ``(option per tensor or None, dual bound or NaN, note)``.

    ``ub`` is the damage of a plan within the budget whose options are all in ``mask``.
    """
    idx = np.flatnonzero(mask)
    t, b = red.t[idx], red.b[idx]
    first = np.r_[0, np.flatnonzero(np.diff(t)) + 1]
    assert len(first) == len(red.start) - 1, "every tensor keeps an option"
    bmin, dmin = np.minimum.reduceat(b, first), np.minimum.reduceat(red.d[idx], first)
    # Objective: damage above the floor, in units where the known plan scores 1000 (HiGHS's absolute
    # gap 1e-6 is then negligible). A cost above twice that plan is clipped: any plan using it still
    # scores more than the known one, so the optimum and every dual bound stay those of the original.
    ub_shift = max(ub - float(dmin.sum()), 0.0)
    scale = max(ub_shift, 1e-300) / 1e3
    cost = np.minimum(red.d[idx] - dmin[t], 2.0 * ub_shift) / scale
    # Knapsack row: bytes above the floor in units of 2^k bytes, k chosen so the budget reads ~1e4
    # (HiGHS warns of bounds above ~1e6), which keeps its 1e-6 feasibility tolerance far below 1 byte.
    slack = budget - int(bmin.sum())
    unit = 2.0 ** max(0, math.floor(math.log2(max(slack, 1) / 1e4)))
    rows = sparse.vstack([sparse.csr_array((np.ones(len(idx)), (t, np.arange(len(idx))))),
                          sparse.csr_array(((b - bmin[t]) / unit)[None, :])])
    n, rhs, bound, note = len(first), slack / unit, math.nan, ""
    for _ in range(3):  # a plan over by tolerance is re-solved with the excess taken off the budget
        with stdout_to_stderr():  # HiGHS's stray printf lines must not reach a --json stdout
            res = milp(cost, integrality=np.ones(len(idx)), bounds=Bounds(0, 1),
                       constraints=LinearConstraint(rows, np.r_[np.ones(n), -np.inf], np.r_[np.ones(n), rhs]),
                       options={"time_limit": max(time_limit, 0.05), "mip_rel_gap": rel_gap})
        if math.isnan(bound) and res.mip_dual_bound is not None and np.isfinite(res.mip_dual_bound):
            bound = float(res.mip_dual_bound) * scale + float(dmin.sum())  # of the first (exact) problem
        if res.status == 1:
            note = "HiGHS stopped at the time limit."
        if res.x is None:
            return None, bound, note or f"HiGHS found no plan ({res.message})."
        pick = idx[res.x > 0.5]
        if len(pick) != n or len(np.unique(red.t[pick])) != n:
            return None, bound, "HiGHS returned a plan that is not one option per tensor."
        excess = int(red.b[pick].sum()) - budget
        if excess <= 0:
            return pick[np.argsort(red.t[pick])], bound, note
        rhs -= excess / unit
    return None, bound, "HiGHS plans stayed over the budget by its tolerance."


@dataclass(frozen=True)
class Result:
    """A plan of one reduced table: option index per tensor, its damage, a proven bound, notes."""

    red: Reduced
    cur: np.ndarray  # (n,) option index into red per tensor
    damage: float
    lower: float
    solver: str
    note: str


def closed(red: Reduced, gap: float, damage: float, rel_gap: float) -> bool:
    """True when ``gap`` is within ``rel_gap`` of ``damage`` (or rounding on the table's scale)."""
    return gap <= max(rel_gap * damage, 1e-12 * red.spread)


def fixing(red: Reduced, budget: int, lam: float, ub: float) -> np.ndarray | None:
    """Options that may be in a plan better than ``ub`` by their Lagrangian bound at ``lam``; None if none."""
    v = red.d + lam * red.b  # Lagrangian cost of each option
    vmin = np.minimum.reduceat(v, red.start[:-1])
    mask = float(vmin.sum() - lam * budget) + (v - vmin[red.t]) <= ub + max(1e-9 * ub, 1e-12 * red.spread)
    return mask if np.bincount(red.t[mask], minlength=len(red.start) - 1).all() else None


def solve_reduced(red: Reduced, budget: int, method: str, deadline: float, rel_gap: float) -> Result:
    """Best plan of ``red`` within ``budget`` (>= ``red.min_bytes``): method auto, milp or lagrangian.

    ``auto`` with an open gap branches on the critical tensor (the one the LP takes fractionally,
    whose choice the bound misses): one Lagrangian bound per option of it, and reduced-cost fixing +
    HiGHS only in the branches whose bound is below the best plan so far.
    """
    cur, lb, lam, k = lagrangian(red, budget)
    ub = float(red.d[cur].sum())
    if method == "lagrangian" or k < 0 or closed(red, ub - lb, ub, rel_gap):  # k < 0: every segment fits
        return Result(red, cur, ub, min(lb, ub), "lagrangian", "")
    if method == "milp":
        pick, bound, why = highs(red, budget, np.ones(len(red.t), dtype=bool), ub, deadline - time.perf_counter(),
                                 rel_gap)
        if pick is not None and float(red.d[pick].sum()) <= ub:
            cur, ub, solver = pick, float(red.d[pick].sum()), "highs"
        else:
            solver, why = "lagrangian", f"{why} The Lagrangian plan stands in.".strip()
        lb = max(lb, min(bound, ub)) if np.isfinite(bound) else lb
        return Result(red, cur, ub, min(lb, ub), solver, why)
    branches = []
    for j in range(red.start[k], red.start[k + 1]):
        sub, old = fix(red, k, j)
        if sub.min_bytes <= budget:
            c, lb_j, lam_j, _ = lagrangian(sub, budget)
            branches.append((lb_j, lam_j, sub, old))
            if float(sub.d[c].sum()) < ub:
                cur, ub = old[c], float(sub.d[c].sum())
    lowers, n_milp, notes = [], 0, set()
    for lb_j, lam_j, sub, old in sorted(branches, key=lambda br: br[0]):
        mask = None if closed(red, ub - lb_j, ub, rel_gap) else fixing(sub, budget, lam_j, ub)
        if mask is None:  # no plan of this branch beats the best one by more than the gap
            lowers.append(min(lb_j, ub) if closed(red, ub - lb_j, ub, rel_gap) else ub)
            continue
        n_milp += 1
        pick, bound, why = highs(sub, budget, mask, ub, deadline - time.perf_counter(), rel_gap)
        notes.add(why)
        lowers.append(max(lb_j, min(bound, ub)) if np.isfinite(bound) else lb_j)  # valid for plans below ub
        if pick is not None and float(sub.d[pick].sum()) < ub:
            cur, ub = old[pick], float(sub.d[pick].sum())
    note = (f"Branching on the critical tensor's {len(branches)} option(s) left {n_milp} for reduced-cost fixing "
            f"and HiGHS.")
    return Result(red, cur, ub, min(min(lowers), ub), "lagrangian+highs" if n_milp else "lagrangian",
                  " ".join([note, *sorted(n for n in notes if n)]))
