"""Explicit seeding: every run records its seed, and RNGs are passed in, never global."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (for training scripts that rely on them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is always installed by the Makefile
        pass


def make_generator(seed: int | None):
    """A torch.Generator seeded with ``seed`` (a fresh random seed when None) — pass it to samplers."""
    import torch

    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
