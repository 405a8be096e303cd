"""The improve loop's budget: a plan made before any training, and per-stage accounting on one clock.

``plan_budget`` splits ``--budget-minutes`` into what must be reserved (evaluations, validation, collection,
a fixed reserve; estimated from the measured cost of one agent episode, ``row_s``) and what is left for the
training stages (SFT, reward model, RL). It refuses — a ``UsageError`` naming what to change — when training
would get less than ``min_train_share`` of the budget or SFT less than ``min_sft_minutes``, so the loop never
spends an hour evaluating a model it had no time to train (issue 11 §1).

Ablation split (``ablate=True``): with s = sft_share / (sft_share + rm_share + ppo_share) and T the training
seconds, every arm gets M = T / (3 − 2s) training seconds: SFT up to the branch point for s·M (shared), then
either the SFT continuation, or reward model + GRPO, or reward model + PPO for (1 − s)·M each — the compute
is s·M + 3(1 − s)·M = T (the reward model is trained once and charged to both RL arms, so a little is left
over). Example: T = 36 min, s = 0.78 → M = 25 min: SFT 19.5 min to the branch, then 5.5 min per arm.

``StageClock`` times named stages on the loop's budget clock (``budget.make_clock``) so that the summary can
say where the minutes went (``per_stage``) and what share went to training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from ragloop.core.errors import UsageError

# stages whose minutes count as training (an optimiser runs; GRPO's rollouts and keep-best validations belong to it)
TRAINING_STAGES = ("sft", "sft_branch", "sft_continue", "rm", "grpo", "ppo")
# a KL-to-start + forgetting probe: two full-vocabulary forward passes per test completion (at most
# KL_PROBE_TRACES of them), about 2 greedy episodes per completion. Measured on the embedded 135M model, 2 threads,
# AVX-512: 64 completions 75 s + the 16-row forgetting set 10 s at 1.04 s per batched greedy episode (2026-12-03);
# before the cap the probe covered up to 64 completions and the estimate grew with --eval-n (15.5 of 60 minutes).
KL_PROBE_FACTOR = 2.0
KL_PROBE_TRACES = 32


@dataclass
class BudgetPlan:
    """How the loop spends its budget (seconds on ``clock``), planned before training."""

    budget_s: float
    clock: str
    row_s: float  # estimated cost of one greedy agent episode (measured on the baseline's questions)
    sample_row_s: float  # ... of one sampled episode (measured on the collection; row_s until then)
    reserved: dict[str, float]  # non-training costs: test evaluations, validation, collection, reserve
    train_s: float  # budget − reserved
    sft_s: float  # normal: SFT; ablation: SFT up to the branch point (shared by every arm)
    rm_s: float  # reward model (0 when none is trained)
    rl_s: float  # normal: the RL stage; ablation: each RL arm's RL stage
    arm_s: float  # training seconds of each arm (ablation) or of the whole loop (normal)
    sft_continue_s: float = 0.0  # ablation: the SFT-only arm's continuation after the branch point
    ablate: bool = False
    verifier_episodes: int = 0  # ablation: sampled episodes of the verifier@N row (reserved in "verifier")
    warning: str | None = None  # a re-plan (strict=False) that no longer meets the minimums says so here

    @property
    def train_share(self) -> float:
        return self.train_s / self.budget_s if self.budget_s > 0 else 0.0

    def describe(self) -> str:
        """One line saying the split, printed before anything is trained."""
        m = lambda s: f"{s / 60:.1f}"  # noqa: E731
        res = ", ".join(f"{k} {m(v)}" for k, v in self.reserved.items() if v > 0)
        head = (f"plan: {m(self.budget_s)} min on the {self.clock} clock ({self.row_s:.2f} s per greedy, {self.sample_row_s:.2f} s per sampled episode): "
                f"reserved {m(sum(self.reserved.values()))} min ({res}); training {m(self.train_s)} min "
                f"({100 * self.train_share:.0f}%)")
        if self.ablate:
            return (head + f" — every arm trains {m(self.arm_s)} min: SFT {m(self.sft_s)} min to the branch point, "
                    f"then SFT {m(self.sft_continue_s)} min | reward model {m(self.rm_s)} + GRPO {m(self.rl_s)} | "
                    f"reward model {m(self.rm_s)} + PPO {m(self.rl_s)}")
        return head + f" — SFT {m(self.sft_s)}, reward model {m(self.rm_s)}, RL {m(self.rl_s)} min"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_share"] = round(self.train_share, 4)
        return d


def plan_budget(
    *, budget_s: float, clock: str, row_s: float, sample_row_s: float | None = None, eval_n: int, val_n: int, collect_episodes: int,
    rm_collect_episodes: int, rm: bool, verifier_episodes: int = 0, rl: str, ablate: bool, sft_share: float, rm_share: float,
    rl_share: float, reserve_s: float, min_train_share: float = 0.6, min_sft_s: float = 120.0, strict: bool = True,
) -> BudgetPlan:
    """Split ``budget_s`` before training; raise ``UsageError`` (with what to change) when it cannot train
    (``strict=False``: return the plan with ``warning`` set — for re-plans once part of the budget is spent).

    Reserved: the test evaluations (baseline + after, or baseline + 3 arms when ablating) of ``eval_n``
    questions, the validation of the 4 ablation arms (``val_n`` questions each), the collection episodes,
    the verifier@N row's sampled episodes (``verifier_episodes``), and ``reserve_s`` (KL, forgetting probe,
    table). A greedy episode costs ``row_s`` (the starting model's episodes run to the token limit, an upper
    bound for a trained one), a sampled one ``sample_row_s``.

    >>> p = plan_budget(budget_s=600, clock="cpu", row_s=1.0, eval_n=20, val_n=10, collect_episodes=16,
    ...                 rm_collect_episodes=0, rm=False, rl="none", ablate=False, sft_share=0.78, rm_share=0.07,
    ...                 rl_share=0.15, reserve_s=24, min_sft_s=60)
    >>> (p.train_s, p.sft_s)   # 600 − 2·20 (evaluations) − 16 (collection) − 2·20 (KL probe) − 24 (reserve)
    (480.0, 480.0)
    """
    n_test = 4 if ablate else 2
    sample_s = row_s if sample_row_s is None else sample_row_s
    rm_on = rm and (ablate or rl != "none")
    reserved = {
        "evaluations": n_test * eval_n * row_s,
        "validation": (4 * val_n * row_s) if ablate else 0.0,
        "collection": (collect_episodes + (rm_collect_episodes if rm_on else 0)) * sample_s,
        "verifier": verifier_episodes * sample_s,
        # KL to the start + forgetting probe per trained arm: two forward passes over the arm's test completions
        "kl_forgetting": (3 if ablate else 1) * KL_PROBE_FACTOR * min(eval_n, KL_PROBE_TRACES) * row_s,
        "reserve": reserve_s,
    }
    fixed = sum(reserved.values())
    train = max(0.0, budget_s - fixed)
    shares = {"sft": sft_share, "rm": rm_share if rm_on else 0.0,
              "rl": rl_share if (ablate or rl != "none") else 0.0}
    total_share = sum(shares.values())
    if ablate:
        s = sft_share / total_share
        arm = train / (3 - 2 * s)
        sft_s = s * arm
        rest = arm - sft_s
        rm_s = rest * shares["rm"] / (shares["rm"] + shares["rl"])
        plan = BudgetPlan(budget_s, clock, row_s, sample_s, reserved, train, sft_s, rm_s, rest - rm_s, arm,
                          sft_continue_s=rest, ablate=True, verifier_episodes=verifier_episodes)
        sft_frac = s / (3 - 2 * s)  # SFT's seconds per training second
    else:
        sft_frac = sft_share / total_share
        plan = BudgetPlan(budget_s, clock, row_s, sample_s, reserved, train, sft_frac * train,
                          train * shares["rm"] / total_share, train * shares["rl"] / total_share, train)
    short_train = train < min_train_share * budget_s
    short_sft = plan.sft_s < min_sft_s
    if short_train or short_sft:
        # what would work: B − fixed ≥ min_train_share·B and (B − fixed)·sft_frac ≥ min_sft_s
        need_b = max(fixed / (1 - min_train_share), fixed + min_sft_s / sft_frac)
        per_q = n_test * row_s  # reserved seconds per --eval-n question
        per_q += verifier_episodes / max(1, eval_n) * sample_s
        other = fixed - reserved["evaluations"] - reserved["verifier"]  # the KL probe is capped: fixed cost
        n_max = math.floor(min((1 - min_train_share) * budget_s - other, budget_s - other - min_sft_s / sft_frac) / per_q)
        what = (f"SFT would get {plan.sft_s / 60:.1f} min (at least {min_sft_s / 60:.1f} needed)" if short_sft else
                f"training would get {100 * plan.train_share:.0f}% of the budget (at least "
                f"{100 * min_train_share:.0f}% needed)")
        hint = f"raise --budget-minutes to at least {math.ceil(need_b / 60)}"
        hint += (f" or lower --eval-n to {n_max}" if 1 <= n_max < eval_n else "; lowering --eval-n alone is not enough")
        if ablate and reserved["validation"] + reserved["verifier"] > 0.1 * budget_s:
            hint += "; --val-n and --verifier-samples shrink the validation and verifier parts"
        if reserved["collection"] > 0.1 * budget_s:
            hint += "; --collect-questions shrinks the collection"
        names = {"evaluations": f"{n_test} evaluations of {eval_n} questions",
                 "validation": f"4 validations of {val_n}", "collection": "collection",
                 "verifier": f"the verifier row ({verifier_episodes} samples)",
                 "kl_forgetting": "KL/forgetting probes", "reserve": "reserve"}
        parts = ", ".join(f"{names[k]} {v / 60:.1f}" for k, v in reserved.items() if v > 0)
        msg = (f"{what} of a {budget_s / 60:g}-min budget ({clock} clock) after setting aside {parts} min "
               f"(measured: {row_s:.2f} s per greedy, {sample_s:.2f} s per sampled episode)")
        if not strict:
            plan.warning = f"{msg} — {hint}"
            return plan
        raise UsageError(msg, hint=hint)
    return plan


class StageClock:
    """Seconds per named stage on the budget clock ``now``; stages run one after another."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.t0 = now()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = self.now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + (self.now() - t)

    def used(self) -> float:
        return self.now() - self.t0

    def report(self, *, asked_s: float, clock: str, tolerance: float = 0.05) -> dict[str, Any]:
        """The summary's ``budget``: asked, used, clock, per_stage (minutes) and the training share."""
        used = self.used()
        train = sum(v for k, v in self.seconds.items() if k in TRAINING_STAGES)
        return {"asked": round(asked_s / 60, 3), "used": round(used / 60, 3), "clock": clock,
                "per_stage": {k: round(v / 60, 3) for k, v in self.seconds.items()},
                "training_minutes": round(train / 60, 3), "training_share": round(train / used, 4) if used > 0 else 0.0,
                "within_tolerance": used <= asked_s * (1 + tolerance), "tolerance": tolerance}
