"""The one place the server submits decoding: ``Decoder``.

A ``LocalPolicy`` is not safe to call from several threads at once (one KV cache, one fast stepper), and
decoding requests one by one wastes the CPU's matrix units: a batch of 16 rows costs little more per step
than one. So every request goes through one worker thread that owns the policy. While it decodes, new
requests queue up; when it is free it takes everything queued and decodes compatible requests together in
one ``generate_batch`` call — request-level (static) batching, the simple form of the continuous batching
of Orca (Yu et al. 2022) and vLLM (Kwon et al. 2023).

Requests are compatible when their ``GenerationConfig`` is identical and the result cannot depend on the
batch: greedy decoding, or sampling without a seed (a seeded row's random stream is derived from its
position in the batch, ``decoding.derive_seed``, so seeded sampled requests run alone and stay
reproducible). A batch that fails (e.g. one prompt over the context window) is retried one request at a
time, so only the bad request gets the error. Streams run alone, piece by piece, and stop early when
the client goes away.

``mode="direct"`` skips the worker and calls the policy from the caller's thread: for a policy that is
itself thread-safe and batches concurrent calls — a ``LocalPolicy`` on its ``DecodeEngine`` (continuous
batching: rows join and leave a running batch token by token), or an HTTP policy. The server picks it for
such policies; the worker remains for policies that are not thread-safe (e.g. the scripted test policy).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ragloop.models.types import Generation, GenerationConfig, Policy, Prompt

log = logging.getLogger(__name__)

_END = object()


@dataclass
class _Job:
    prompts: list[Prompt]
    cfg: GenerationConfig
    stream: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[Generation]] | None = None
    error: BaseException | None = None
    pieces: queue.Queue[Any] | None = None  # stream jobs: text pieces, then _END
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> str | None:
        """Jobs with the same key may share one ``generate_batch`` call; None = run alone."""
        if self.stream or (not self.cfg.greedy and self.cfg.seed is not None):
            return None
        return json.dumps(self.cfg.to_dict(), sort_keys=True, default=str)


@dataclass
class StreamResult:
    """What a finished stream produced: its Generation when the policy exposes one (token ids, finish)."""

    generation: Generation | None = None


class Decoder:
    """Submit ``generate`` / ``stream`` calls for one policy from any number of threads (see module doc)."""

    def __init__(self, policy: Policy, *, mode: Literal["queue", "direct"] = "queue", max_batch_prompts: int = 64):
        self.policy = policy
        self.mode = mode
        self.max_batch_prompts = max_batch_prompts
        self.batches = 0  # decode calls made (for tests and the benchmark: proves requests were batched)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        if mode == "queue":
            self._worker = threading.Thread(target=self._run, name="ragloop-decoder", daemon=True)
            self._worker.start()

    # -- callers -----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[list[Generation]]:
        """``cfg.n`` candidates for each prompt; blocks until decoded. Errors are the policy's own."""
        if self.mode == "direct":
            self.batches += 1
            return self.policy.generate_batch(list(prompts), cfg)
        job = _Job(list(prompts), cfg)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def stream(
        self,
        prompt: Prompt,
        cfg: GenerationConfig,
        result: StreamResult | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text pieces of one candidate as decoded; ``result.generation`` is set at the end when known.
        Setting ``cancel`` (the client went away) stops the decode at its next token."""
        if self.mode == "direct":
            yield from self._stream_now(prompt, cfg, result, cancel)
            return
        job = _Job([prompt], cfg, stream=True, pieces=queue.Queue(), cancelled=cancel or threading.Event())
        self._queue.put(job)
        try:
            while True:
                item = job.pieces.get()  # type: ignore[union-attr]
                if item is _END or job.cancelled.is_set():
                    break
                yield item
        finally:
            job.cancelled.set()
            job.done.wait()
        if job.error is not None:
            raise job.error
        if result is not None and job.result:
            result.generation = job.result[0][0]

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=60)
            self._worker = None

    # -- the worker ----------------------------------------------------------------------------------------

    def _stream_now(
        self, prompt: Prompt, cfg: GenerationConfig, result: StreamResult | None, cancelled: threading.Event | None
    ) -> Iterator[str]:
        decode_run = getattr(self.policy, "decode_run", None)
        self.batches += 1
        if decode_run is None:  # a policy without a lazy batched decode: its plain stream
            for piece in self.policy.stream(prompt, cfg):
                if cancelled is not None and cancelled.is_set():
                    return
                yield piece
            return
        run = decode_run([prompt], cfg)
        try:
            for _, piece in run:
                if cancelled is not None and cancelled.is_set():
                    return
                yield piece
            if result is not None:
                result.generation = run.results()[0][0]
        finally:
            cancel = getattr(run, "cancel", None)  # an engine Ticket: release the row's slot
            if cancel is not None and not getattr(run, "done", True):
                cancel()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:  # everything that queued up while the last batch decoded
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this round, then stop
                    break
                jobs.append(nxt)
            groups: dict[str, list[_Job]] = {}
            order: list[list[_Job]] = []
            for j in jobs:
                key = j.batch_key()
                if key is None:
                    order.append([j])
                elif key in groups:
                    groups[key].append(j)
                else:
                    groups[key] = [j]
                    order.append(groups[key])
            for group in order:
                for start in range(0, len(group), self.max_batch_prompts):
                    self._serve(group[start : start + self.max_batch_prompts])

    def _serve(self, group: list[_Job]) -> None:
        if group[0].stream:
            job = group[0]
            res = StreamResult()
            try:
                for piece in self._stream_now(job.prompts[0], job.cfg, res, job.cancelled):
                    job.pieces.put(piece)  # type: ignore[union-attr]
                job.result = [[res.generation]] if res.generation is not None else None
            except BaseException as e:  # handed to the caller's thread, which raises it
                job.error = e
            finally:
                job.pieces.put(_END)  # type: ignore[union-attr]
                job.done.set()
            return
        prompts = [p for j in group for p in j.prompts]
        try:
            self.batches += 1
            out = self.policy.generate_batch(prompts, group[0].cfg)
        except BaseException as e:
            if len(group) > 1:  # find the request that failed; the others still get answers
                log.info("batch of %d requests failed (%s); decoding them one by one", len(group), e)
                for j in group:
                    self._serve([j])
                return
            group[0].error = e
            group[0].done.set()
            return
        i = 0
        for j in group:
            j.result = out[i : i + len(j.prompts)]
            i += len(j.prompts)
            j.done.set()
