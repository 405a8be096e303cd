"""Training health guards (SECURITY.md §5): non-finite values, PPO ratio/KL/clip checks, repetition.

- ``NonFiniteGuard``: a non-finite loss, reward or gradient skips the update and is counted; K in a row
  aborts the run with a TrainingError (the last checkpoint on disk is good, because checkpoints holding
  NaN/Inf are never written).
- ``check_first_ratio``: on the first minibatch after a rollout the policy has not moved, so π/π_old must
  be exactly 1 — anything else means rollout and training compute log-probabilities differently
  (different masking, padding, dtype or position ids), which silently biases PPO.
- ``PPOHealth``: bounds on KL to the reference and on the clip fraction; a breach asks the trainer to roll
  back to the last good checkpoint (or stop).
- ``repetition_rate`` and ``pearson``: degenerate outputs (loops) and reward hacking by length show up here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.core.errors import TrainingError

log = logging.getLogger(__name__)


def is_finite(x: Any) -> bool:
    """True when a float or every element of a tensor is finite."""
    import torch

    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(float(x))


def grads_finite(parameters: Iterable[Any]) -> bool:
    import torch

    return all(bool(torch.isfinite(p.grad).all()) for p in parameters if p.grad is not None)


class NonFiniteGuard:
    """Skip-and-count for non-finite values; abort after ``max_consecutive`` skips in a row.

    >>> g = NonFiniteGuard(max_consecutive=2)
    >>> g.check(1.0), g.check(float("nan")), g.skipped
    (True, False, 1)
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, *values: Any, what: str = "loss") -> bool:
        """True if every value is finite (resets the streak); False means skip this update."""
        if all(is_finite(v) for v in values):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite %s: update skipped (%d in a row, %d in all)", what, self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(
                f"{self.consecutive} non-finite {what} values in a row; stopping "
                f"(the last checkpoint on disk is good)",
                hint="lower the learning rate, enable gradient clipping, or check the data",
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(s["skipped"]), int(s["consecutive"])


def check_first_ratio(max_dev: float, *, tol: float = 1e-3) -> None:
    """Raise TrainingError unless max |π/π_old − 1| on the first minibatch after a rollout is ≤ ``tol``."""
    if not (max_dev <= tol):
        raise TrainingError(
            f"PPO ratio on the first minibatch after a rollout deviates from 1 by {max_dev:.3g} (> {tol}); "
            "rollout and training log-probabilities disagree",
            hint="check that rollout scoring and training use the same masking, padding and dtype",
        )


@dataclass
class PPOHealth:
    """Bounds checked after each PPO update; ``verdict`` says what the trainer should do."""

    max_kl: float = 10.0  # mean per-sequence KL to the reference (nats) beyond which we roll back
    max_clipfrac: float = 0.5  # fraction of clipped tokens beyond which the step is too large
    max_rollbacks: int = 3

    def verdict(self, *, kl: float, clipfrac: float, finite: bool = True) -> str:
        """"ok", or "rollback" with the reason logged."""
        if not finite:
            log.warning("non-finite PPO statistics: rolling back")
            return "rollback"
        if kl > self.max_kl:
            log.warning("KL to reference %.3f > %.3f: rolling back", kl, self.max_kl)
            return "rollback"
        if clipfrac > self.max_clipfrac:
            log.warning("clip fraction %.3f > %.3f: rolling back", clipfrac, self.max_clipfrac)
            return "rollback"
        return "ok"


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of n-grams that repeat an earlier n-gram in the same sequence:
    ``repetition_rate([1, 2, 1, 2, 1, 2], n=2) -> 0.6`` (3 of the 5 bigrams are repeats)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (NaN if either side is constant) — e.g. reward vs response length."""
    n = len(x)
    if n < 2 or n != len(y):
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)
