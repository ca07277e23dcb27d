"""Choosing one candidate per unit: least predicted KL under a byte budget (a multiple-choice knapsack).

A dynamic program over the budget cut into at most BUCKETS equal buckets, each option's size rounded up to whole
buckets (so any choice it returns fits the exact budget): for each unit in turn, the least cost of every filled size.
Rounding up can leave up to one bucket per unit unspent, so the exact bytes then go to single-unit improvements that
still fit, best first.  A Lagrangian solve would reach only the choices on each unit's convex hull; this program finds
the exhaustive optimum on random small instances (tests/test_fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
BUCKETS = 1 << 15


@dataclass(frozen=True)
class Option(Generic[T]):
    choice: T
    nbytes: int
    cost: float


def pareto(options: list[Option[T]]) -> list[Option[T]]:
    """The options no other beats on both size and cost, smallest first (ties: the cheaper, then the first given)."""
    out: list[Option[T]] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.cost)):
        if not out or o.cost < out[-1].cost:
            out.append(o)
    return out


def smallest(options: dict[str, list[Option[T]]]) -> int:
    return sum(min(o.nbytes for o in opts) for opts in options.values())


def solve(options: dict[str, list[Option[T]]], budget: int) -> dict[str, Option[T]]:
    """One option per unit, total bytes <= budget, least total cost found.  Raises ValueError when even the smallest
    options exceed the budget."""
    import numpy as np

    if smallest(options) > budget:
        raise ValueError(f"the smallest choice takes {smallest(options)} bytes, over the budget of {budget}")
    units = list(options)
    fronts = {u: pareto(options[u]) for u in units}
    unit_bytes = max(1, -(-budget // BUCKETS))  # ceil: budget // unit_bytes <= BUCKETS
    n = budget // unit_bytes
    inf = np.inf
    dp = np.zeros(n + 1)  # least cost at total size <= b buckets (non-decreasing in b: "at most" sizes)
    picks = []
    for u in units:
        front = fronts[u]
        new = np.full(n + 1, inf)
        arg = np.zeros(n + 1, dtype=np.int32)
        for k, o in enumerate(front):
            w = -(-o.nbytes // unit_bytes)
            if w > n:
                continue
            cand = np.full(n + 1, inf)
            cand[w:] = dp[: n + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append(arg)
    if not np.isfinite(dp[n]):  # rounding up overfilled it: the smallest options, exactly, still fit
        chosen = {u: fronts[u][0] for u in units}
    else:
        chosen, b = {}, n
        for u, arg in zip(reversed(units), reversed(picks)):
            o = fronts[u][int(arg[b])]
            chosen[u] = o
            b -= -(-o.nbytes // unit_bytes)
    return _improve(options, chosen, budget)


def _improve(options: dict[str, list[Option[T]]], chosen: dict[str, Option[T]], budget: int) -> dict[str, Option[T]]:
    """Off-hull moves the hull walk cannot see: any single unit's option that lowers the cost and still fits."""
    total = sum(o.nbytes for o in chosen.values())
    improved = True
    while improved:
        improved = False
        for u, opts in options.items():
            cur = chosen[u]
            room = budget - total + cur.nbytes
            better = [o for o in opts if o.nbytes <= room and o.cost < cur.cost]
            if better:
                o = min(better, key=lambda o: (o.cost, o.nbytes))
                total += o.nbytes - cur.nbytes
                chosen[u] = o
                improved = True
    return chosen
