"""The gradient-norm penalty of SFT (double backprop): the formula on literal tensors, then a few steps on the
tiny random Llama (it runs, is logged, changes the update, validates its coefficient)."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.data import SFTRow
from ragloop.alignment.sft import SFTConfig, grad_norm_penalty, run_sft
from ragloop.core.errors import ConfigError
from ragloop.models.local import LocalPolicy

ROWS = [
    SFTRow(messages=[{"role": "user", "content": f"What is {a}+{b}?"},
                     {"role": "assistant", "content": f"It is {a + b}."}])
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
]


def test_penalty_value_and_its_gradient_on_a_quadratic():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = (theta**2).sum()  # ∇ = 2θ = [2, 4]
    pen = grad_norm_penalty(loss, [theta], 0.5)
    assert float(pen.detach()) == pytest.approx(10.0)  # 0.5 · (4 + 16)
    pen.backward()
    # d/dθ 0.5·‖2θ‖² = 4θ (double backprop: the Hessian 2I times 2·0.5·∇)
    assert theta.grad.tolist() == pytest.approx([4.0, 8.0])


def test_penalty_matches_a_hessian_vector_product_on_a_non_quadratic():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(5, 3)

    def f(v):
        return torch.log1p(torch.exp(x @ v)).sum()  # softplus: a non-constant Hessian

    pen = grad_norm_penalty(f(w), [w], 1.0)
    (g_pen,) = torch.autograd.grad(pen, [w])
    g = torch.autograd.functional.jacobian(f, w)
    h = torch.autograd.functional.hessian(f, w)
    assert float(pen.detach()) == pytest.approx(float(g @ g), rel=1e-5)
    assert g_pen.tolist() == pytest.approx((2 * h @ g).tolist(), rel=1e-4)


def test_unused_parameters_contribute_nothing():
    a = torch.tensor([3.0], requires_grad=True)
    unused = torch.tensor([5.0], requires_grad=True)
    assert float(grad_norm_penalty((a * 2).sum(), [a, unused], 1.0)) == pytest.approx(4.0)


def _run(tmp_path, smol_tokenizer, tiny_model_factory, coef, method="full"):
    p = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")
    cfg = SFTConfig(out_dir=str(tmp_path / f"run-{coef}-{method}"), method=method, lr=1e-2, batch_size=2,
                    max_steps=2, max_length=128, lora_r=4, lora_alpha=8, seed=1, export=False,
                    grad_norm_penalty=coef)
    return p, run_sft(cfg, p, ROWS)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_with_penalty_runs_logs_and_changes_the_update(tmp_path, smol_tokenizer, tiny_model_factory, method):
    p0, r0 = _run(tmp_path, smol_tokenizer, tiny_model_factory, 0.0, method)
    p1, r1 = _run(tmp_path, smol_tokenizer, tiny_model_factory, 0.5, method)
    assert r1.steps == 2 and r1.skipped_steps == 0 and math.isfinite(r1.final_loss)
    assert all(row["grad_penalty"] > 0 for row in r1.history)
    assert all("grad_penalty" not in row for row in r0.history)
    # the first step's loss includes the penalty on top of the same NLL
    assert r1.history[0]["loss"] == pytest.approx(r0.history[0]["loss"] + r1.history[0]["grad_penalty"], rel=1e-4)
    w0 = p0.model.model.layers[0].mlp.up_proj.weight
    w1 = p1.model.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w0, w1), "the penalty did not change the update"


def test_penalty_coefficient_is_validated():
    with pytest.raises(ConfigError, match="grad_norm_penalty"):
        SFTConfig(out_dir="x", grad_norm_penalty=-0.1)
    with pytest.raises(ConfigError, match="grad_norm_penalty"):
        SFTConfig(out_dir="x", grad_norm_penalty=float("nan"))
