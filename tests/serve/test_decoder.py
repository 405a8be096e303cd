"""The server's ``Decoder`` in queue mode (a policy that is not thread-safe): one worker thread, requests
that queue up while it decodes are batched, a failing request does not fail the others."""

from __future__ import annotations

import threading
import time

import pytest

from ragloop.core.errors import ContextWindowError
from ragloop.models.scripted import ScriptedPolicy
from ragloop.models.types import GenerationConfig
from ragloop.serve.decoder import Decoder


class SlowScripted(ScriptedPolicy):
    """A scripted policy that takes a while per decode call and records the batch sizes it was given."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batch_sizes: list[int] = []

    def generate_batch(self, prompts, cfg=None):
        self.batch_sizes.append(len(prompts))
        time.sleep(0.05)
        return super().generate_batch(prompts, cfg)


def test_queued_requests_are_batched_and_answered_in_order():
    pol = SlowScripted(lambda text, cfg: text.split("user\n")[-1].split("<|im_end|>")[0].upper(), name="s")
    dec = Decoder(pol, mode="queue")
    out: dict[int, str] = {}

    def ask(i):
        out[i] = dec.generate([[{"role": "user", "content": f"item {i}"}]], GenerationConfig(greedy=True))[0][0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dec.close()
    assert out == {i: f"ITEM {i}" for i in range(12)}
    assert len(pol.batch_sizes) < 12 and max(pol.batch_sizes) > 1


def test_seeded_sampling_runs_alone_and_a_bad_request_fails_alone():
    pol = SlowScripted(lambda text, cfg: "ok", name="s", context_window=32)
    dec = Decoder(pol, mode="queue")
    results: dict[str, object] = {}

    def ask(key, prompt, cfg):
        try:
            results[key] = dec.generate([prompt], cfg)[0][0].text
        except ContextWindowError as e:
            results[key] = e

    cfg = GenerationConfig(greedy=True, max_new_tokens=4)
    threads = [threading.Thread(target=ask, args=(f"good{i}", f"hello {i}", cfg)) for i in range(3)]
    threads.append(threading.Thread(target=ask, args=("bad", "word " * 40, cfg)))
    threads.append(threading.Thread(target=ask, args=("seeded", "hi", GenerationConfig(temperature=0.8, seed=3, max_new_tokens=4))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dec.close()
    assert [results[f"good{i}"] for i in range(3)] == ["ok"] * 3 and results["seeded"] == "ok"
    assert isinstance(results["bad"], ContextWindowError)


def test_stream_through_the_worker_and_cancel():
    pol = ScriptedPolicy(lambda text, cfg: "one two three four", name="s")
    dec = Decoder(pol, mode="queue")
    assert "".join(dec.stream("x", GenerationConfig())) == "one two three four"
    cancel = threading.Event()
    it = dec.stream("x", GenerationConfig(), cancel=cancel)
    assert next(it) == "one"
    cancel.set()
    assert list(it) == []  # nothing after the cancel
    dec.close()


def test_unknown_mode_is_refused():
    from ragloop.core.errors import UsageError
    from ragloop.serve import ServeConfig, create_app

    with pytest.raises(UsageError, match="decode_mode"):
        create_app(ScriptedPolicy(["x"]), ServeConfig(decode_mode="fast"))
