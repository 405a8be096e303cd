"""The RL math of PPO for language models, as small pure functions on tensors.

Every function works on per-token tensors of shape (B, T) — B sequences, T response tokens — with a
``mask`` (B, T) that is 1 on real response tokens and 0 on padding. Papers:

- PPO's clipped surrogate and the clipped value loss: Schulman et al. 2017, "Proximal Policy Optimization
  Algorithms" (eq. 7), with the value clipping of the OpenAI baselines implementation.
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  (eq. 11-16).
- The per-token KL penalty against a frozen reference and the adaptive KL coefficient: Ziegler et al. 2019,
  "Fine-Tuning Language Models from Human Preferences" (§2.2); Ouyang et al. 2022 (InstructGPT, eq. 2).
- The k3 KL estimator ``(r - 1) - log r``: Schulman 2020, "Approximating KL Divergence".

Worked example (one sequence, two tokens, γ = λ = 1)::

    >>> compute_gae(torch.tensor([[0., 1.]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2), 1.0, 1.0)
    (tensor([[0.5000, 0.5000]]), tensor([[1., 1.]]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------- masked stats


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions (advantage whitening);
    padding stays 0. ``whiten([[1., 3.]], [[1, 1]]) -> [[-0.7071, 0.7071]]``."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ------------------------------------------------------------------------------------------ advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (Schulman et al. 2016, eq. 16).

    rewards, values, mask: (B, T). The value after the last real token is 0 (the episode ends with the
    response). δ_t = r_t + γ V_{t+1} − V_t;  A_t = δ_t + γλ A_{t+1};  returns = A + V.
    """
    B, T = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)  # (B, T)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # (B,)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    returns = adv + values
    return adv, returns


# ------------------------------------------------------------------------------------------------ KL


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of the sampled tokens, log π − log π_ref (``k1``, the reward penalty of
    Ziegler et al. 2019), or ``k3`` = (r − 1) − log r with r = π_ref/π (non-negative, lower variance)."""
    logr = ref_logprobs - logprobs
    if kind == "k1":
        return -logr
    if kind == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {kind!r} (use 'k1' or 'k3')")


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −β·KL_t on every response token plus the sequence score on its last real token
    (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2). scores: (B,); the rest (B, T).
    Returns (rewards (B, T), kl (B, T))."""
    kl = kl_per_token(logprobs, ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    lengths = mask.sum(dim=1).long()  # (B,)
    last = (lengths - 1).clamp(min=0)  # (B,)
    has = lengths > 0
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows[has], last[has]] += scores[has]
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface as adaptive
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """β follows a target KL (Ziegler et al. 2019, §2.2): e = clip(KL/target − 1, ±0.2);
    β ← β · (1 + e · n_steps / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------- losses


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max_dev: torch.Tensor  # max |ratio − 1| over real tokens


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_coef: float,
    token_weights: torch.Tensor | None = None,
) -> PolicyLossStats:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    mean over tokens of max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) with r = π/π_old. ``token_weights`` (B, T), if
    given, multiplies each token's term (truncated importance weights, ``truncated_is_weights``)."""
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    per_token = torch.maximum(pg1, pg2)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean(torch.expm1(logratio) - logratio, mask)  # k3, Schulman 2020
        ratio_mean = masked_mean(ratio, mask)
        dev = ((ratio - 1.0).abs() * mask).max() if mask.any() else torch.zeros(())
    return PolicyLossStats(loss, clipfrac, approx_kl, ratio_mean, dev)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 · mean max((V − R)², (V_clip − R)²) with V_clip = V_old + clip(V − V_old, ±c);
    ``clip_range=None`` gives the plain squared error. Returns (loss, fraction of tokens clipped)."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, frac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis: logsumexp(z) − Σ p·z.  (B, T, V) → (B, T)."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) for each position: logits (B, T, V), tokens (B, T) → (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(target − pred)/Var(target) over masked positions (NaN when the target has no variance)."""
    var_y = masked_var(target, mask)
    if var_y.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(target - pred, mask) / var_y)


# ------------------------------------------------------------------------------------ group RL (GRPO/RLOO)


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages of K samples per question, from their rewards (G groups, K samples): (G, K) → (G, K).

    - ``grpo``: (r − mean_group) / (std_group + eps), std with the 1/(K−1) estimator as in the reference
      implementations (Shao et al. 2024, "DeepSeekMath", §4.1.2 outcome supervision).
    - ``rloo``: r_k − mean of the other K−1 rewards of its group, i.e. K/(K−1)·(r_k − mean_group)
      (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
      Feedback in LLMs", eq. 6; Kool et al. 2019).

    A group whose rewards are all equal gets advantage 0 everywhere (nothing to learn from it).
    ``group_advantages([[1., 0., 0., 1.]])`` → ``[[0.866, -0.866, -0.866, 0.866]]`` (grpo), ``[[0.667, -0.667,
    -0.667, 0.667]]`` (rloo).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, samples), got shape {tuple(rewards.shape)}")
    r = rewards.float()
    K = r.shape[1]
    mean = r.mean(dim=1, keepdim=True)  # (G, 1)
    if kind == "grpo":
        std = r.std(dim=1, keepdim=True, unbiased=True) if K > 1 else torch.zeros_like(mean)  # (G, 1)
        return (r - mean) / (std + eps)
    if kind == "rloo":
        if K < 2:
            raise ValueError("RLOO needs at least 2 samples per group (the baseline is the other samples' mean)")
        loo = (r.sum(dim=1, keepdim=True) - r) / (K - 1)  # (G, K): mean of the other K−1
        return r - loo
    raise ValueError(f"unknown group advantage {kind!r} (use 'grpo' or 'rloo')")


def zero_std_fraction(rewards: torch.Tensor, tol: float = 1e-8) -> float:
    """Share of groups (rows of a (G, K) reward tensor) whose rewards are all equal (no learning signal)."""
    if rewards.numel() == 0:
        return 0.0
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values  # (G,)
    return float((spread <= tol).float().mean())


def truncated_is_weights(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights min(π_train(y) / π_rollout(y), C) per token (B, T), 0 on padding.

    The rollout engine (a reduced-precision decode path, a grammar mask) samples from π_rollout while the
    gradient is taken under the training model's π_train; the clipped surrogate's ratio is π_θ/π_train(old)
    and this weight corrects for the tokens having come from π_rollout (Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training", truncated importance sampling, C = 2 there;
    Ionides 2008 for truncation). No gradient flows through it.
    ``truncated_is_weights([[log .5, log .2]], [[log .25, log .4]], [[1, 1]], 2.)`` → ``[[2.0, 0.5]]``.
    """
    with torch.no_grad():
        w = torch.exp(train_logprobs.float() - rollout_logprobs.float()).clamp(max=cap)  # (B, T)
    return w * mask
