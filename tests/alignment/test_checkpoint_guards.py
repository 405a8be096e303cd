"""Checkpoints (atomic, verified, refused when truncated/tampered/NaN) and the training guards."""

from __future__ import annotations

import math
import os

import pytest
import torch

from ragloop.alignment.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ragloop.alignment.guards import NonFiniteGuard, PPOHealth, check_first_ratio, pearson, repetition_rate
from ragloop.core.errors import TrainingError


def _opt_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    opt.step()
    return p, opt


def test_round_trip_with_optimizer(tmp_path):
    p, opt = _opt_state()
    path = save_checkpoint(tmp_path, 5, tensors={"model": {"w": p.detach()}}, state={"epoch": 1},
                           torch_state={"optimizer": opt.state_dict()})
    assert latest_checkpoint(tmp_path) == path
    ck = load_checkpoint(tmp_path)
    assert ck.step == 5 and ck.state["epoch"] == 1
    assert torch.equal(ck.tensors["model"]["w"], p.detach())
    p2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([p2], lr=0.1)
    opt2.load_state_dict(ck.torch_state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keeps_newest_and_latest_pointer(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tensors={"model": {"w": torch.full((2,), float(step))}}, state={}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-00000002", "step-00000003"]
    assert load_checkpoint(tmp_path).tensors["model"]["w"].tolist() == [3.0, 3.0]


def test_nan_never_saved_and_last_good_kept(tmp_path):
    save_checkpoint(tmp_path, 1, tensors={"model": {"w": torch.ones(2)}}, state={})
    with pytest.raises(TrainingError, match="non-finite"):
        save_checkpoint(tmp_path, 2, tensors={"model": {"w": torch.tensor([1.0, math.nan])}}, state={})
    with pytest.raises(TrainingError, match="non-finite"):
        save_checkpoint(tmp_path, 2, tensors={"model": {"w": torch.ones(2)}}, state={},
                        torch_state={"optimizer": {"state": {0: {"exp_avg": torch.tensor([math.inf])}}}})
    assert load_checkpoint(tmp_path).step == 1
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_truncated_and_tampered_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, tensors={"model": {"w": torch.arange(64.0)}}, state={"a": 1},
                           torch_state={"x": torch.ones(2)})
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-8])
    with pytest.raises(TrainingError, match="truncated"):
        load_checkpoint(tmp_path)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(TrainingError, match="sha256"):
        load_checkpoint(tmp_path)
    f.write_bytes(data)
    (path / "state.json").write_text('{"a": 9, "step": 1}\n' + " " * 100)
    with pytest.raises(TrainingError, match="truncated or altered"):
        load_checkpoint(tmp_path)


def test_refuses_outside_run_dir_and_unlisted_files(tmp_path):
    a = save_checkpoint(tmp_path / "a", 1, tensors={"model": {"w": torch.ones(1)}}, state={})
    with pytest.raises(TrainingError, match="only read from the run's own"):
        load_checkpoint(tmp_path / "b", a)
    (a / "evil.pt").write_bytes(b"x")
    with pytest.raises(TrainingError, match="unexpected files"):
        load_checkpoint(tmp_path / "a")
    with pytest.raises(TrainingError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_symlinked_checkpoint_refused(tmp_path):
    other = save_checkpoint(tmp_path / "other", 1, tensors={"model": {"w": torch.ones(1)}}, state={})
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.symlink(other, tmp_path / "run" / "checkpoints" / "step-00000001")
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text("step-00000001")
    with pytest.raises(TrainingError, match="only read from"):
        load_checkpoint(tmp_path / "run")


def test_rng_round_trip():
    import random

    gen = torch.Generator().manual_seed(3)
    tp, jp = capture_rng(gen)
    a = (torch.rand(2), torch.rand(2, generator=gen), random.random())
    restore_rng(tp, jp, gen)
    b = (torch.rand(2), torch.rand(2, generator=gen), random.random())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_nonfinite_guard_counts_and_aborts():
    g = NonFiniteGuard(max_consecutive=2)
    assert g.check(torch.tensor(1.0))
    assert not g.check(torch.tensor(float("nan")))
    assert g.check(1.0) and g.consecutive == 0 and g.skipped == 1
    assert not g.check(float("inf"))
    with pytest.raises(TrainingError, match="2 non-finite"):
        g.check(float("nan"))
    assert g.skipped == 3


def test_ratio_and_health_checks():
    check_first_ratio(0.0)
    with pytest.raises(TrainingError, match="deviates from 1"):
        check_first_ratio(0.05)
    with pytest.raises(TrainingError):
        check_first_ratio(float("nan"))
    h = PPOHealth(max_kl=1.0, max_clipfrac=0.3)
    assert h.verdict(kl=0.5, clipfrac=0.1) == "ok"
    assert h.verdict(kl=2.0, clipfrac=0.1) == "rollback"
    assert h.verdict(kl=0.5, clipfrac=0.4) == "rollback"
    assert h.verdict(kl=0.5, clipfrac=0.1, finite=False) == "rollback"


def test_repetition_and_pearson():
    assert repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(0.6)
    assert repetition_rate([1, 2, 3], n=4) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
