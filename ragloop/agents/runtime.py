"""The agent runtime: agent runs as episodes that a runner steps together, their model calls decoded as one batch.

An *episode* is one agent run as a small state machine. Agents write their loop once, as a generator
(``agent.episode(question)``) that yields a ``ModelCall`` wherever it needs the model and receives the
generations back; it returns the finished ``Trace``. ``Episode`` wraps that generator with the transition
the runners drive::

    ep = Episode(agent.episode("What is 2+3?"))
    call = ep.start()                 # the first ModelCall (or None: done without the model)
    while call is not None:
        call = ep.step(policy.generate(call.prompt, call.cfg))
    trace = ep.trace

- ``run_episode`` drives one episode with the policy (streaming tokens to an event callback when asked):
  ``agent.run(question)`` is exactly that, so the one-question API is the runtime with one episode.
- ``run_episodes`` drives many: every pending ``ModelCall`` of every episode goes to the policy's decode
  engine (``ragloop.models.engine``), which decodes them in one batch and lets a new call join as soon as
  a slot frees (continuous batching); episode code — parsing, tools, the PAL sandbox — runs in a small
  thread pool so that a slow program never stalls the batch. With a policy that has no engine (a scripted
  policy, an HTTP server) the calls run in the pool concurrently instead.

Every episode records, per model call, the prompt token ids, the generated token ids and their
log-probabilities under the distribution they were sampled from (``Trace.calls``): RL trains on them and the
server exports them. Greedy traces are identical to a one-at-a-time run; a sampled episode draws from its
own seeds (the call's ``GenerationConfig.seed``), so its text does not depend on the batch it landed in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ragloop.core.errors import RagloopError
from ragloop.core.trace import ModelCallRecord, Trace
from ragloop.models.types import Generation, GenerationConfig, Prompt

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32  # episodes in flight at once (see default_batch_size)
# ReAct episodes one at a time unless asked: every call re-prefills its whole 1-3k-token prompt (observations
# included), so a batch amortises only the decode steps while padding prefills to the longest row; measured
# 0.69x-0.76x of one at a time on SciFact claims (benchmarks/RESULTS.md, "Agent runtime"). Per-episode KV reuse
# is the lever that would change this.
REACT_DEFAULT_BATCH_SIZE = 1


@dataclass(frozen=True)
class ModelCall:
    """What an episode asks of the model: ``cfg.n`` generations for ``prompt`` (``step`` labels events)."""

    prompt: Prompt
    cfg: GenerationConfig
    step: int = 0


EpisodeGen = Generator[ModelCall, list[Generation], Trace]


class Episode:
    """One agent run as a state machine: ``start() -> call | None``, ``step(generations) -> call | None``.

    ``record=True`` asks every call for log-probabilities and keeps a ``ModelCallRecord`` per call, stored in
    ``trace.calls`` when the episode ends. ``transform`` may rewrite each call's settings (e.g. collection
    samples at a temperature instead of the agent's greedy decoding).
    """

    def __init__(self, gen: EpisodeGen, *, record: bool = True,
                 transform: Callable[[GenerationConfig], GenerationConfig] | None = None) -> None:
        self._gen = gen
        self.record = record
        self.transform = transform
        self.request: ModelCall | None = None
        self.trace: Trace | None = None
        self.calls: list[ModelCallRecord] = []
        self.model_seconds = 0.0

    @property
    def done(self) -> bool:
        return self.trace is not None

    def _prepare(self, call: ModelCall) -> ModelCall:
        cfg = call.cfg
        if self.transform is not None:
            cfg = self.transform(cfg)
        if self.record and not cfg.logprobs:
            cfg = dataclasses.replace(cfg, logprobs=True)
        return call if cfg is call.cfg else ModelCall(call.prompt, cfg, call.step)

    def _advance(self, send: list[Generation] | None, error: BaseException | None = None) -> ModelCall | None:
        try:
            if error is not None:
                call = self._gen.throw(error)
            else:
                call = next(self._gen) if send is None else self._gen.send(send)
        except StopIteration as stop:
            self.trace = stop.value
            if not isinstance(self.trace, Trace):
                raise TypeError(f"an episode must return a Trace, got {type(self.trace).__name__}") from None
            if self.record:
                self.trace.calls = list(self.calls)
            self.request = None
            return None
        self.request = self._prepare(call)
        return self.request

    def start(self) -> ModelCall | None:
        """Run the episode up to its first model call."""
        return self._advance(None)

    def step(self, generations: list[Generation]) -> ModelCall | None:
        """Hand the generations of the pending call back; run up to the next call (None when done)."""
        if self.request is None:
            raise RuntimeError("step() without a pending model call")
        if self.record:
            self.calls.append(record_call(self.request, generations))
        return self._advance(generations)

    def fail(self, error: BaseException) -> ModelCall | None:
        """The pending call raised ``error`` (e.g. ContextWindowError): raise it inside the episode's code,
        which may handle it and go on (the next call or None) or let it propagate."""
        if self.request is None:
            raise RuntimeError("fail() without a pending model call")
        return self._advance(None, error)


def record_call(call: ModelCall, generations: Sequence[Generation]) -> ModelCallRecord:
    """The tokens of one model call: prompt ids, and per candidate the generated ids and sampling log-probs."""
    first = generations[0] if generations else None
    grammar = call.cfg.grammar
    return ModelCallRecord(
        step=call.step,
        prompt_ids=list(first.prompt_ids) if first is not None and first.prompt_ids is not None else [],
        completions=[
            {"token_ids": list(g.token_ids), "finish_reason": g.finish_reason,
             "logprobs": list(g.scaled_logprobs if g.scaled_logprobs is not None else (g.logprobs or []))}
            for g in generations
        ],
        temperature=0.0 if call.cfg.greedy else call.cfg.temperature,
        grammar=(grammar.name or grammar.kind) if grammar is not None else None,
    )


# ----------------------------------------------------------------------------------------------------------
# One episode


def first_call(agent: Any, question: str, **kwargs: Any) -> ModelCall | None:
    """The first model call ``agent`` makes for ``question`` (its exact prompt and settings); nothing is
    decoded. PPO and GRPO take their prompts from here, so they train on the format the agent runs on."""
    return Episode(agent.episode(question, **kwargs), record=False).start()


def replay(agent: Any, question: str, answers: Sequence[Sequence[Generation]], **kwargs: Any) -> Trace:
    """The Trace ``agent`` produces when its model calls return ``answers`` in turn (e.g. judging an RL
    completion with the agent's own parser and tools). Raises UsageError if it asks for more calls."""
    ep = Episode(agent.episode(question, **kwargs), record=False)
    call = ep.start()
    for gens in answers:
        if call is None:
            break
        call = ep.step(list(gens))
    if call is not None:
        from ragloop.core.errors import UsageError

        raise UsageError(f"the agent asked for more than the {len(answers)} model call(s) replayed")
    assert ep.trace is not None
    return ep.trace


def run_episode(ep: Episode, policy: Any, *, on_token: Callable[[str, int], None] | None = None) -> Trace:
    """Drive one episode to its end with ``policy``; with ``on_token``, single-candidate calls stream."""
    call = ep.start()
    while call is not None:
        t0 = time.perf_counter()
        try:
            if on_token is not None and call.cfg.n == 1:
                gens = _stream_call(policy, call, on_token)
            else:
                gens = policy.generate(call.prompt, call.cfg)
        except RagloopError as e:  # a model-call error the agent may handle (context window, bad request)
            ep.model_seconds += time.perf_counter() - t0
            call = ep.fail(e)
            continue
        ep.model_seconds += time.perf_counter() - t0
        call = ep.step(gens)
    assert ep.trace is not None
    return ep.trace


def _stream_call(policy: Any, call: ModelCall, on_token: Callable[[str, int], None]) -> list[Generation]:
    if hasattr(policy, "submit"):  # the engine's ticket streams and still returns full generations
        ticket = policy.submit([call.prompt], call.cfg, stream=True)
        for _, piece in ticket:
            on_token(piece, call.step)
        return ticket.results()[0]
    pieces: list[str] = []
    for piece in policy.stream(call.prompt, call.cfg):
        pieces.append(piece)
        on_token(piece, call.step)
    text = "".join(pieces)
    ids = policy.tokenize(text) if text else []
    reason = "length" if len(ids) >= call.cfg.max_new_tokens else "stop"
    return [Generation(text=text, token_ids=ids, finish_reason=reason, prompt_tokens=policy.count_tokens(call.prompt))]


# ----------------------------------------------------------------------------------------------------------
# Many episodes


def default_batch_size(agent: str | None = None) -> int:
    """Episodes in flight: ``RAGLOOP_BATCH_SIZE`` or 32 (the decode batch where a 2-core CPU's throughput
    stops growing for the embedded model; memory: ~70 MB of KV cache per 1.5k-token row) — for ``agent=
    "react"`` 1 (``REACT_DEFAULT_BATCH_SIZE``)."""
    env = os.environ.get("RAGLOOP_BATCH_SIZE")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            from ragloop.core.errors import UsageError

            raise UsageError(f"RAGLOOP_BATCH_SIZE must be a positive integer, got {env!r}") from None
    return REACT_DEFAULT_BATCH_SIZE if agent == "react" else DEFAULT_BATCH_SIZE


def run_episodes(
    policy: Any,
    episodes: Iterable[Episode],
    *,
    batch_size: int | None = None,
    workers: int = 4,
    on_done: Callable[[int, Trace], None] | None = None,
) -> list[Trace]:
    """Run every episode; returns their traces in input order. ``on_done(i, trace)`` as each one ends.

    At most ``batch_size`` episodes are in flight; a finished one's slot is refilled at once. Model calls go
    to ``policy.submit`` (the decode engine) when the policy has one, else to ``policy.generate`` in the
    thread pool (concurrently only for a policy that says ``thread_safe = True``, e.g. an HTTP client).
    Episode code runs in a pool of ``workers`` threads.
    """
    eps = list(episodes)
    limit = max(1, batch_size or default_batch_size())
    traces: list[Trace | None] = [None] * len(eps)
    engine_policy = hasattr(policy, "submit")
    if not engine_policy and not getattr(policy, "thread_safe", False):
        limit = 1  # e.g. a scripted policy answers in call order: one episode at a time keeps that order
    todo = list(range(len(eps)))[::-1]  # a stack: pop() takes the next in input order
    running: dict[Future, int] = {}  # episode code (start/step) in the pool → episode index
    decoding: dict[Any, int] = {}  # engine tickets (or pool futures of policy.generate) → episode index

    def finish_code(i: int, call: ModelCall | None) -> None:
        if call is None:
            traces[i] = eps[i].trace
            if on_done is not None:
                on_done(i, eps[i].trace)  # type: ignore[arg-type]
            return
        if engine_policy:
            try:
                decoding[policy.submit([call.prompt], call.cfg)] = i
            except RagloopError as e:  # rejected before decoding (e.g. over the context window)
                running[pool.submit(eps[i].fail, e)] = i
        else:
            decoding[pool.submit(policy.generate, call.prompt, call.cfg)] = i

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ragloop-episode") as pool:
        while todo or running or decoding:
            while todo and len(running) + len(decoding) < limit:
                i = todo.pop()
                running[pool.submit(eps[i].start)] = i
            # episode code that finished: its next call goes to the model
            for fut in [f for f in running if f.done()]:
                finish_code(running.pop(fut), fut.result())
            # model calls that finished: the episode's code continues in the pool
            for key in [k for k in decoding if (k.done if engine_policy else k.done())]:
                i = decoding.pop(key)
                try:
                    gens = key.results()[0] if engine_policy else key.result()
                except RagloopError as e:
                    running[pool.submit(eps[i].fail, e)] = i
                    continue
                running[pool.submit(eps[i].step, gens)] = i
            if engine_policy and decoding:
                pending = next((k for k in decoding if not k.done), None)
                if pending is not None:
                    pending.engine.advance(pending)  # one decode step for every call in the batch
                    continue
            waitables = list(running) + ([] if engine_policy else list(decoding))
            if waitables:
                wait(waitables, timeout=0.05 if engine_policy and decoding else None, return_when=FIRST_COMPLETED)
    return [t for t in traces if t is not None]


def run_questions(
    make_agent: Callable[[], Any],
    questions: Sequence[str],
    policy: Any,
    *,
    batch_size: int | None = None,
    task: str | None = None,
    transform: Callable[[int, GenerationConfig], GenerationConfig] | None = None,
    on_done: Callable[[int, Trace], None] | None = None,
    record: bool = True,
) -> list[Trace]:
    """One episode per question, each on its own agent from ``make_agent()`` (tools keep per-run state).

    ``transform(i, cfg)`` may rewrite question ``i``'s decoding (collection samples with per-question seeds).
    """
    eps = []
    for i, q in enumerate(questions):
        agent = make_agent()
        gen = agent.episode(q, task=task) if task else agent.episode(q)
        tf = (lambda c, i=i: transform(i, c)) if transform is not None else None
        eps.append(Episode(gen, record=record, transform=tf))
    return run_episodes(policy, eps, batch_size=batch_size, on_done=on_done)
