"""Progress bars for long commands and a quiet mode for the libraries underneath (CLI layer only).

``progress_bar(description, quiet)`` is a context manager yielding ``update(done, total, note="")``: a rich
bar on stderr (elapsed and remaining time, the latest note), drawn only when stderr is a terminal;
otherwise one plain line per update at most every ``min_interval`` seconds, so logs of a background run
still show that it moves. Library code stays free of output: it takes a ``progress`` callback.

``quiet_libraries()`` silences what transformers, sentence-transformers, huggingface_hub and tqdm print on
their own (progress bars, "Loading weights", warnings) for the rest of the process — what ``--quiet`` means.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Update = Callable[..., None]


def quiet_libraries() -> None:
    """No library progress bars, info lines or warnings from here on (the CLI's ``--quiet``)."""
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: sentence-transformers and hub bars
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    warnings.filterwarnings("ignore")
    # the libraries' loggers only: ragloop's own warnings (e.g. files skipped while indexing) still reach stderr
    for name in ("transformers", "sentence_transformers", "huggingface_hub", "accelerate", "peft", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def progress_bar(description: str, *, quiet: bool = False, total: int | None = None,
                 min_interval: float = 5.0) -> Iterator[Update]:
    """Yields ``update(done, total=None, note="")``; silent when ``quiet``."""
    if quiet:
        yield lambda *a, **k: None
        return
    if not sys.stderr.isatty():
        last = [0.0]
        t0 = time.perf_counter()

        def plain(done: int, total_: int | None = None, note: str = "") -> None:
            now = time.perf_counter()
            n = total_ if total_ is not None else total
            if now - last[0] >= min_interval or (n is not None and done >= n):
                last[0] = now
                of = f"/{n}" if n is not None else ""
                print(f"{description}: {done}{of} ({now - t0:.0f} s){' ' + note if note else ''}",
                      file=sys.stderr, flush=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[note]}", style="dim"),
                   console=Console(stderr=True), transient=False)
    task = bar.add_task(description, total=total, note="")

    def update(done: int, total_: int | None = None, note: str = "") -> None:
        bar.update(task, completed=done, total=total_ if total_ is not None else total, note=note[:60])

    with bar:
        yield update
