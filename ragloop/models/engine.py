"""The decode engine: every generation request of a policy, from any thread, decoded together in one batch.

A ``DecodeEngine`` owns the decode of one policy. Callers (``LocalPolicy.generate``/``generate_batch``/
``stream``, the agent runtime, the server) ``submit`` requests — token-id prompts with their own
``GenerationConfig`` — and get a ``Ticket`` back; ``ticket.results()`` or iterating the ticket drives the
engine until that request is done. Requests submitted from several threads, or many at once from one
thread, share one batched forward pass per token (*continuous batching*, Yu et al. 2022, "Orca"): when
rows finish, their slots are released and waiting requests join the running batch at the next token,
without waiting for the longest row. Rows in one batch may have different prompts, stop strings, token
limits, sampling settings and grammars.

Threading without a background thread: whichever waiting caller finds the engine idle becomes its driver
for one decode step, then lets the next one take over; a request decoded from one thread alone therefore
runs on that thread (Ctrl-C reaches it; streaming is a plain generator). Every step is taken under one lock,
so a policy is safe to call from many threads, and greedy results equal sequential ones.

What the engine asks of a stepper (``ragloop.models.decoding.Stepper``): ``prefill`` and ``step``; and, to
let requests join a running batch, ``regroup(keep, input_ids, attention_mask)`` (``FastStepper`` has it).
Without ``regroup`` (the transformers reference stepper) waiting requests start when the batch ends.

Per row, seeds and texts follow ``ragloop.models.decoding``'s conventions: candidate ``j`` of prompt ``i``
samples from its own generator seeded by ``(seed, i, j)``, so its tokens do not depend on which other rows
share the batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ragloop.models import sampling
from ragloop.models.decoding import derive_seed, find_stop, left_pad, stop_holdback
from ragloop.models.tokenizer import IncrementalDetokenizer
from ragloop.models.types import FinishReason, Generation, GenerationConfig

log = logging.getLogger(__name__)

# Tokens (rows × padded prompt length) prefilled in one forward pass: bounds the prefill's activation and
# attention-mask memory (a (B, 1, T, T) fp32 mask at 16 × 2048 tokens is 256 MiB).
PREFILL_TOKENS = 16384
# Prompts of a new batch sharing at least this many leading tokens are prefilled with one copy of the
# shared part (FastStepper.prefill_prefix): few-shot agents' prompts share their exemplars.
MIN_SHARED_PREFIX = 32
# Joining runs a forward pass over the new rows' prompts, which reads every weight once — as much as a
# decode step of the whole batch. So waiting rows join together: once JOIN_MIN of them (or as many as there
# are free slots) are waiting, or JOIN_WAIT steps after the first one arrived (bounded extra latency).
JOIN_MIN = 4
JOIN_WAIT = 8
# KV cache the rows of one batch may hold at the peak (prompt + new tokens of every row, a shared prefix counted
# once, and the copy a regroup makes). Long ReAct prompts (4-5k tokens at ~46 KB a token for the embedded
# model) would otherwise put GBs in flight.
KV_BUDGET_MB = float(os.environ.get("RAGLOOP_KV_BUDGET_MB", "3072"))


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix: ``common_prefix_len([[1, 2, 3], [1, 2, 4]]) -> 2``."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return n


# ----------------------------------------------------------------------------------------------------------
# One row: a (prompt, candidate) pair being decoded


@dataclass
class _Row:
    ticket: Ticket
    index: int  # row number inside its ticket: prompt_index * n + candidate
    prompt: list[int]
    cfg: GenerationConfig
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    matcher: Any = None  # a grammar matcher (ragloop.models.grammar) when cfg.grammar is set
    seen: torch.Tensor | None = None  # (V,) bool, tokens present so far (repetition penalty only)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    scaled: list[float] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # text length after each token; -1 while a char is pending
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None

    # -- text, stop strings, limits (the conventions of ragloop.models.decoding) ---------------------------

    def _append_text(self, piece: str) -> bool:
        """Add decoded text; cut at a stop string if one completed. True when the row stopped."""
        if not piece:
            return False
        old = len(self.text)
        self.text += piece
        stops = self.cfg.stop
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        i = find_stop(self.text, stops, max(0, old - longest + 1))
        if i == -1:
            return False
        self.text = self.text[:i]
        keep = 0
        for k, end in enumerate(self.ends):
            if end == -1:
                continue
            if end > i:
                break
            keep = k + 1
        del self.ids[keep:], self.logprobs[keep:], self.scaled[keep:], self.ends[keep:]
        self.finish = "stop"
        return True

    def accept(self, tok: int, lp: float | None, slp: float | None, end_ids: set[int]) -> None:
        """Take one generated token: text, stop strings, end token, grammar completion, length limit."""
        self.ids.append(tok)
        if lp is not None:
            self.logprobs.append(lp)
            self.scaled.append(slp if slp is not None else lp)
        self.ends.append(-1)  # set below once the token's text is known
        if self.seen is not None:
            self.seen[tok] = True
        if tok in end_ids:
            # the end token adds no text; bytes still pending before it are flushed as they are
            if not self._append_text(self.detok.flush()):
                self.ends[-1] = len(self.text)
                self.finish = "eos"
            return
        if self._append_text(self.detok.push(tok)):
            return
        self.ends[-1] = -1 if self.detok.pending else len(self.text)
        done_by_grammar = self.matcher is not None and self.matcher.is_done()
        if (len(self.ids) >= self.cfg.max_new_tokens or done_by_grammar) and not self._append_text(self.detok.flush()):
            self.ends[-1] = len(self.text)
            self.finish = "stop" if done_by_grammar else "length"

    def emit(self) -> str:
        """The text that became safe to show since the last call (never part of a possible stop string)."""
        safe = len(self.text) if self.finish else len(self.text) - stop_holdback(self.text, self.cfg.stop)
        if safe <= self.emitted:
            return ""
        piece = self.text[self.emitted : safe]
        self.emitted = safe
        return piece

    def generation(self) -> Generation:
        lp = self.cfg.logprobs
        return Generation(
            text=self.text, token_ids=list(self.ids), finish_reason=self.finish or "length",
            logprobs=list(self.logprobs) if lp else None, prompt_tokens=len(self.prompt),
            scaled_logprobs=list(self.scaled) if lp else None, prompt_ids=self.prompt,
        )


# ----------------------------------------------------------------------------------------------------------
# A request: what a caller holds


class Ticket:
    """One submitted request: ``len(prompts) × cfg.n`` rows (row ``i * n + j`` = prompt ``i``, candidate ``j``).

    Iterate it for ``(row, text_piece)`` as text becomes safe to show; ``results()`` drives it to the end
    and returns ``[[Generation] * n] * len(prompts)``. Both drive the engine from the calling thread when
    no other thread is driving it.
    """

    def __init__(self, engine: DecodeEngine, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                 prompt_offset: int, stream: bool) -> None:
        self.engine, self.cfg, self.n_prompts = engine, cfg, len(prompts)
        self.stream = stream
        self.pieces: deque[tuple[int, str]] = deque()
        self.error: BaseException | None = None
        self.cancelled = False
        base = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.rows: list[_Row] = []
        for i, p in enumerate(prompts):
            for j in range(cfg.n):
                gen = (torch.Generator().manual_seed(derive_seed(base, prompt_offset + i, j))
                       if cfg.do_sample else None)
                self.rows.append(_Row(self, len(self.rows), list(p), cfg, gen, engine.new_detok()))
        self._remaining = len(self.rows)
        self._events: Iterator[tuple[int, str]] | None = None

    @property
    def done(self) -> bool:
        return self._remaining == 0 or self.error is not None

    def _row_finished(self) -> None:
        self._remaining -= 1

    def __iter__(self) -> Iterator[tuple[int, str]]:
        # one underlying generator: a consumer that stops early and later calls results() resumes it
        if self._events is None:
            self._events = self._run()
        return self._events

    def _run(self) -> Iterator[tuple[int, str]]:
        while True:
            while self.pieces:
                yield self.pieces.popleft()
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            self.engine.advance(self)

    def results(self) -> list[list[Generation]]:
        """Run to the end (resuming a partly consumed iteration) and return the generations per prompt."""
        if self.stream:
            for _ in self:
                pass
        else:
            while not self.done:
                self.engine.advance(self)
        if self.error is not None:
            raise self.error
        out: list[list[Generation]] = [[] for _ in range(self.n_prompts)]
        n = self.cfg.n
        for row in self.rows:
            out[row.index // n].append(row.generation())
        return out

    def cancel(self) -> None:
        """Stop decoding this request's rows (their slots are released at the next step)."""
        self.cancelled = True


# ----------------------------------------------------------------------------------------------------------
# The engine


def _sampling_key(cfg: GenerationConfig) -> tuple:
    return (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.logprobs)


class DecodeEngine:
    """Continuous batching over one policy's stepper. See the module docstring.

    ``make_stepper(rows, max_len)`` returns the stepper for a new batch (the policy picks the fast path or
    the reference); ``max_rows`` bounds the rows decoded together; ``context`` wraps every decode step
    (the policy puts its model in eval mode there).
    """

    def __init__(
        self,
        make_stepper: Callable[[int, int], Any],
        *,
        tokenizer: Any,
        end_ids: set[int],
        pad_id: int,
        max_rows: int = 64,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
        grammar_compiler: Callable[[Any], Any] | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.make_stepper = make_stepper
        self.tokenizer, self.end_ids, self.pad_id = tokenizer, set(end_ids), pad_id
        self.max_rows = max_rows
        self.context = context or nullcontext
        self.grammar_compiler = grammar_compiler
        self._cond = threading.Condition()
        self._driver: threading.Thread | None = None
        self._waiting: deque[_Row] = deque()  # rows not yet in a batch, in submission order
        self._rows: list[_Row] = []  # rows in the running batch, in the stepper's row order
        self._logits: torch.Tensor | None = None  # (R, V) next-token logits of self._rows
        self._stepper: Any = None
        self._prefix: list[int] = []  # the running batch's shared prompt prefix (prefix mode), else []
        self._join_wait = 0  # steps waiting rows have waited to join
        self._capacity = max_rows
        self._max_len = 0
        self.steps = 0  # decode steps taken (for tests and benchmarks)
        self.joins = 0  # times requests joined a running batch
        self._last_prompt: list[int] = []  # the last prompt a batch started with (see _shared_prefix)

    def new_detok(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)

    # -- submitting --------------------------------------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: GenerationConfig,
        *,
        prompt_offset: int = 0,
        stream: bool = False,
    ) -> Ticket:
        """Queue ``len(prompts) × cfg.n`` rows; ``prompt_offset`` shifts the prompt index used for seeds."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ticket = Ticket(self, prompts, cfg, prompt_offset, stream)
        if cfg.grammar is not None:
            if self.grammar_compiler is None:
                from ragloop.core.errors import UsageError

                raise UsageError("this policy cannot decode with a grammar")
            for row in ticket.rows:
                row.matcher = self.grammar_compiler(cfg.grammar)
        with self._cond:
            self._waiting.extend(ticket.rows)
            self._cond.notify_all()
        return ticket

    # -- driving -----------------------------------------------------------------------------------------

    def advance(self, ticket: Ticket) -> None:
        """Make progress for ``ticket``: take one decode step as the driver, or wait for the driver's step."""
        me = threading.current_thread()
        with self._cond:
            if ticket.done or ticket.pieces:
                return
            if self._driver is not None and self._driver is not me:
                self._cond.wait()
                return
            self._driver = me
            try:
                with self.context():
                    self._tick()
            except BaseException as e:  # noqa: BLE001 — KeyboardInterrupt included: the batch must be reset
                self._recover(ticket, e)
                raise
            finally:
                self._driver = None
                self._cond.notify_all()

    def _recover(self, ticket: Ticket, error: BaseException) -> None:
        """After a failed step the cache is unusable: fail ``ticket``, restart every other row from scratch."""
        log.debug("decode step failed (%r); restarting the other rows", error)
        others = [r for r in self._rows if r.ticket is not ticket]
        self._rows, self._logits, self._prefix = [], None, []
        if self._stepper is not None and hasattr(self._stepper, "reset"):
            self._stepper.reset()
        self._stepper = None
        ticket.error = error
        self._waiting = deque(r for r in self._waiting if r.ticket is not ticket)
        for row in others:
            if row.finish is None:
                fresh = _Row(row.ticket, row.index, row.prompt, row.cfg, None, self.new_detok())
                if row.cfg.do_sample:
                    fresh.generator = torch.Generator().manual_seed(row.generator.initial_seed())  # type: ignore[union-attr]
                if row.cfg.grammar is not None and self.grammar_compiler is not None:
                    fresh.matcher = self.grammar_compiler(row.cfg.grammar)
                row.ticket.rows[row.index] = fresh
                self._waiting.appendleft(fresh)

    # -- one step of the batch ---------------------------------------------------------------------------

    def _tick(self) -> None:
        self._drop_cancelled()
        if not self._rows:
            self._start_batch()
            if not self._rows:
                return
        else:
            self._maybe_join()
            self._maybe_compact()
        self._select_and_accept()
        live = [r.finish is None for r in self._rows]
        if not any(live):
            self._end_batch()
            return
        feed = torch.tensor([r.ids[-1] if ok else self.pad_id for r, ok in zip(self._rows, live, strict=True)])
        self._logits = self._stepper.step(feed)  # (R, V)
        self.steps += 1

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.ticket.cancelled and row.finish is None:
                row.finish = "stop"
                row.ticket._row_finished()
        self._waiting = deque(r for r in self._waiting if not r.ticket.cancelled)

    def _kv_tokens(self, row: _Row) -> int:
        """Cache slots ``row`` may need: its prompt past the shared prefix, and its new tokens."""
        return len(row.prompt) - len(self._prefix) + row.cfg.max_new_tokens

    def _take_waiting(self, capacity: int, max_len_limit: int | None) -> list[_Row]:
        """Rows to start next: in submission order, within the row capacity, the prefill token budget and
        the KV-cache budget. The cache is a rectangle — every row holds as many slots as the longest — so the
        budget is checked on rows × the longest row's slots, the rows already running included."""
        taken: list[_Row] = []
        longest = 0
        per_token = int(getattr(self._stepper, "kv_bytes_per_token", lambda: 0)())
        # a join or compaction (FastStepper.regroup) builds the new cache while the old one is alive, so the
        # peak is two rectangles: each may take half the budget (a ReAct claims run peaked at 9.6 GB without it)
        budget = int(KV_BUDGET_MB * (1 << 20)) // per_token // 2 if per_token else None
        live = [r for r in self._rows if r.finish is None]
        widest = max((self._kv_tokens(r) for r in live), default=0)
        while self._waiting and len(taken) < capacity:
            row = self._waiting[0]
            need = len(row.prompt) + row.cfg.max_new_tokens
            if max_len_limit is not None and need > max_len_limit:
                break
            wider = max(widest, self._kv_tokens(row))
            if budget is not None and (taken or live) and (len(live) + len(taken) + 1) * wider > budget:
                break
            widest = wider
            longest2 = max(longest, len(row.prompt))
            # candidates of one prompt are prefilled once (FastStepper shares their prompt cache)
            distinct = len({(id(r.ticket), r.index // r.cfg.n) for r in [*taken, row]})
            if taken and distinct * longest2 > PREFILL_TOKENS:
                break
            taken.append(self._waiting.popleft())
            longest = longest2
        return taken

    def _start_batch(self) -> None:
        # the stepper for this batch is picked for the rows waiting now (the fast path's capacity or the reference)
        head = list(self._waiting)[: self.max_rows]
        if not head:
            return
        max_len = max(len(r.prompt) + r.cfg.max_new_tokens for r in head)
        self._stepper = self.make_stepper(len(head), max_len)
        cap = int(getattr(self._stepper, "max_batch", self.max_rows))
        self._capacity = max(1, min(self.max_rows, cap))
        self._max_len = int(getattr(self._stepper, "max_seq_len", 0)) or 0
        rows = self._take_waiting(self._capacity, self._max_len or None)
        if not rows:  # the head row alone exceeds the stepper: give it a stepper of its own size
            rows = [self._waiting.popleft()]
            self._stepper = self.make_stepper(1, len(rows[0].prompt) + rows[0].cfg.max_new_tokens)
        prompts = [r.prompt for r in rows]
        shared = self._shared_prefix(prompts)
        self._last_prompt = list(prompts[-1])
        if shared >= MIN_SHARED_PREFIX and hasattr(self._stepper, "prefill_prefix"):
            ids, mask = left_pad([p[shared:] for p in prompts], self.pad_id)  # (R, T) suffixes
            self._logits = self._stepper.prefill_prefix(prompts[0][:shared], ids, mask)  # (R, V)
            self._prefix = prompts[0][:shared]
        else:
            ids, mask = left_pad(prompts, self.pad_id)  # (R, T)
            self._logits = self._stepper.prefill(ids, mask)  # (R, V)
            self._prefix = []
        self._rows = rows
        self._init_seen(rows)

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        """How many leading tokens of ``prompts`` to prefill once as a shared prefix (0: none).

        The stepper keeps the last shared prefix's cache across batches (``FastStepper.stored_prefix``): when
        every prompt starts with it, it is used as is and its prefill is skipped — an agent's exemplar block
        is prefilled once per policy, not once per question or per call. Otherwise the prompts' common
        prefix; a lone prompt is compared with the previous batch's last prompt (consecutive calls of one
        agent share their exemplars; ReAct's next call extends its last prompt), so that the part they share
        is cached for the calls that follow. Every prompt keeps at least one token of its own (the position
        whose logits start its generation).
        """
        if not hasattr(self._stepper, "prefill_prefix"):
            return 0
        own = min(len(p) for p in prompts) - 1
        stored = list(getattr(self._stepper, "stored_prefix", []) or [])
        S = len(stored)
        if MIN_SHARED_PREFIX <= S <= own and all(p[:S] == stored for p in prompts):
            return S
        pool = prompts if len(prompts) > 1 else prompts + ([self._last_prompt] if self._last_prompt else [])
        if len(pool) < 2:
            return 0
        return max(0, min(common_prefix_len(pool), own))

    def _joinable(self) -> bool:
        """Waiting rows may join now: FIFO, so only while the oldest waiting row fits the running batch."""
        if not self._waiting or not hasattr(self._stepper, "regroup") or not self._stepper.can_regroup():
            return False
        head = self._waiting[0].prompt
        P = len(self._prefix)
        return not P or (len(head) > P and head[:P] == self._prefix)

    def _maybe_join(self) -> None:
        """Let waiting rows join the running batch, dropping finished ones, when the stepper can regroup."""
        if not self._joinable():
            return
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        free = self._capacity - len(keep)
        if free <= 0:
            return
        P = len(self._prefix)
        fits = sum(1 for _ in self._leading(lambda r: not P or (len(r.prompt) > P and r.prompt[:P] == self._prefix)))
        self._join_wait += 1
        if keep and fits < min(free, JOIN_MIN) and self._join_wait < JOIN_WAIT:
            return  # wait for more rows to join together
        self._join_wait = 0
        new = self._take_waiting(min(free, fits), self._max_len or None)
        if not new:
            return
        ids, mask = left_pad([r.prompt[P:] for r in new], self.pad_id)
        new_logits = self._stepper.regroup(torch.tensor(keep, dtype=torch.long), ids, mask)  # (N, V)
        old = self._logits[keep] if self._logits is not None else new_logits[:0]
        self._logits = torch.cat([old, new_logits], dim=0)
        self._rows = [self._rows[i] for i in keep] + new
        self._init_seen(new)
        self.joins += 1

    def _maybe_compact(self) -> None:
        """Drop finished rows from the batch once they are as many as the live ones (and at least 4): they
        still cost a forward row and cache slots every step."""
        live = [i for i, r in enumerate(self._rows) if r.finish is None]
        done = len(self._rows) - len(live)
        if not live or done < max(4, len(live)) or not hasattr(self._stepper, "regroup"):
            return
        if not self._stepper.can_regroup():
            return
        self._stepper.regroup(torch.tensor(live, dtype=torch.long))
        self._logits = self._logits[live]
        self._rows = [self._rows[i] for i in live]

    def _leading(self, ok: Callable[[_Row], bool]) -> Iterator[_Row]:
        """The waiting rows from the head while ``ok`` holds."""
        for row in self._waiting:
            if not ok(row):
                return
            yield row

    def _end_batch(self) -> None:
        self._rows, self._logits, self._prefix = [], None, []
        if self._stepper is not None and hasattr(self._stepper, "reset"):
            self._stepper.reset()  # free the KV cache
        self._stepper = None

    def _init_seen(self, rows: list[_Row]) -> None:
        V = self._logits.shape[-1]
        for row in rows:
            if row.cfg.repetition_penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool)
                seen[torch.tensor(row.prompt).clamp(max=V - 1)] = True  # tokens of the prompt
                row.seen = seen

    # -- choosing tokens ---------------------------------------------------------------------------------

    def _select_and_accept(self) -> None:
        logits = self._logits
        live = [k for k, r in enumerate(self._rows) if r.finish is None]
        groups: dict[tuple, list[int]] = {}
        for k in live:
            groups.setdefault(_sampling_key(self._rows[k].cfg), []).append(k)
        for idx in groups.values():
            rows = [self._rows[k] for k in idx]
            cfg = rows[0].cfg
            raw = logits[idx]  # (G, V)
            masked = raw
            if any(r.matcher is not None for r in rows):
                from ragloop.models import grammar

                masked = grammar.apply_masks(raw.clone(), [r.matcher for r in rows])  # (G, V) -inf outside
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = torch.stack([r.seen for r in rows])  # (G, V)
            scale_t = cfg.temperature if cfg.do_sample and cfg.temperature > 0 else 1.0
            if cfg.do_sample:
                proc = sampling.process_logits(masked, temperature=cfg.temperature, top_k=cfg.top_k,
                                               top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                                               seen=seen)
                nxt = sampling.sample(proc, [r.generator for r in rows])  # (G,)
            else:
                proc = masked if seen is None else sampling.apply_repetition_penalty(masked, seen,
                                                                                     cfg.repetition_penalty)
                nxt = sampling.greedy(proc)  # (G,)
            lps = scaled = None
            if cfg.logprobs:
                lps = sampling.token_logprobs(raw, nxt).tolist()
                # the sampled token's log-prob under the distribution it was drawn from: temperature and
                # grammar mask (RL's behaviour policy); without a grammar this is the scaled raw logits
                scaled = (lps if scale_t == 1.0 and masked is raw
                          else sampling.token_logprobs(masked, nxt, temperature=scale_t).tolist())
            for g, (row, tok) in enumerate(zip(rows, nxt.tolist(), strict=True)):
                if row.matcher is not None:
                    row.matcher.accept(tok)
                row.accept(tok, lps[g] if lps else None, scaled[g] if scaled else None, self.end_ids)
                if row.ticket.stream:
                    piece = row.emit()
                    if piece:
                        row.ticket.pieces.append((row.index, piece))
                if row.finish is not None:
                    row.ticket._row_finished()
