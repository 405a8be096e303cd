"""Supervised fine-tuning of the policy on chat rows: full, LoRA, or prompt tuning.

- Full fine-tuning updates every weight; LoRA (Hu et al. 2022) trains low-rank adapters on all linear layers
  through ``peft`` and merges them into the weights of the exported policy; prompt tuning (Lester et al. 2021)
  trains only a few soft-prompt embeddings (``peft`` PromptTuning) — the third option next to prompt
  engineering and fine-tuning. The loss is the mean next-token NLL over trainable assistant tokens only
  (``masking``), in the chat format the policy runs on. An encoder-decoder policy (``Seq2SeqPolicy``) trains the
  same way with the loss on the target only: the encoder reads the context, the decoder learns the assistant
  turn (``seq2seq_data``); full and LoRA (peft's SEQ_2_SEQ_LM task), not prompt tuning.
- Guards against forgetting: gradient-norm clipping, an optional L2 pull towards the initial weights
  (L2-SP, Li et al. 2018), an optional gradient-norm penalty (below), and a held-out *general* set whose
  per-token NLL is measured before and after (catastrophic forgetting, McCloskey & Cohen 1989; measured as
  in Luo et al. 2023).
- Gradient-norm penalty (``grad_norm_penalty`` = λ): each micro-batch minimises ``L + λ/k · ‖∇_θ L̄_mb‖²``,
  where ``L̄_mb`` is that micro-batch's mean token NLL and ``k`` the micro-batches per step (so with
  ``grad_accum = 1`` it is exactly ``L + λ‖∇_θ L‖²``). This is the explicit gradient regulariser of Barrett &
  Dherin 2021 ("Implicit Gradient Regularization", eq. 2: ``L + (h/4)‖∇L‖²``, λ in place of ``h/4``) and of
  Smith et al. 2021 (the mean of mini-batch gradient norms that SGD penalises implicitly), computed by
  double backpropagation (Drucker & LeCun 1992 penalised the input gradient the same way): the gradient is
  taken with ``create_graph=True`` so its squared norm can be differentiated again. It discourages steps
  into sharp regions where a small update changes the loss a lot — a regulariser against large updates;
  its effect on forgetting is measured by ``benchmarks/bench_grad_penalty.py``. Costs about 2-3× a plain
  step; attention runs through PyTorch's math SDPA kernel during those steps (the fused CPU kernels have
  no second derivative). Only the NLL's gradient is penalised (not the L2-SP term's).
- Multi-task mixing: rows are grouped by ``source`` and drawn with the given weights (``mix_rows``).
- Robustness (SECURITY.md §5): a non-finite loss or gradient skips the step and is counted, K in a row
  abort with the last good checkpoint intact; checkpoints (trainable weights + optimizer + RNG) are exact:
  a resumed run sees the same next batch and, on CPU, the same loss curve as an uninterrupted run.
- Scale-out: launched with ``accelerate launch --num_processes N`` the same loop runs data-parallel (DDP,
  gloo on CPU); each rank takes its slice of every global batch.

Entry point: ``run_sft(cfg, policy, rows)``. The exported policy (``<out>/policy``) is a plain HF directory
that ``load_policy`` accepts, with a ``ragloop.json`` run manifest.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from ragloop.alignment.data import DropReport, SFTRow, row_hash
from ragloop.alignment.guards import NonFiniteGuard, grads_finite
from ragloop.alignment.logging import MetricsLogger
from ragloop.alignment.masking import IGNORE_INDEX, TokenizedExample, pad_batch, tokenize_rows
from ragloop.alignment.seq2seq_data import (
    Seq2SeqExample,
    is_encoder_decoder,
    pad_seq2seq_batch,
    seq2seq_nll_sum,
    tokenize_seq2seq_rows,
)
from ragloop.core.errors import ConfigError, DataError, TrainingError

log = logging.getLogger(__name__)

Method = Literal["full", "lora", "prompt"]


@dataclass
class SFTConfig:
    """Supervised fine-tuning settings (every field is validated in ``__post_init__``)."""

    out_dir: str  # run directory: checkpoints/, metrics, curves, policy/
    method: Method = "lora"  # "full" | "lora" | "prompt" (soft-prompt tuning)
    lr: float | None = None  # default: 2e-4 LoRA, 2e-5 full, 3e-2 prompt tuning
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; None = epochs × batches
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 512  # tokens; longer rows lose whole context exemplars, then are dropped and counted; never the answer
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    num_virtual_tokens: int = 16  # prompt tuning
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "cosine"
    max_grad_norm: float | None = 1.0  # gradient-norm clipping (None = off)
    l2_init_coef: float = 0.0  # λ·Σ‖θ − θ₀‖² over trainable weights (L2-SP); 0 = off
    grad_norm_penalty: float = 0.0  # λ·‖∇θ NLL‖² by double backprop (Barrett & Dherin 2021); 0 = off
    bf16: bool = False  # bfloat16 autocast (CPU and GPU)
    seed: int = 0
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    max_nonfinite: int = 3  # consecutive non-finite steps before aborting
    log_every: int = 1
    budget_seconds: float | None = None  # stop (after a checkpoint) when training time passes this
    budget_clock: str = "wall"  # "wall" or "cpu" (machine-seconds, see budget.py)
    mix: dict[str, float] | None = None  # weights per row source for multi-task mixing
    mix_total: int | None = None  # rows drawn when mixing (default: as many as given)
    eval_batch_size: int = 8
    export: bool = True  # write <out>/policy (merged) at the end
    name: str = ""  # name recorded in the exported policy (default: "<policy>-sft")

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora", "prompt"):
            raise ConfigError(f"method must be 'full', 'lora' or 'prompt', got {self.method!r}")
        if self.lr is None:
            self.lr = {"full": 2e-5, "lora": 2e-4, "prompt": 3e-2}[self.method]
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8 tokens"),
            (self.lora_r >= 1 and self.lora_alpha > 0, "lora_r must be >= 1 and lora_alpha > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.num_virtual_tokens >= 1, "num_virtual_tokens must be >= 1"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (self.l2_init_coef >= 0, "l2_init_coef must be >= 0"),
            (self.grad_norm_penalty >= 0 and math.isfinite(self.grad_norm_penalty), "grad_norm_penalty must be >= 0"),
            (self.save_every >= 1 and self.keep_checkpoints >= 1, "save_every and keep_checkpoints must be >= 1"),
            (self.max_nonfinite >= 1, "max_nonfinite must be >= 1"),
            (self.budget_seconds is None or self.budget_seconds > 0, "budget_seconds must be > 0"),
            (self.schedule in ("constant", "cosine"), "schedule must be 'constant' or 'cosine'"),
            (self.budget_clock in ("wall", "cpu"), "budget_clock must be 'wall' or 'cpu'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"SFT config: {msg}")

    # fields that must match when resuming (the rest — budget, save cadence — may change)
    RESUME_KEYS = ("method", "lr", "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha",
                   "lora_targets", "num_virtual_tokens", "seed", "schedule", "warmup_steps", "l2_init_coef",
                   "grad_norm_penalty")


@dataclass
class SFTResult:
    out_dir: Path
    policy_dir: Path | None
    steps: int
    final_loss: float | None
    skipped_steps: int
    data_report: dict[str, Any]
    general_nll_before: float | None = None
    general_nll_after: float | None = None
    stopped_by: str = "done"  # "done" | "max_steps" | "budget"
    tokens_per_second: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1  # data-parallel processes (accelerate launch)

    @property
    def forgetting(self) -> float | None:
        """Increase of the general-set NLL per token (positive = forgot something)."""
        if self.general_nll_before is None or self.general_nll_after is None:
            return None
        return self.general_nll_after - self.general_nll_before


# ------------------------------------------------------------------------------------ pure helpers


def mix_rows(groups: dict[str, Sequence[Any]], weights: dict[str, float], total: int, seed: int) -> list[Any]:
    """Draw ``total`` rows, each from group g with probability ∝ weights[g] (rows within a group cycle in a
    seeded shuffled order, so small groups repeat and large groups are subsampled)."""
    names = [g for g in weights if weights[g] > 0 and groups.get(g)]
    if not names:
        raise DataError("no data for any task with a positive mixing weight")
    rng = random.Random(seed)
    w = [weights[g] for g in names]
    order = {g: rng.sample(range(len(groups[g])), len(groups[g])) for g in names}
    pos = dict.fromkeys(names, 0)
    out = []
    for _ in range(total):
        g = rng.choices(names, weights=w)[0]
        out.append(groups[g][order[g][pos[g] % len(groups[g])]])
        pos[g] += 1
    return out


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: Any, *,
                           chunk_batches: int) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), in a random order: a random permutation is
    cut into chunks of ``chunk_batches`` batches, each chunk sorted by length and cut into batches, and the
    batches are shuffled — all drawn from ``generator`` (a ``torch.Generator``). Shared by SFT and the reward model."""
    import torch

    perm = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for s in range(0, len(perm), chunk):
        block = sorted(perm[s : s + chunk], key=lambda i: lengths[i])
        batches += [block[j : j + batch_size] for j in range(0, len(block), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def epoch_batches(lengths: Sequence[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Batches of example indices for one epoch, grouped by length (less padding) and shuffled, all from
    ``seed`` and ``epoch`` only — so the batch at any step can be recomputed on resume."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return length_grouped_batches(lengths, batch_size, g, chunk_batches=32)


def lr_at(step: int, *, base: float, warmup: int, horizon: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of ``base`` at ``horizon``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or horizon <= warmup:
        return base
    frac = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def token_nll_sum(model: Any, batch: dict[str, Any], *, bf16: bool = False) -> tuple[Any, int]:
    """Summed next-token NLL over labelled tokens, and their count. batch: input_ids/labels/attention_mask (B, T).
    For an encoder-decoder the batch is ``seq2seq_data.pad_seq2seq_batch``'s and the loss is on the targets."""
    import torch
    import torch.nn.functional as F

    if is_encoder_decoder(model):
        return seq2seq_nll_sum(model, batch, bf16=bf16)

    labels = batch["labels"]  # (B, T)
    T = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    first = max(1, int(labelled[0])) if len(labelled) else 1
    prompt_tuning = hasattr(model, "peft_config") and getattr(model, "active_peft_config", None) is not None \
        and getattr(model.active_peft_config, "is_prompt_learning", False)
    keep = 0 if prompt_tuning else T - first + 1  # the LM head runs only where a label can follow
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep).logits  # (B, T' or keep, V)
    if prompt_tuning:
        logits = logits[:, logits.shape[1] - T:, :]  # drop the virtual tokens' positions
        first = 1
    # logits now cover positions first-1 … T-1; position i predicts label i+1
    shift_logits = logits[:, -(T - first + 1):-1, :].float()  # (B, T-first, V)
    shift_labels = labels[:, first:]  # (B, T-first)
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def collate(examples: Sequence[TokenizedExample | Seq2SeqExample], pad_id: int) -> dict[str, Any]:
    """One padded batch: ``pad_batch`` for decoder-only examples, ``pad_seq2seq_batch`` for encoder-decoder ones."""
    if examples and isinstance(examples[0], Seq2SeqExample):
        return pad_seq2seq_batch(examples, pad_id)  # type: ignore[arg-type]
    return pad_batch(examples, pad_id)  # type: ignore[arg-type]


def loss_tokens(example: TokenizedExample | Seq2SeqExample) -> int:
    """Tokens an example puts in the loss: every target token of an encoder-decoder example; a decoder-only
    example's labelled tokens after the first position (position 0 has nothing before it to predict it)."""
    if isinstance(example, Seq2SeqExample):
        return example.n_trainable
    return sum(1 for x in example.labels[1:] if x != IGNORE_INDEX)


def mean_nll(model: Any, examples: Sequence[TokenizedExample | Seq2SeqExample], pad_id: int, *, batch_size: int = 8, bf16: bool = False) -> float:
    """Per-token NLL of ``examples`` under ``model`` (no gradients)."""
    import torch

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            loss, n = token_nll_sum(model, collate(examples[s : s + batch_size], pad_id), bf16=bf16)
            total += float(loss)
            count += n
    model.train(was)
    return total / max(1, count)


def grad_norm_penalty(loss: Any, params: Sequence[Any], coef: float) -> Any:
    """``coef · ‖∇_params loss‖²`` as a differentiable scalar (double backprop, Barrett & Dherin 2021 eq. 2).

    The gradient is built with ``create_graph=True``, so backpropagating the result adds
    ``2·coef·H·∇loss`` (a Hessian-vector product) to each parameter's gradient. Parameters that ``loss``
    does not depend on contribute 0. For ``loss = Σ θ²`` at ``θ = [1, 2]`` the gradient is ``[2, 4]`` and
    ``grad_norm_penalty(loss, [θ], 0.5) -> 0.5 · (4 + 16) = 10.0``.
    """
    import torch

    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    sq = [g.float().pow(2).sum() for g in grads if g is not None]
    if not sq:
        return loss.new_zeros(())
    return coef * torch.stack(sq).sum()


@contextmanager
def _double_backprop_attention(on: bool) -> Iterator[None]:
    """Route scaled-dot-product attention through the math kernel, whose ops have second derivatives
    (the fused flash/memory-efficient kernels do not); a no-op when ``on`` is False."""
    if not on:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# --------------------------------------------------------------------------------------- model setup


def wrap_for_training(model: Any, cfg: SFTConfig) -> Any:
    """The model with what ``cfg.method`` trains made trainable (peft wrappers for LoRA / prompt tuning)."""
    import torch

    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder(model) else TaskType.CAUSAL_LM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # adapter initialisation depends only on the seed
        if cfg.method == "lora":
            pcfg = LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets, bias="none")
        else:
            pcfg = PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
        return get_peft_model(model, pcfg)


def trainable_named(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _distributed() -> Any | None:
    """An ``accelerate.Accelerator`` when launched with several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not _cuda())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- loop


def run_sft(
    cfg: SFTConfig,
    policy: Any,
    rows: Sequence[SFTRow],
    *,
    general_rows: Sequence[SFTRow] | None = None,
    resume: bool = False,
    loss_hook: Callable[[int, Any], Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> SFTResult:
    """Fine-tune ``policy.model`` on ``rows``; see the module docstring.

    ``policy``: a LocalPolicy (``.model``, ``.tokenizer``, ``.render``, ``.name``). After the run,
    ``policy.model`` holds the trained weights (LoRA merged). ``loss_hook(step, loss) -> loss`` lets tests
    inject faults; ``progress(row)`` receives every logged metrics row.
    """
    import torch

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise DataError("no SFT rows to train on", hint="check the trace filter or the data file")
    if cfg.mix:
        groups: dict[str, list[SFTRow]] = defaultdict(list)
        for r in rows:
            groups[r.source.split(":")[0] or "default"].append(r)
        rows = mix_rows(groups, cfg.mix, cfg.mix_total or len(rows), cfg.seed)
    tok = policy.tokenizer
    pad_id = int(getattr(policy, "pad_id", None) or tok.pad_token_id or tok.eos_token_id)
    seq2seq = is_encoder_decoder(policy.model)
    if seq2seq and cfg.method == "prompt":
        raise ConfigError("prompt tuning is not offered for encoder-decoder policies", hint="use --lora or --full")
    examples: Sequence[TokenizedExample | Seq2SeqExample]
    if seq2seq:  # the encoder reads the context; the loss is on each assistant turn (the target) only
        examples, report = tokenize_seq2seq_rows(rows, policy, max_length=cfg.max_length)
    else:
        examples, report = tokenize_rows(rows, policy.render, tok, max_length=cfg.max_length)
    if not examples:
        raise DataError(f"no SFT row survived tokenisation ({report.summary()})",
                        hint=f"raise max_length (now {cfg.max_length}) or check the rows")
    if report.n_dropped or report.fitted:
        log.warning("SFT data: %s", report.summary())
    data_hash = row_hash([e.input_ids for e in examples] + [e.labels for e in examples])
    general: Sequence[TokenizedExample | Seq2SeqExample] = []
    if general_rows:
        general = (tokenize_seq2seq_rows(general_rows, policy, max_length=cfg.max_length)[0] if seq2seq
                   else tokenize_rows(general_rows, policy.render, tok, max_length=cfg.max_length)[0])

    accel = _distributed()
    rank, world = (accel.process_index, accel.num_processes) if accel else (0, 1)
    if accel and cfg.grad_norm_penalty > 0:
        raise ConfigError("the gradient-norm penalty is not supported data-parallel (DDP does not reduce a "
                          "double backward)", hint="run it in one process, or set grad_norm_penalty to 0")
    if accel:
        log.info("SFT data-parallel over %d processes (rank %d)", world, rank)
    base_model = policy.model
    nll_before = mean_nll(base_model, general, pad_id, batch_size=cfg.eval_batch_size, bf16=cfg.bf16) if general else None

    model = wrap_for_training(base_model, cfg)
    model.train()
    params = trainable_named(model)
    init = {n: p.detach().clone() for n, p in params.items()} if cfg.l2_init_coef > 0 else {}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if accel:
        model, opt = accel.prepare(model, opt)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    lengths = [len(e.input_ids) for e in examples]
    global_bs = cfg.batch_size * world
    per_epoch = math.ceil(len(examples) / global_bs)
    planned = cfg.max_steps or math.ceil(per_epoch * cfg.epochs / cfg.grad_accum)
    step, horizon = 0, planned
    config_dict = asdict(cfg)

    if resume:
        ck = load_checkpoint(out) if latest_checkpoint(out) else None
        if ck is None:
            raise TrainingError(f"--resume: no checkpoint in {out}", hint="run without --resume to start")
        saved = ck.state.get("config", {})
        diff = [k for k in SFTConfig.RESUME_KEYS if k in saved and saved[k] != config_dict[k]]
        if diff:
            raise ConfigError(f"--resume: settings differ from the checkpoint's: {', '.join(diff)}")
        if ck.state.get("data_hash") != data_hash:
            raise DataError("--resume: the training data differ from the checkpoint's", hint="resume with the same data")
        with torch.no_grad():
            for n, t in ck.tensors["trainable"].items():
                params[n].copy_(t)
        opt.load_state_dict(ck.torch_state["optimizer"])
        restore_rng(ck.torch_state["rng"], ck.state.get("rng", {}))
        guard.load_state_dict(ck.state["guard"])
        step, horizon = ck.step, int(ck.state.get("horizon", planned))
        log.info("resumed from %s at step %d", ck.path, step)
    else:
        torch.manual_seed(cfg.seed)
    logger = MetricsLogger(out, resume_step=step if resume else None) if rank == 0 else None

    def checkpoint(at: int) -> None:
        if rank != 0:
            return
        tp, jp = capture_rng()
        save_checkpoint(out, at, tensors={"trainable": {n: p.detach() for n, p in params.items()}},
                        state={"config": config_dict, "data_hash": data_hash, "guard": guard.state_dict(),
                               "horizon": horizon, "rng": jp},
                        torch_state={"optimizer": opt.state_dict(), "rng": tp}, keep=cfg.keep_checkpoints)

    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batches(s: int) -> list[list[int]]:
        out_b = []
        for k in range(s * cfg.grad_accum, (s + 1) * cfg.grad_accum):
            epoch, j = divmod(k, per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(lengths, global_bs, epoch, cfg.seed)
            gb = epoch_cache[epoch][j]
            out_b.append(gb[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] or gb[: cfg.batch_size])
        return out_b

    clock = make_clock(cfg.budget_clock)
    t_start, tokens_seen, last_loss, stopped = time.perf_counter(), 0, None, "done"
    b_start = clock()
    history: list[dict[str, Any]] = []
    while step < planned:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, horizon=horizon, schedule=cfg.schedule)
        opt.zero_grad(set_to_none=True)
        mbs = micro_batches(step)
        n_tok = sum(loss_tokens(examples[i]) for mb in mbs for i in mb)
        step_loss, step_penalty, ok = 0.0, 0.0, True
        for mb in mbs:
            batch = collate([examples[i] for i in mb], pad_id)
            tokens_seen += int(batch["attention_mask"].sum())
            with _double_backprop_attention(cfg.grad_norm_penalty > 0):
                loss_sum, n_mb = token_nll_sum(model, batch, bf16=cfg.bf16)
            loss = loss_sum / max(1, n_tok)
            if cfg.grad_norm_penalty > 0:
                penalty = grad_norm_penalty(loss_sum / max(1, n_mb), list(params.values()),
                                            cfg.grad_norm_penalty / len(mbs))
                loss = loss + penalty
                step_penalty += float(penalty.detach())
            if cfg.l2_init_coef > 0:
                loss = loss + cfg.l2_init_coef * sum(((params[n] - init[n]) ** 2).sum() for n in params) / len(mbs)
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            if not guard.check(loss, what="loss"):
                ok = False
                break
            with _double_backprop_attention(cfg.grad_norm_penalty > 0):
                (accel.backward(loss) if accel else loss.backward())
            step_loss += float(loss.detach())
        grad_norm = float("nan")
        if ok:
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
            if not grads_finite(params.values()) or not math.isfinite(grad_norm if cfg.max_grad_norm else 0.0):
                ok = guard.check(float("nan"), what="gradient")
            if ok:
                opt.step()
                last_loss = step_loss
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start
        spent = clock() - b_start
        if cfg.budget_seconds and step == 3 and not resume:
            horizon = max(step, min(planned, int(cfg.budget_seconds / max(1e-6, spent / step))))
        row = {"loss": step_loss if ok else float("nan"), "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"],
               "tokens_per_s": tokens_seen / max(1e-9, elapsed), "step_seconds": dt, "skipped": guard.skipped}
        if cfg.grad_norm_penalty > 0:
            row["grad_penalty"] = step_penalty if ok else float("nan")  # included in "loss"
        if logger and (step % cfg.log_every == 0 or step == planned):
            history.append(logger.log(step, row))
            if progress:
                progress(history[-1])
        budget_hit = cfg.budget_seconds is not None and spent >= cfg.budget_seconds
        if step % cfg.save_every == 0 or step == planned or budget_hit:
            checkpoint(step)
        if budget_hit and step < planned:
            stopped = "budget"
            break
    if accel:
        accel.wait_for_everyone()
        model = accel.unwrap_model(model)
    elapsed = time.perf_counter() - t_start

    model.eval()
    result = SFTResult(out_dir=out, policy_dir=None, steps=step, final_loss=last_loss, skipped_steps=guard.skipped,
                       data_report=report.to_dict(), general_nll_before=nll_before, stopped_by=stopped,
                       tokens_per_second=tokens_seen / max(1e-9, elapsed),
                       history=list(logger.rows) if logger else history, world_size=world)
    trained = _finish_model(model, cfg)
    policy.model = trained
    if general:
        result.general_nll_after = mean_nll(trained, general, pad_id, batch_size=cfg.eval_batch_size, bf16=cfg.bf16)
    if rank == 0:
        manifest = run_manifest(config_dict, seed=cfg.seed, data={"sft_examples": data_hash})
        manifest["result"] = {"steps": step, "final_loss": last_loss, "skipped": guard.skipped, "world_size": world,
                              "forgetting_nll": result.forgetting, "data": report.to_dict()}
        if cfg.export and cfg.method != "prompt":
            result.policy_dir = export_policy(trained, tok, out / "policy", name=cfg.name or f"{policy.name}-sft",
                                              manifest=manifest)
        elif cfg.export:
            model.save_pretrained(str(out / "prompt_adapter"))  # soft prompts cannot be merged into weights
        if logger:
            logger.close(curves=["loss", "grad_norm", "lr", "tokens_per_s"], title=f"SFT ({cfg.method})")
    return result


def _finish_model(model: Any, cfg: SFTConfig) -> Any:
    """The plain transformers model after training: LoRA merged into the weights; for prompt tuning the
    base model (the soft prompt lives in the adapter directory)."""
    if cfg.method == "lora":
        return model.merge_and_unload()
    if cfg.method == "prompt":
        return model.get_base_model()
    return model


def _tokenised_note(rep: dict[str, Any]) -> str:
    """What tokenisation did to the rows, when it did anything (fitted to --max-length, or dropped)."""
    fitted, dropped = rep.get("fitted", 0), sum((rep.get("dropped") or {}).values())
    parts = ([f"{fitted} rows fitted to max_length by dropping context exemplars"] if fitted else []) + (
        [f"{dropped} rows dropped at tokenisation ({', '.join(f'{k}: {v}' for k, v in rep['dropped'].items())})"]
        if dropped else [])
    return (", " + ", ".join(parts)) if parts else ""


def sft_report_line(res: SFTResult) -> str:
    f = res.forgetting
    return (f"SFT: {res.steps} steps, final loss {res.final_loss if res.final_loss is None else round(res.final_loss, 4)}, "
            f"{res.skipped_steps} skipped, {res.tokens_per_second:.0f} tok/s"
            + (f", forgetting ΔNLL {f:+.4f}" if f is not None else "")
            + (f", data-parallel ×{res.world_size}" if res.world_size > 1 else "")
            + _tokenised_note(res.data_report)
            + (f" — policy: {res.policy_dir}" if res.policy_dir else ""))


__all__ = ["SFTConfig", "SFTResult", "run_sft", "mix_rows", "epoch_batches", "lr_at", "mean_nll", "DropReport",
           "wrap_for_training", "sft_report_line", "grad_norm_penalty"]
