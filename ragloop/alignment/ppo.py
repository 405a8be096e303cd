"""PPO for the policy: RL from a reward model and/or a programmatic check, with a KL leash to the SFT model.

Written to be read top to bottom, cleanrl-style; the math lives in ``rl.py``. The recipe:

- Rollouts (batched sampling with the fast decode path): each prompt gets ``samples_per_prompt``
  completions; each completion is one episode whose actions are its tokens.
- Scores: ``reward_fn(items, completions) -> list[float]`` — a reward model, an exact-answer / format
  check, or both (``make_reward_fn``).
- Per-token rewards: −β·(log π − log π_ref) on every token plus the score on the last token (Ziegler et al.
  2019 §2.2; Ouyang et al. 2022 eq. 2); the reference π_ref is the frozen starting (SFT) model — with a
  LoRA policy it is the same network with the adapters disabled. β is fixed or adaptive (Ziegler et al.).
- Advantages by GAE (Schulman et al. 2016) on a value head over the policy's last hidden state, whitened.
- Updates: ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate (Schulman et al. 2017),
  clipped value loss, entropy bonus, gradient-norm clipping, optional KL early stop (cleanrl's target_kl).
- Health (SECURITY.md §5): the ratio π/π_old on the first minibatch after a rollout must be 1; the decode
  path's log-probs are compared with the training forward's; non-finite values skip and count; KL or clip
  fraction past their bounds roll back to the last good checkpoint; reward-vs-length correlation and
  repetition are logged. Metric names follow cleanrl/TRL: ``ppo/approx_kl``, ``ppo/clipfrac``,
  ``ppo/explained_var``, ``objective/kl``, ``env/reward_mean`` …
- Exact resume: trainable weights, value head, optimizer, KL controller, guard and RNG are checkpointed;
  prompts and sampling seeds derive from (seed, iteration).

Entry point: ``run_ppo(cfg, policy, items, reward_fn)``; the exported policy (``<out>/policy``) loads with
``load_policy``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragloop.alignment.budget import make_clock
from ragloop.alignment.checkpoint import (
    capture_rng,
    export_policy,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    run_manifest,
    save_checkpoint,
)
from ragloop.alignment.guards import NonFiniteGuard, PPOHealth, check_first_ratio, pearson, repetition_rate
from ragloop.alignment.logging import MetricsLogger
from ragloop.alignment.rl import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from ragloop.core.errors import ConfigError, DataError, TrainingError
from ragloop.models.decoding import position_ids_from_mask
from ragloop.models.types import GenerationConfig, Prompt

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """PPO settings; names follow the literature (clip_coef, vf_coef, gae_lambda, kl_coef)."""

    out_dir: str
    iterations: int = 20  # rollout → update cycles
    batch_prompts: int = 8  # prompts per rollout
    samples_per_prompt: int = 2  # completions per prompt (episodes = batch_prompts × samples_per_prompt)
    max_new_tokens: int = 128
    temperature: float = 1.0  # sampling temperature (the optimised policy is π at this temperature)
    stop: list[str] = field(default_factory=list)  # stop strings of the task's format
    lora: bool = True  # LoRA policy (reference = adapters disabled) or full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 1e-4  # LoRA default; use ~1e-6..1e-5 for full fine-tuning
    value_lr: float = 1e-3  # the value head's learning rate
    ppo_epochs: int = 2  # passes over each rollout
    minibatch_size: int = 4  # episodes per gradient step
    clip_coef: float = 0.2  # ε of the clipped surrogate
    vf_coef: float = 0.1
    cliprange_value: float | None = 0.2  # None = unclipped value loss
    ent_coef: float = 0.0  # entropy bonus
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.05  # β (initial β when adaptive)
    adaptive_kl: bool = False
    kl_target: float = 6.0  # nats per sequence (adaptive controller)
    kl_horizon: int = 10_000
    whiten_advantages: bool = True
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None  # stop the epochs of an update early when approx_kl exceeds this
    ratio_tol: float = 1e-3  # |π/π_old − 1| allowed on the first minibatch after a rollout
    decode_tol: float = 0.05  # |rollout log-prob − training log-prob| beyond which rollouts are suspect
    max_kl: float = 20.0  # mean KL to the reference (nats/sequence) beyond which to roll back
    max_clipfrac: float = 0.6
    max_rollbacks: int = 3
    max_nonfinite: int = 3
    seed: int = 0
    save_every: int = 5  # iterations between checkpoints
    budget_seconds: float | None = None
    budget_clock: str = "wall"  # "wall" or "cpu" (budget.py)
    export: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.batch_prompts >= 1 and self.samples_per_prompt >= 1, "batch_prompts and samples_per_prompt must be >= 1"),
            (self.minibatch_size >= 1, "minibatch_size must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (PPO samples)"),
            (0 < self.clip_coef < 1, "clip_coef must be in (0, 1)"),
            (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma and gae_lambda must be in [0, 1]"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.lr > 0 and self.value_lr > 0, "learning rates must be > 0"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"PPO config: {msg}")


@dataclass
class PPOItem:
    """One training prompt and whatever the reward function needs to judge completions (e.g. the gold answer)."""

    prompt: Prompt
    meta: dict[str, Any] = field(default_factory=dict)


RewardFn = Callable[[Sequence[PPOItem], Sequence[str]], list[float]]


@dataclass
class PPOResult:
    out_dir: Path
    policy_dir: Path | None
    iterations: int
    rollbacks: int
    skipped: int
    stopped_by: str
    history: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------ model parts


class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state: a linear layer, zero-initialised."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(h.float()).squeeze(-1)  # (B, L, H) → (B, L)


@dataclass
class EpisodeBatch:
    """Prompts left-padded to P, responses right-padded to L: ids/attn (N, P+L), resp_mask (N, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    resp_mask: torch.Tensor
    prompt_width: int

    def select(self, idx: Sequence[int]) -> EpisodeBatch:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return EpisodeBatch(self.input_ids[i], self.attention_mask[i], self.resp_mask[i], self.prompt_width)


def build_episode_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int) -> EpisodeBatch:
    """``build_episode_batch([[1, 2], [3]], [[7], [8, 9]], 0)`` → ids ``[[1, 2, 7, 0], [0, 3, 8, 9]]``,
    resp_mask ``[[1, 0], [1, 1]]``."""
    N = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    L = max(len(r) for r in response_ids)
    ids = torch.full((N, P + L), pad_id, dtype=torch.long)  # (N, P+L)
    attn = torch.zeros((N, P + L), dtype=torch.long)  # (N, P+L)
    rmask = torch.zeros((N, L), dtype=torch.float32)  # (N, L)
    for n, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ids[n, P - len(p) : P] = torch.tensor(list(p))
        attn[n, P - len(p) : P] = 1
        ids[n, P : P + len(r)] = torch.tensor(list(r))
        attn[n, P : P + len(r)] = 1
        rmask[n, : len(r)] = 1
    return EpisodeBatch(ids, attn, rmask, P)


def forward_episodes(
    model: Any, value_head: ValueHead | None, b: EpisodeBatch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs (N, L) of the response tokens, values V(s_t) (N, L) and entropies (N, L).

    The response token at column P + t is predicted from column P + t − 1, which is also the state whose
    value V(s_t) the head reads. Position ids count real tokens only, as in decoding.
    """
    P = b.prompt_width
    L = b.resp_mask.shape[1]
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                position_ids=position_ids_from_mask(b.attention_mask), use_cache=False,
                output_hidden_states=value_head is not None, logits_to_keep=L + 1)
    logits = out.logits[:, :L, :].float()  # (N, L, V): positions P-1 … P+L-2 (the LM head skips the prompt)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, b.input_ids[:, P : P + L]) * b.resp_mask  # (N, L)
    values = None
    if value_head is not None:
        h = out.hidden_states[-1][:, P - 1 : P + L - 1, :]  # (N, L, H)
        values = value_head(h) * b.resp_mask  # (N, L)
    entropy = entropy_from_logits(logits) * b.resp_mask if with_entropy else None  # (N, L)
    return logprobs, values, entropy


def wrap_lora(model: Any, cfg: PPOConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                lora_dropout=0.0, target_modules="all-linear", bias="none"))


def policy_models(policy: Any, cfg: Any, *, rollout_precision: str | None = None) -> tuple[Any, Any, Any, Any]:
    """The models an on-policy run (PPO, GRPO) needs from ``policy``: ``(model, rollout_model, ref_model,
    rollout_policy)``.

    ``model`` is trained: the policy's own model, or it wrapped with LoRA adapters (``cfg.lora``). The
    rollouts decode on ``rollout_policy`` over ``rollout_model``: the trained model itself, or with LoRA a
    plain copy holding W + ΔW (``sync_merged_weights``) for the fast decode path. ``ref_model`` is a frozen
    copy of the start (None with LoRA: the model with its adapters disabled). ``rollout_precision``: the
    rollouts' decode precision (a reduced one reads its own quantised copy, rebuilt when the weights change).
    """
    from ragloop.models.local import LocalPolicy

    base = policy.model
    base.eval()
    if cfg.lora:
        rollout_model = copy.deepcopy(base)
        model = wrap_lora(base, cfg)
        ref_model = None
    else:
        model = base
        for p in model.parameters():
            p.requires_grad_(True)
        rollout_model = model
        ref_model = copy.deepcopy(base)
        for p in ref_model.parameters():
            p.requires_grad_(False)
    extra = {} if rollout_precision is None else {"precision": rollout_precision}
    rollout_policy = LocalPolicy.from_model(rollout_model, policy.tokenizer, name=policy.name,
                                            backend=getattr(policy, "backend", "auto"), **extra)
    return model, rollout_model, ref_model, rollout_policy


@torch.no_grad()
def sync_merged_weights(peft_model: Any, plain: Any) -> None:
    """Copy W + ΔW_LoRA of ``peft_model`` into the plain model ``plain`` (the rollout copy that the fast
    decode path reads); other weights are shared values and stay as they are."""
    from peft.tuners.lora import LoraLayer

    params = dict(plain.named_parameters())
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
            key = name.removeprefix("base_model.model.") + ".weight"
            base = module.get_base_layer().weight
            params[key].copy_(base + module.get_delta_weight("default"))


# ------------------------------------------------------------------------------------------ rewards


def make_reward_fn(
    *, reward_model: Any = None, check: Callable[[PPOItem, str], float] | None = None,
    rm_weight: float = 1.0, check_weight: float = 1.0, rm_prompt: Callable[[PPOItem], str] | None = None,
    rm_clip: float | None = None,
) -> RewardFn:
    """Score = rm_weight · clip(RM(prompt, completion), ±rm_clip) + check_weight · check(item, completion)."""
    if reward_model is None and check is None:
        raise ConfigError("PPO needs a reward: a reward model, a programmatic check, or both")

    def fn(items: Sequence[PPOItem], completions: Sequence[str]) -> list[float]:
        scores = [0.0] * len(items)
        if reward_model is not None:
            prompts = [rm_prompt(it) if rm_prompt else (it.prompt if isinstance(it.prompt, str) else
                       "\n".join(m["content"] for m in it.prompt)) for it in items]
            rm = reward_model.score_batch(prompts, list(completions))
            if rm_clip is not None:
                rm = [max(-rm_clip, min(rm_clip, r)) for r in rm]
            scores = [s + rm_weight * r for s, r in zip(scores, rm, strict=True)]
        if check is not None:
            scores = [s + check_weight * check(it, c) for s, it, c in zip(scores, items, completions, strict=True)]
        return scores

    return fn


# ---------------------------------------------------------------------------------------------- loop


def run_ppo(
    cfg: PPOConfig,
    policy: Any,
    items: Sequence[PPOItem],
    reward_fn: RewardFn,
    *,
    resume: bool = False,
    hooks: dict[str, Callable[..., Any]] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> PPOResult:
    """Optimise ``policy.model`` with PPO on ``items``; see the module docstring.

    ``hooks`` (tests): ``"scores"(iteration, scores) -> scores`` to inject faults. After the run
    ``policy.model`` is the trained plain model (LoRA merged).
    """
    if not items:
        raise DataError("no PPO prompts", hint="give a prompts file with one prompt per line")
    hooks = hooks or {}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = policy.tokenizer
    pad_id = int(getattr(policy, "pad_id", None) or tok.pad_token_id or tok.eos_token_id)
    base = policy.model
    model, rollout_model, ref_model, rollout_policy = policy_models(policy, cfg)
    value_head = ValueHead(base.config.hidden_size)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([{"params": list(trainable.values()), "lr": cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], eps=1e-5)
    kl_ctl: Any = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                   else FixedKLController(cfg.kl_coef))
    guard = NonFiniteGuard(cfg.max_nonfinite)
    health = PPOHealth(max_kl=cfg.max_kl, max_clipfrac=cfg.max_clipfrac, max_rollbacks=cfg.max_rollbacks)
    it, rollbacks = 0, 0

    def save(at: int) -> None:
        tp, jp = capture_rng()
        save_checkpoint(out, at, tensors={"policy": {n: p.detach() for n, p in trainable.items()},
                                          "value_head": value_head.state_dict()},
                        state={"config": asdict(cfg), "kl": kl_ctl.state_dict(), "guard": guard.state_dict(),
                               "rollbacks": rollbacks, "rng": jp},
                        torch_state={"optimizer": opt.state_dict(), "rng": tp}, keep=2)

    def restore(ck: Any) -> None:
        with torch.no_grad():
            for n, t in ck.tensors["policy"].items():
                trainable[n].copy_(t)
        value_head.load_state_dict(ck.tensors["value_head"])
        opt.load_state_dict(ck.torch_state["optimizer"])
        kl_ctl.load_state_dict(ck.state["kl"])

    if resume:
        if latest_checkpoint(out) is None:
            raise TrainingError(f"--resume: no checkpoint in {out}", hint="run without --resume to start")
        ck = load_checkpoint(out)
        restore(ck)
        guard.load_state_dict(ck.state["guard"])
        restore_rng(ck.torch_state["rng"], ck.state.get("rng", {}))
        it, rollbacks = ck.step, int(ck.state.get("rollbacks", 0))
    else:
        save(0)  # the starting point: the first rollback target
    logger = MetricsLogger(out, resume_step=it if resume else None)
    gcfg_base = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.samples_per_prompt,
                     stop=list(cfg.stop), logprobs=True)
    clock = make_clock(cfg.budget_clock)
    t_start, stopped = clock(), "done"
    while it < cfg.iterations:
        t0 = time.perf_counter()
        # ---- rollout ---------------------------------------------------------------------------------
        rng = random.Random(cfg.seed * 100_003 + it)
        batch_items = [items[rng.randrange(len(items))] for _ in range(cfg.batch_prompts)]
        model.eval()
        if cfg.lora:
            sync_merged_weights(model, rollout_model)
        gens = rollout_policy.generate_batch([x.prompt for x in batch_items],
                                             GenerationConfig(seed=cfg.seed * 7 + it, **gcfg_base))
        ep_items, p_ids, r_ids, texts, roll_lp = [], [], [], [], []
        for x, cands in zip(batch_items, gens, strict=True):
            pid = rollout_policy.encode(x.prompt)
            for g in cands:
                if not g.token_ids:
                    continue  # nothing was generated before a stop string: no action to learn from
                ep_items.append(x)
                p_ids.append(pid)
                r_ids.append(list(g.token_ids))
                texts.append(g.text)
                roll_lp.append(list(g.scaled_logprobs or g.logprobs or []))
        t_roll = time.perf_counter() - t0
        if not ep_items:
            log.warning("iteration %d: every completion was empty; skipping", it)
            it += 1
            continue
        scores_list = reward_fn(ep_items, texts)
        scores = torch.tensor(scores_list, dtype=torch.float32)  # (N,)
        if "scores" in hooks:
            scores = hooks["scores"](it, scores)
        if not guard.check(scores, what="reward"):
            it += 1
            continue
        batch = build_episode_batch(p_ids, r_ids, pad_id)
        mask = batch.resp_mask  # (N, L)
        with torch.no_grad():
            old_lp, old_v, _ = forward_episodes(model, value_head, batch, temperature=cfg.temperature)
            if cfg.lora:
                with model.disable_adapter():
                    ref_lp, _, _ = forward_episodes(model, None, batch, temperature=cfg.temperature)
            else:
                ref_lp, _, _ = forward_episodes(ref_model, None, batch, temperature=cfg.temperature)
        decode_dev = max((abs(a - float(old_lp[n, t])) for n, lps in enumerate(roll_lp) for t, a in enumerate(lps)),
                         default=0.0)
        if decode_dev > cfg.decode_tol:
            log.warning("rollout log-probs differ from the training forward by up to %.3g", decode_dev)
        rewards, kl = token_rewards(scores, old_lp, ref_lp, mask, kl_ctl.value)
        adv, returns = compute_gae(rewards, old_v, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages and mask.sum() > 1:
            adv = whiten(adv, mask)

        # ---- update ----------------------------------------------------------------------------------
        model.train()
        N = len(ep_items)
        stats: dict[str, list[float]] = {k: [] for k in ("pl", "vl", "ent", "approx_kl", "clipfrac", "vclip")}
        first_dev = None
        g = torch.Generator().manual_seed(cfg.seed * 31 + it)
        stop_epochs = False
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(N, generator=g).tolist()
            for s in range(0, N, cfg.minibatch_size):
                idx = perm[s : s + cfg.minibatch_size]
                mb = batch.select(idx)
                lp, v, ent = forward_episodes(model, value_head, mb, temperature=cfg.temperature, with_entropy=True)
                m = mb.resp_mask
                pls = policy_loss(lp, old_lp[idx], adv[idx], m, cfg.clip_coef)
                if first_dev is None:
                    first_dev = float(pls.ratio_max_dev)
                    check_first_ratio(first_dev, tol=cfg.ratio_tol)
                vl, vclip = value_loss(v, old_v[idx], returns[idx], m, cfg.cliprange_value)
                ent_mean = masked_mean(ent, m) if ent is not None else torch.zeros(())
                loss = pls.loss + cfg.vf_coef * vl - cfg.ent_coef * ent_mean
                opt.zero_grad(set_to_none=True)
                if not guard.check(loss, what="PPO loss"):
                    continue
                loss.backward()
                if cfg.max_grad_norm:
                    gn = torch.nn.utils.clip_grad_norm_([*trainable.values(), *value_head.parameters()], cfg.max_grad_norm)
                    if not guard.check(gn, what="gradient"):
                        opt.zero_grad(set_to_none=True)
                        continue
                opt.step()
                for k, val in (("pl", pls.loss), ("vl", vl), ("ent", ent_mean), ("approx_kl", pls.approx_kl),
                               ("clipfrac", pls.clipfrac), ("vclip", vclip)):
                    stats[k].append(float(val.detach()))
                if cfg.target_kl is not None and float(pls.approx_kl) > cfg.target_kl:
                    stop_epochs = True
                    break
            if stop_epochs:
                break
        model.eval()
        it += 1

        # ---- bookkeeping -----------------------------------------------------------------------------
        seq_kl = (kl * mask).sum(1)  # (N,)
        mean_kl = float(seq_kl.mean())
        kl_ctl.update(mean_kl, N)
        lengths = [len(r) for r in r_ids]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        row = {
            "env/reward_mean": float(scores.mean()), "env/reward_std": float(scores.std()) if N > 1 else 0.0,
            "objective/kl": mean_kl, "objective/kl_coef": kl_ctl.value,
            "objective/rlhf_reward": float((scores - kl_ctl.value * seq_kl).mean()),
            "ppo/policy_loss": mean(stats["pl"]), "ppo/value_loss": mean(stats["vl"]),
            "ppo/entropy": mean(stats["ent"]), "ppo/approx_kl": mean(stats["approx_kl"]),
            "ppo/clipfrac": mean(stats["clipfrac"]), "ppo/value_clipfrac": mean(stats["vclip"]),
            "ppo/explained_var": explained_variance(old_v, returns, mask),
            "ppo/ratio_first_dev": first_dev if first_dev is not None else float("nan"),
            "rollout/logprob_dev": decode_dev, "tokens/response_len_mean": mean(lengths),
            "health/reward_len_corr": pearson(scores_list, lengths),
            "health/repetition": mean([repetition_rate(r) for r in r_ids]),
            "health/skipped": guard.skipped, "health/rollbacks": rollbacks,
            "time/rollout_s": t_roll, "time/iteration_s": time.perf_counter() - t0,
            "tokens_per_s": (sum(lengths) + sum(len(p) for p in p_ids)) / max(1e-9, time.perf_counter() - t0),
        }
        finite = all(math.isfinite(row[k]) for k in ("objective/kl", "ppo/policy_loss")) if stats["pl"] else True
        verdict = health.verdict(kl=mean_kl, clipfrac=row["ppo/clipfrac"] if stats["clipfrac"] else 0.0, finite=finite)
        if verdict == "rollback":
            rollbacks += 1
            row["health/rollbacks"] = rollbacks
            logger.log(it, row)
            if rollbacks > health.max_rollbacks:
                raise TrainingError(f"PPO diverged: {rollbacks} rollbacks (KL {mean_kl:.2f}, clipfrac "
                                    f"{row['ppo/clipfrac']:.2f}); the last good checkpoint is in {out}",
                                    hint="lower lr or raise kl_coef")
            restore(load_checkpoint(out))
            continue
        logged = logger.log(it, row)
        if progress:
            progress(logged)
        over = cfg.budget_seconds is not None and clock() - t_start > cfg.budget_seconds
        if it % cfg.save_every == 0 or it == cfg.iterations or over:
            save(it)
        if over and it < cfg.iterations:
            stopped = "budget"
            break

    policy_dir = None
    plain = model.merge_and_unload() if cfg.lora else model
    plain.eval()
    policy.model = plain
    if cfg.export:
        manifest = run_manifest(asdict(cfg), seed=cfg.seed, data={"n_prompts": str(len(items))})
        manifest["result"] = {"iterations": it, "rollbacks": rollbacks, "skipped": guard.skipped}
        policy_dir = export_policy(plain, tok, out / "policy", name=cfg.name or f"{policy.name}-ppo", manifest=manifest)
    logger.close(curves=["env/reward_mean", "objective/kl", "ppo/approx_kl", "ppo/clipfrac", "ppo/explained_var",
                         "ppo/entropy", "ppo/value_loss", "tokens/response_len_mean", "tokens_per_s"], title="PPO")
    return PPOResult(out_dir=out, policy_dir=policy_dir, iterations=it, rollbacks=rollbacks, skipped=guard.skipped,
                     stopped_by=stopped, history=list(logger.rows))
