"""Alignment: the agents' own traces make the same local model a better agent.

Python API (mirrors the CLI; submodules load on first use):

- ``run_sft(SFTConfig(...), policy, rows)`` — full / LoRA / prompt-tuning SFT (``ragloop train sft``)
- ``train_reward_model(RewardConfig(...), pairs)`` / ``load_reward_model(dir)`` — ``ragloop train reward``
- ``run_ppo(PPOConfig(...), policy, items, reward_fn)`` — ``ragloop train ppo``
- ``run_grpo(GRPOConfig(...), policy, items, make_agent, reward_fn)`` — GRPO/RLOO over agent episodes,
  ``ragloop train grpo``
- ``revise_traces(policy, traces, principles)`` / ``label_traces(judge, traces)`` — ``ragloop cai revise``,
  ``ragloop rlaif label``
- ``run_improve(ImproveConfig(...))`` — ``ragloop improve``
- data: ``traces_to_sft_rows``, ``ranking_to_pairs``, ``outcome_pairs``, ``hh_transcript_to_pair``,
  ``gsm8k_answer_to_program``; RL math in ``rl``; checkpoints in ``checkpoint``; guards in ``guards``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SFTConfig": "sft", "SFTResult": "sft", "run_sft": "sft",
    "RewardConfig": "reward", "RewardModel": "reward", "train_reward_model": "reward",
    "load_reward_model": "reward",
    "PPOConfig": "ppo", "PPOItem": "ppo", "run_ppo": "ppo", "make_reward_fn": "ppo",
    "GRPOConfig": "grpo", "GRPOItem": "grpo", "run_grpo": "grpo", "make_episode_reward": "grpo",
    "load_constitution": "cai", "revise_traces": "cai", "label_traces": "cai",
    "ImproveConfig": "improve", "run_improve": "improve",
    "run_agent_batched": "collect",
    "SFTRow": "data", "PreferencePair": "data", "traces_to_sft_rows": "data", "ranking_to_pairs": "data",
    "outcome_pairs": "data", "hh_transcript_to_pair": "data", "gsm8k_answer_to_program": "data",
    "filter_traces": "data",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ragloop.alignment' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ragloop.alignment.{mod}"), name)


__all__ = list(_LAZY)
