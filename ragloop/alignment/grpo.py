"""Critic-free group RL (GRPO / RLOO) over the agent runtime's episodes, with health alarms and keep-best.

Written to be read top to bottom, cleanrl-style; the math lives in ``rl.py``. One iteration:

- Rollouts: ``batch_questions`` questions, ``samples`` episodes each (a *group*), run as agent episodes on
  the batched runtime (``ragloop.alignment.collect.run_agent_batched``) — single-step PAL and multi-step
  ReAct alike; the agent's tools, sandbox and retriever are the environment. Sample j of question i is
  seeded by (seed, iteration, i, j). The rollout copy may decode in a faster precision (``rollout_precision``).
- Rewards: one number per episode, ``reward_fn(items, traces)`` — programmatic (answer correct by
  ``ragloop.eval.runners.is_correct``, format valid by ``trace_format_valid``), a reward model, or both,
  composed explicitly by ``make_episode_reward``: ``w_correct·correct + w_format·format + w_rm·RM``.
- Advantages: group-normalised, no value network — GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2) or RLOO
  (Ahmadian et al. 2024, "Back to Basics") — ``rl.group_advantages``. The episode's advantage is broadcast to
  every generated token of every model call of that episode (final reward; no per-turn credit).
- Training rows: one per model call (and per candidate of the call): the call's ``prompt_ids`` are context,
  its generated ``token_ids`` carry the loss. A later call's prompt holds the earlier generations *and the
  observations* (tool output, retrieved passages) inserted by the agent, so observation tokens are never
  trained on — they only ever appear as context (``call_rows``/``row_loss_mask``).
- Loss per token: the clipped surrogate on π_θ/π_old (Schulman et al. 2017; ``rl.policy_loss``), where π_old
  is the training model's own log-prob of the rollout tokens before the update, times the truncated
  importance weight min(π_old/π_rollout, C) that corrects for the tokens having been sampled by the rollout
  engine (reduced precision, grammar mask) — Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
  You Off-Policy RL Training" (``rl.truncated_is_weights``); plus ``kl_coef`` · k3 KL to the frozen reference
  (Shao et al. 2024 eq. 4; Schulman 2020), the reference being the starting model (LoRA: adapters disabled).
  Token-level mean over the minibatch (Yu et al. 2025, "DAPO", §3.3).
- Health alarms stop the run with a message naming the cause: every group zero-variance for ``patience``
  iterations, every completion cut at the token limit, KL blow-up, length collapse, and (with gold answers on
  the validation slice) the validation reward above the start's while its accuracy is below it. The fraction of
  zero-variance groups is logged every iteration (``grpo/zero_std_frac``).
- Keep-best: every ``eval_every`` iterations (and at the start and the end) the policy runs the validation
  items greedily on the runtime; the best-scoring weights are kept (``<out>/best/checkpoints``) and are the
  final policy; ``GRPOResult.best_iteration`` says which iteration won (0 = the starting policy).

Metric names (fixed vocabulary, cleanrl-style): ``grpo/reward_mean``, ``grpo/zero_std_frac``, ``grpo/kl``,
``grpo/clipfrac``, ``grpo/approx_kl``, ``grpo/is_weight_mean`` …

Entry point: ``run_grpo(cfg, policy, items, make_agent, reward_fn, val_items=...)``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ragloop.alignment.budget import make_clock
from ragloop.alignment.checkpoint import export_policy, load_checkpoint, run_manifest, save_checkpoint
from ragloop.alignment.guards import check_first_ratio
from ragloop.alignment.logging import MetricsLogger
from ragloop.alignment.ppo import build_episode_batch, forward_episodes, policy_models, sync_merged_weights
from ragloop.alignment.rl import (
    group_advantages,
    kl_per_token,
    masked_mean,
    policy_loss,
    truncated_is_weights,
    zero_std_fraction,
)
from ragloop.core.errors import ConfigError, DataError, TrainingError
from ragloop.core.trace import Trace
from ragloop.models.types import GenerationConfig

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """GRPO/RLOO settings; names follow the literature (clip_coef, kl_coef) and ``PPOConfig``."""

    out_dir: str  # run directory: metrics, best/ checkpoint, policy/
    iterations: int = 10  # rollout → update cycles
    batch_questions: int = 4  # questions (groups) per iteration
    samples: int = 4  # episodes per question (the group size K; GRPO's G); >= 2
    advantage: str = "grpo"  # "grpo": (r − mean)/(std + eps); "rloo": r − mean of the other K−1
    adv_eps: float = 1e-6  # ε of GRPO's normalisation
    task: str = "gsm8k"  # what "correct" means (ragloop.eval.runners.is_correct): "gsm8k" numeric, else labels
    max_new_tokens: int = 256  # tokens per model call of an episode
    temperature: float = 1.0  # rollout temperature (the optimised policy is π at this temperature)
    lora: bool = True  # LoRA policy (reference = adapters disabled) or full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator
    lr: float = 1e-4  # LoRA default; use ~1e-6..1e-5 for full fine-tuning
    epochs: int = 1  # passes over each iteration's rows (1 = strictly on-policy)
    minibatch_rows: int = 8  # model-call rows per gradient step
    clip_coef: float = 0.2  # ε of the clipped surrogate
    kl_coef: float = 0.04  # β of the k3 KL to the reference (DeepSeekMath uses 0.04)
    tis_cap: float | None = 2.0  # C of the truncated importance weight (Yao et al. 2025); None = no correction
    rollout_precision: str = "fp32"  # decode weights of the rollout copy: fp32, bf16, int8, int4
    max_grad_norm: float | None = 1.0  # gradient-norm clipping; None = off
    ratio_tol: float = 1e-3  # |π/π_old − 1| allowed on the first minibatch (training forward is deterministic)
    patience: int = 2  # consecutive iterations a flat-reward / all-truncated / length-collapse alarm may last
    max_kl: float = 1.0  # mean k3 KL per generated token (nats) beyond which the run stops (KL blow-up)
    min_len_ratio: float = 0.2  # length collapse: mean tokens per episode below this × the first iteration's
    eval_every: int = 5  # iterations between validation runs (keep-best); also at the start and the end
    seed: int = 0  # questions, sampling seeds and LoRA init derive from it
    budget_seconds: float | None = None  # stop cleanly after this much time on budget_clock
    budget_clock: str = "wall"  # "wall" or "cpu" (budget.py)
    export: bool = True  # write <out>/policy (loadable with load_policy)
    name: str = ""  # name of the exported policy

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.batch_questions >= 1, "batch_questions must be >= 1"),
            (self.samples >= 2, "samples must be >= 2 (group advantages compare samples of one question)"),
            (self.advantage in ("grpo", "rloo"), f"advantage must be 'grpo' or 'rloo', got {self.advantage!r}"),
            (self.adv_eps > 0, "adv_eps must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (GRPO samples)"),
            (self.lr > 0, "lr must be > 0"),
            (self.epochs >= 1 and self.minibatch_rows >= 1, "epochs and minibatch_rows must be >= 1"),
            (0 < self.clip_coef < 1, "clip_coef must be in (0, 1)"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.tis_cap is None or self.tis_cap >= 1, "tis_cap must be >= 1 (or None for no correction)"),
            (self.rollout_precision in ("fp32", "bf16", "int8", "int4"),
             f"rollout_precision must be fp32, bf16, int8 or int4, got {self.rollout_precision!r}"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.max_kl > 0, "max_kl must be > 0"),
            (0 <= self.min_len_ratio < 1, "min_len_ratio must be in [0, 1)"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.budget_clock in ("wall", "cpu"), "budget_clock must be 'wall' or 'cpu'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"GRPO config: {msg}")


@dataclass
class GRPOItem:
    """One training question and its gold answer (None when the reward does not need one)."""

    question: str
    gold: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


EpisodeRewardFn = Callable[[Sequence[GRPOItem], Sequence[Trace]], list[float]]
AgentFactory = Callable[[Any, Any], Any]  # (policy, sandbox or None) -> agent with .episode(question)


@dataclass
class GRPOResult:
    out_dir: Path
    policy_dir: Path | None
    iterations: int
    stopped_by: str  # "done", "budget" or "alarm"
    alarm: str | None  # the alarm's message when stopped_by == "alarm"
    best_iteration: int | None  # the iteration whose weights are the final policy (0 = the start); None: no validation
    best_score: float | None  # its validation score (mean episode reward, greedy)
    validation: list[dict[str, Any]]  # every validation run: iteration, score, accuracy
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------- rewards


def make_episode_reward(
    *, task: str = "gsm8k", w_correct: float = 1.0, w_format: float = 0.0, reward_model: Any = None,
    w_rm: float = 1.0, rm_clip: float | None = None,
) -> EpisodeRewardFn:
    """reward = w_correct · correct + w_format · format_valid + w_rm · clip(RM(question, response), ±rm_clip).

    ``correct`` is ``ragloop.eval.runners.is_correct(task, trace.answer, gold)``; ``format_valid`` is
    ``trace_format_valid(trace)`` (the agent's own format, e.g. a parsed PAL program, a ReAct Finish); the
    reward model (optional) scores the episode's generations joined by newlines against the question.
    """
    from ragloop.eval.runners import is_correct, trace_format_valid

    if w_correct == 0 and w_format == 0 and (reward_model is None or w_rm == 0):
        raise ConfigError("GRPO needs a reward: give w_correct, w_format or a reward model a non-zero weight")

    def fn(items: Sequence[GRPOItem], traces: Sequence[Trace]) -> list[float]:
        out = [0.0] * len(items)
        if w_correct:
            for n, (it, t) in enumerate(zip(items, traces, strict=True)):
                if it.gold is None:
                    raise DataError(f"no gold answer for {it.question[:60]!r}",
                                    hint="give every question an 'answer', or set the correctness weight to 0")
                out[n] += w_correct * float(is_correct(task, t.answer, it.gold))
        if w_format:
            out = [r + w_format * float(trace_format_valid(t)) for r, t in zip(out, traces, strict=True)]
        if reward_model is not None and w_rm:
            responses = ["\n".join(s.raw_output or "" for s in t.steps) or (t.answer or "") for t in traces]
            rm = reward_model.score_batch([it.question for it in items], responses)
            if rm_clip is not None:
                rm = [max(-rm_clip, min(rm_clip, r)) for r in rm]
            out = [r + w_rm * s for r, s in zip(out, rm, strict=True)]
        return out

    return fn


# ------------------------------------------------------------------------------------- training rows


@dataclass
class CallRow:
    """One trained sequence: a model call's prompt (context only) and one generated completion (the loss)."""

    episode: int  # index of the episode in the iteration
    prompt_ids: list[int]
    token_ids: list[int]
    rollout_logprobs: list[float] | None  # the sampler's log-probs (temperature + grammar mask), if recorded
    finish_reason: str | None


def call_rows(trace: Trace, episode: int) -> list[CallRow]:
    """The training rows of one episode: every candidate of every model call with at least one token.

    Observation tokens (tool output, passages) only ever occur inside a later call's ``prompt_ids``, which
    are context: no row puts them under the loss."""
    rows = []
    for call in trace.calls:
        for comp in call.completions:
            ids = list(comp.get("token_ids") or [])
            if not ids or not call.prompt_ids:
                continue  # nothing generated (a stop string at once), or a policy that gave no prompt ids
            lps = comp.get("logprobs")
            lps = list(lps) if lps and len(lps) == len(ids) else None
            rows.append(CallRow(episode, list(call.prompt_ids), ids, lps, comp.get("finish_reason")))
    return rows


def row_loss_mask(row: CallRow) -> list[int]:
    """Per token of ``prompt_ids + token_ids``: 1 where the loss applies (the model's generated tokens)."""
    return [0] * len(row.prompt_ids) + [1] * len(row.token_ids)


def _pad(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)  # (B, L)
    for n, r in enumerate(rows):
        out[n, : r.shape[0]] = r
    return out


# ------------------------------------------------------------------------------------------- health


class GRPOHealth:
    """Alarms that stop a run which cannot learn; ``observe`` returns the message of the first that fires."""

    def __init__(self, *, patience: int, max_kl: float, min_len_ratio: float, max_new_tokens: int) -> None:
        self.patience, self.max_kl, self.min_len_ratio = patience, max_kl, min_len_ratio
        self.max_new_tokens = max_new_tokens
        self.flat = self.truncated = self.short = 0  # consecutive iterations each condition held
        self.first_len: float | None = None

    def observe(self, *, zero_std_frac: float, reward_mean: float, truncated_frac: float, kl: float,
                mean_len: float) -> str | None:
        self.flat = self.flat + 1 if zero_std_frac >= 1.0 else 0
        self.truncated = self.truncated + 1 if truncated_frac >= 1.0 else 0
        if self.first_len is None and mean_len > 0:
            self.first_len = mean_len
        collapsed = self.first_len is not None and mean_len < self.min_len_ratio * self.first_len
        self.short = self.short + 1 if collapsed else 0
        if self.flat >= self.patience:
            return (f"every sample of every question got the same reward (mean {reward_mean:.3g}) for {self.flat} "
                    "iterations: nothing to learn — raise temperature or samples, or pick easier questions")
        if self.truncated >= self.patience:
            return (f"every completion was cut at the token limit ({self.max_new_tokens} tokens) for "
                    f"{self.truncated} iterations — raise max_new_tokens (--max-tokens) or check the stop strings")
        if not math.isfinite(kl) or kl > self.max_kl:
            return (f"KL blow-up: the KL to the reference is {kl:.3g} nats per token (> {self.max_kl}) — "
                    "lower lr or raise kl_coef")
        if self.short >= self.patience:
            return (f"length collapse: episodes fell to {mean_len:.1f} generated tokens from {self.first_len:.1f} "
                    f"(< {self.min_len_ratio} of the first iteration's) for {self.short} iterations — raise "
                    "kl_coef or lower lr, and check that the reward does not favour short outputs")
        return None

    def observe_validation(self, records: Sequence[dict[str, Any]]) -> str | None:
        """Reward hacking: over the last ``patience`` validations the score stayed above the start's while the
        accuracy stayed below it (records: ``{"iteration", "score", "accuracy"}``, the first is the start)."""
        if len(records) <= self.patience or records[0].get("accuracy") is None:
            return None
        start, recent = records[0], records[-self.patience:]
        if all(r["score"] > start["score"] and r["accuracy"] is not None and r["accuracy"] < start["accuracy"]
               for r in recent):
            last = recent[-1]
            return (f"reward rising while accuracy falls: validation reward {start['score']:.3g} → {last['score']:.3g}, "
                    f"accuracy {start['accuracy']:.3g} → {last['accuracy']:.3g} — the reward pays for something other "
                    "than correct answers; lower w_format / the reward model's weight")
        return None


# ---------------------------------------------------------------------------------------------- loop


def run_grpo(
    cfg: GRPOConfig,
    policy: Any,
    items: Sequence[GRPOItem],
    make_agent: AgentFactory,
    reward_fn: EpisodeRewardFn,
    *,
    val_items: Sequence[GRPOItem] | None = None,
    sandbox: Any = None,
    hooks: dict[str, Callable[..., Any]] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> GRPOResult:
    """Optimise ``policy.model`` with GRPO/RLOO over agent episodes on ``items``; see the module docstring.

    ``make_agent(policy, sandbox)`` builds the agent that runs each episode (on the rollout copy of the
    policy). ``val_items``: the keep-best slice (keep it disjoint from any reported test slice). ``hooks``
    (tests): ``"rewards"(iteration, rewards (G, K)) -> rewards`` to inject faults; ``"after_update"(iteration,
    trainable params)``. After the run ``policy.model`` is the final plain model (LoRA merged).
    """
    from ragloop.alignment.collect import run_agent_batched
    from ragloop.eval.runners import is_correct
    if not items:
        raise DataError("no GRPO questions", hint="give a JSONL file with one {'question', 'answer'} per line")
    hooks = hooks or {}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = policy.tokenizer
    pad_id = int(getattr(policy, "pad_id", None) or tok.pad_token_id or tok.eos_token_id)
    model, rollout_model, ref_model, rollout_policy = policy_models(policy, cfg,
                                                                    rollout_precision=cfg.rollout_precision)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, eps=1e-5)
    health = GRPOHealth(patience=cfg.patience, max_kl=cfg.max_kl, min_len_ratio=cfg.min_len_ratio,
                        max_new_tokens=cfg.max_new_tokens)
    logger = MetricsLogger(out)
    best_dir = out / "best"
    best: dict[str, Any] = {"iteration": None, "score": -math.inf}
    validation: list[dict[str, Any]] = []

    def sync() -> None:
        if cfg.lora:
            sync_merged_weights(model, rollout_model)

    def validate(at: int) -> None:
        if not val_items:
            return
        model.eval()
        sync()
        traces = [g[0] for g in run_agent_batched(make_agent, rollout_policy, [x.question for x in val_items],
                                                  sandbox=sandbox)]  # the agent's own (greedy) decoding
        scores = reward_fn(val_items, traces)
        score = sum(scores) / len(scores)
        acc = [is_correct(cfg.task, t.answer, x.gold) for x, t in zip(val_items, traces, strict=True)
               if x.gold is not None]
        rec = {"iteration": at, "score": score, "accuracy": sum(acc) / len(acc) if acc else None}
        validation.append(rec)
        log.info("validation at iteration %d: score %.4f", at, score)
        if score > best["score"]:  # ties keep the earlier (less trained) weights
            best.update(iteration=at, score=score)
            save_checkpoint(best_dir, at, tensors={"policy": {n: p.detach() for n, p in trainable.items()}},
                            state={"val": rec}, keep=1)

    clock = make_clock(cfg.budget_clock)
    t_start, stopped, alarm = clock(), "done", None
    validate(0)
    it = 0
    while it < cfg.iterations:
        t0 = time.perf_counter()
        # ---- rollout: K episodes per question on the runtime ------------------------------------------
        rng = random.Random(cfg.seed * 100_003 + it)
        batch = [items[i] for i in rng.sample(range(len(items)), min(cfg.batch_questions, len(items)))]
        model.eval()
        sync()
        decoding = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    seed=cfg.seed * 1_000_003 + it, logprobs=True)
        groups = run_agent_batched(make_agent, rollout_policy, [x.question for x in batch], samples=cfg.samples,
                                   decoding=decoding, sandbox=sandbox)
        t_roll = time.perf_counter() - t0
        ep_items = [x for x, g in zip(batch, groups, strict=True) for _ in g]
        traces = [t for g in groups for t in g]
        rewards = torch.tensor(reward_fn(ep_items, traces), dtype=torch.float32).view(len(batch), cfg.samples)
        if "rewards" in hooks:
            rewards = hooks["rewards"](it, rewards)
        if not torch.isfinite(rewards).all():
            raise TrainingError(f"iteration {it}: the reward function returned non-finite rewards",
                                hint="check the reward model / reward function")
        adv = group_advantages(rewards, cfg.advantage, cfg.adv_eps).view(-1)  # (G·K,) one per episode
        zfrac = zero_std_fraction(rewards)
        rows = [r for e, t in enumerate(traces) for r in call_rows(t, e)]
        correct = [is_correct(cfg.task, t.answer, x.gold) for x, t in zip(ep_items, traces, strict=True)
                   if x.gold is not None]

        # ---- π_old (training model), π_ref, π_rollout for every row ------------------------------------
        old_rows: list[torch.Tensor] = []
        ref_rows: list[torch.Tensor] = []
        with torch.no_grad():
            for s in range(0, len(rows), cfg.minibatch_rows):
                mb_rows = rows[s : s + cfg.minibatch_rows]
                b = build_episode_batch([r.prompt_ids for r in mb_rows], [r.token_ids for r in mb_rows], pad_id)
                lp, _, _ = forward_episodes(model, None, b, temperature=cfg.temperature)  # (B, L)
                if cfg.lora:
                    with model.disable_adapter():
                        rlp, _, _ = forward_episodes(model, None, b, temperature=cfg.temperature)
                else:
                    rlp, _, _ = forward_episodes(ref_model, None, b, temperature=cfg.temperature)
                for n, r in enumerate(mb_rows):
                    old_rows.append(lp[n, : len(r.token_ids)].clone())
                    ref_rows.append(rlp[n, : len(r.token_ids)].clone())
        # rollout log-probs; where the policy recorded none, π_rollout = π_old (weight 1)
        roll_rows = [torch.tensor(r.rollout_logprobs) if r.rollout_logprobs is not None else o
                     for r, o in zip(rows, old_rows, strict=True)]
        n_tok = sum(len(r.token_ids) for r in rows)
        kl_tok = (sum(float(kl_per_token(o, f, "k3").sum()) for o, f in zip(old_rows, ref_rows, strict=True))
                  / max(1, n_tok))
        lr_dev = [float((o - ro).abs().max()) for o, ro in zip(old_rows, roll_rows, strict=True)]
        raw_w = [torch.exp(o - ro) for o, ro in zip(old_rows, roll_rows, strict=True)]
        ep_len = [0] * len(traces)
        for r in rows:
            ep_len[r.episode] += len(r.token_ids)
        mean_len = sum(ep_len) / len(ep_len) if ep_len else 0.0
        trunc = sum(1 for r in rows if r.finish_reason == "length") / len(rows) if rows else 0.0

        alarm = health.observe(zero_std_frac=zfrac, reward_mean=float(rewards.mean()), truncated_frac=trunc,
                               kl=kl_tok, mean_len=mean_len)

        # ---- update -----------------------------------------------------------------------------------
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "pl", "kl", "approx_kl", "clipfrac", "isw")}
        if alarm is None and zfrac < 1.0 and rows:  # all-flat groups: every advantage is 0, nothing to step on
            model.train()
            g = torch.Generator().manual_seed(cfg.seed * 31 + it)
            first = True
            for _epoch in range(cfg.epochs):
                perm = torch.randperm(len(rows), generator=g).tolist() if cfg.epochs > 1 else list(range(len(rows)))
                for s in range(0, len(rows), cfg.minibatch_rows):
                    idx = perm[s : s + cfg.minibatch_rows]
                    mb_rows = [rows[i] for i in idx]
                    b = build_episode_batch([r.prompt_ids for r in mb_rows], [r.token_ids for r in mb_rows], pad_id)
                    m = b.resp_mask  # (B, L): 1 on generated tokens only
                    L = m.shape[1]
                    lp, _, _ = forward_episodes(model, None, b, temperature=cfg.temperature)  # (B, L)
                    old = _pad([old_rows[i] for i in idx], L)
                    ref = _pad([ref_rows[i] for i in idx], L)
                    a = adv[[r.episode for r in mb_rows]].unsqueeze(1).expand(-1, L) * m  # (B, L) broadcast
                    w = (truncated_is_weights(old, _pad([roll_rows[i] for i in idx], L), m, cfg.tis_cap)
                         if cfg.tis_cap is not None else None)
                    pls = policy_loss(lp, old, a, m, cfg.clip_coef, token_weights=w)
                    if first:
                        check_first_ratio(float(pls.ratio_max_dev), tol=cfg.ratio_tol)
                        first = False
                    kl = masked_mean(kl_per_token(lp, ref, "k3"), m)
                    loss = pls.loss + cfg.kl_coef * kl
                    if not torch.isfinite(loss):
                        raise TrainingError(f"iteration {it}: non-finite GRPO loss",
                                            hint="lower lr; check the rewards and the rollout log-probs")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                    opt.step()
                    for k, v in (("loss", loss), ("pl", pls.loss), ("kl", kl), ("approx_kl", pls.approx_kl),
                                 ("clipfrac", pls.clipfrac), ("isw", masked_mean(w, m) if w is not None else None)):
                        if v is not None:
                            stats[k].append(float(v.detach()))
            model.eval()
            if "after_update" in hooks:
                hooks["after_update"](it + 1, trainable)
        it += 1

        # ---- bookkeeping ------------------------------------------------------------------------------
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        all_w = torch.cat(raw_w) if raw_w else torch.zeros(0)  # (tokens,)
        cap = cfg.tis_cap if cfg.tis_cap is not None else math.inf
        row = {
            "grpo/reward_mean": float(rewards.mean()), "grpo/reward_std": float(rewards.std()),
            "grpo/zero_std_frac": zfrac, "grpo/kl": kl_tok, "grpo/loss": mean(stats["loss"]),
            "grpo/policy_loss": mean(stats["pl"]), "grpo/clipfrac": mean(stats["clipfrac"]),
            "grpo/approx_kl": mean(stats["approx_kl"]),
            # π_old/π_rollout over every generated token: its truncated mean is the weight the loss used
            "grpo/is_weight_mean": float(all_w.clamp(max=cap).mean()) if all_w.numel() else float("nan"),
            "grpo/is_weight_truncated_frac": float((all_w > cap).float().mean()) if all_w.numel() else 0.0,
            "grpo/rollout_logprob_dev": max(lr_dev, default=0.0),
            "grpo/accuracy": mean([float(c) for c in correct]),
            "grpo/truncated_frac": trunc, "grpo/updated": float(bool(stats["loss"])),
            "tokens/episode_len_mean": mean_len, "tokens/rows": len(rows),
            "time/rollout_s": t_roll, "time/iteration_s": time.perf_counter() - t0,
        }
        logged = logger.log(it, row)
        if progress:
            progress(logged)
        if alarm is not None:
            log.warning("GRPO stopped at iteration %d: %s", it, alarm)
            stopped = "alarm"
            if not validation or validation[-1]["iteration"] != it - 1:
                validate(it - 1)  # the weights as they are (this iteration did not step): may still be the best
            break
        over = cfg.budget_seconds is not None and clock() - t_start > cfg.budget_seconds
        if it % cfg.eval_every == 0 or it == cfg.iterations or over:
            validate(it)
        hacked = health.observe_validation(validation)
        if hacked is not None:
            log.warning("GRPO stopped at iteration %d: %s", it, hacked)
            stopped, alarm = "alarm", hacked
            break
        if over and it < cfg.iterations:
            stopped = "budget"
            break

    # ---- keep-best: the final policy is the best validated weights ----------------------------------------
    if best["iteration"] is not None and validation and validation[-1]["iteration"] != best["iteration"]:
        ck = load_checkpoint(best_dir, load_torch_state=False)
        with torch.no_grad():
            for n, t in ck.tensors["policy"].items():
                trainable[n].copy_(t)
        log.info("keep-best: iteration %s (validation score %.4f) is the final policy", best["iteration"], best["score"])
    policy_dir = None
    plain = model.merge_and_unload() if cfg.lora else model
    plain.eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    policy.model = plain
    if cfg.export:
        manifest = run_manifest(asdict(cfg), seed=cfg.seed, data={"n_questions": str(len(items)),
                                                                 "n_validation": str(len(val_items or []))})
        manifest["result"] = {"iterations": it, "stopped_by": stopped, "alarm": alarm,
                              "best_iteration": best["iteration"], "validation": validation}
        policy_dir = export_policy(plain, tok, out / "policy", name=cfg.name or f"{policy.name}-grpo", manifest=manifest)
    logger.close(curves=["grpo/reward_mean", "grpo/zero_std_frac", "grpo/kl", "grpo/approx_kl", "grpo/clipfrac",
                         "grpo/is_weight_mean", "tokens/episode_len_mean"], title="GRPO")
    return GRPOResult(out_dir=out, policy_dir=policy_dir, iterations=it, stopped_by=stopped, alarm=alarm,
                      best_iteration=best["iteration"], best_score=best["score"] if best["iteration"] is not None else None,
                      validation=validation, history=list(logger.rows))
