"""What an evaluation measures from two models' logits on the same tokens, and a layer's output error.

KL(teacher || student) per token position, in nats (natural log): sum_v p_t(v) (log p_t(v) - log p_s(v)), from
log-softmax in float64 so that near-identical distributions give a KL near zero, not rounding noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TOP_K = 5
_ROWS = 256  # positions per float64 chunk: bounded memory for any vocabulary


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(log_t: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    return (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)


@dataclass
class TokenStats:
    """Per-position KL and agreement, accumulated over sequences; next-token log-likelihoods for perplexity."""

    kl: list[float] = field(default_factory=list)
    top1: int = 0
    top5: int = 0
    nll_teacher: float = 0.0
    nll_student: float = 0.0
    predicted: int = 0  # positions with a next token (perplexity counts these)

    def add(self, teacher: np.ndarray, student: np.ndarray, ids: list[int]) -> None:
        """One sequence: logits [positions, vocab] of each model (float), and its token ids."""
        n = len(ids)
        for a in range(0, n, _ROWS):
            lt, ls = log_softmax64(teacher[a : a + _ROWS]), log_softmax64(student[a : a + _ROWS])
            self.kl += _kl(lt, ls).tolist()
            best = lt.argmax(axis=-1)
            self.top1 += int((ls.argmax(axis=-1) == best).sum())
            k = min(TOP_K, ls.shape[-1])
            top = np.argpartition(-ls, k - 1, axis=-1)[:, :k]
            self.top5 += int((top == best[:, None]).any(axis=-1).sum())
            rows = np.arange(lt.shape[0])
            nxt = [ids[a + r + 1] for r in rows if a + r + 1 < n]
            if nxt:
                m = len(nxt)
                self.nll_teacher -= float(lt[rows[:m], nxt].sum())
                self.nll_student -= float(ls[rows[:m], nxt].sum())
                self.predicted += m

    def summary(self) -> dict[str, float | int]:
        kl = np.asarray(self.kl, dtype=np.float64)
        n = len(kl)
        pct = lambda q: float(np.percentile(kl, q)) if n else math.nan  # noqa: E731
        return {
            "kl_mean": float(kl.mean()) if n else math.nan,
            "kl_p50": pct(50), "kl_p95": pct(95), "kl_p99": pct(99),
            "kl_max": float(kl.max()) if n else math.nan,
            "top1": self.top1 / n if n else math.nan,
            "top5": self.top5 / n if n else math.nan,
            "ppl_teacher": math.exp(self.nll_teacher / self.predicted) if self.predicted else math.nan,
            "ppl_student": math.exp(self.nll_student / self.predicted) if self.predicted else math.nan,
            "tokens": n,
        }


def kl_rows(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """KL(teacher || student) of each position of [positions, vocab] logits, in float64 chunks of positions."""
    out = [np.zeros(0)]
    for a in range(0, teacher.shape[0], _ROWS):
        out.append(_kl(log_softmax64(teacher[a : a + _ROWS]), log_softmax64(student[a : a + _ROWS])))
    return np.concatenate(out)


def mean_kl(teacher: np.ndarray, student: np.ndarray, mask: np.ndarray) -> float:
    """Mean KL(teacher || student) over the real positions (`mask` [batch, positions]) of [batch, positions, vocab] logits."""
    return float(np.concatenate([kl_rows(teacher[b, :n], student[b, :n]) for b, n in enumerate(mask.sum(axis=1))]).mean())


def masked_sq_sum(a: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sum of squares (float64) of a [batch, positions, ...] array over the positions `mask` marks real."""
    a2 = a.astype(np.float64) ** 2
    if mask is not None and a2.ndim >= 2 and a2.shape[:2] == mask.shape:
        a2 *= mask.reshape(mask.shape + (1,) * (a2.ndim - 2))
    return float(a2.sum())


def relative_error(got: list[np.ndarray], want: list[np.ndarray], mask: np.ndarray | None = None) -> float:
    """||got - want|| / ||want|| over all the output arrays (float64 sums), counting only unmasked positions.

    Arrays are [batch, positions, ...]; `mask` [batch, positions] marks the real (unpadded) positions."""
    num = sum(masked_sq_sum(g.astype(np.float64) - w.astype(np.float64), mask) for g, w in zip(got, want))
    den = sum(masked_sq_sum(w, mask) for w in want)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
