"""The parent side of the code sandbox: start the child, feed it the program, enforce the wall clock,
read one JSON result, and map every outcome to a typed ``SandboxResult`` (SECURITY.md §1).

Each ``Sandbox.run`` starts ``python -I -S -B _worker.py`` in a new session (its own process group),
with an empty environment and an empty temporary working directory, writes the program to its stdin
and reads its stdout/stderr with caps. On timeout, cancellation, output overflow or KeyboardInterrupt
the whole process group is killed with SIGKILL; the temporary directory is always removed. Runs share
nothing, so one failure never affects the next; a ``Sandbox`` may be used from several threads.

Error types: ``validation`` (rejected before running), ``timeout`` (wall clock or CPU), ``memory``
(address-space limit or a size guard), ``output_limit``, ``runtime`` (the program raised; message =
line + exception type + message, no host paths), ``no_entry``, ``bad_value`` (returned something that is
not JSON data), ``cancelled`` (``Sandbox.cancel``), ``crashed`` (the child died without a result).

Lessons behind the design: LangChain's PALChain CVEs (in-process deny-lists) and smolagents'
``LocalPythonExecutor`` ("not a security boundary"); see docs/SANDBOX.md for what is and is not promised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragloop.agents.sandbox.limits import SandboxLimits
from ragloop.core.errors import SandboxError, UsageError

log = logging.getLogger(__name__)

WORKER_PATH = Path(__file__).resolve().with_name("_worker.py")
ERROR_TYPES = (
    "validation", "timeout", "memory", "output_limit", "runtime", "no_entry", "bad_value", "cancelled",
    "crashed",
)  # fmt: skip
_EXIT_MEMORY = 3  # must match _worker.EXIT_MEMORY
_STDERR_CAP = 16384
_PATHLIKE = re.compile(r"(?:/[\w.+-]+){2,}")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run. ``value`` is JSON data when ``ok``; otherwise ``error_type``/``message``."""

    ok: bool
    value: Any = None
    stdout: str = ""
    error_type: str | None = None
    message: str | None = None
    seconds: float = 0.0
    line: int | None = None  # the program's line for runtime/validation errors, when known

    def to_dict(self) -> dict[str, Any]:
        """``{"ok": true, "value": ...}`` or ``{"ok": false, "error_type": ..., "message": ...}``."""
        if self.ok:
            return {"ok": True, "value": self.value}
        return {"ok": False, "error_type": self.error_type, "message": self.message}

    def to_json(self) -> str:
        """``to_dict()`` as one compact JSON line (the string, like ``Trace.to_json``)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def observation(self) -> str:
        """A one-line text for an agent's Observation: the value, or ``error (type): message``."""
        if self.ok:
            return json.dumps(self.value, ensure_ascii=False)
        return f"error ({self.error_type}): {self.message}"


def _failure(error_type: str, message: str, seconds: float, stdout: str = "") -> SandboxResult:
    return SandboxResult(ok=False, error_type=error_type, message=message, seconds=seconds, stdout=stdout)


def check_source(source: str, limits: SandboxLimits) -> str | None:
    """Host-side checks done before anything parses the program; returns the problem or None.

    >>> check_source("x = 1", SandboxLimits())
    >>> check_source("x\\x00", SandboxLimits())
    'the program contains a NUL byte'
    """
    if "\x00" in source:
        return "the program contains a NUL byte"
    try:
        size = len(source.encode("utf-8"))
    except UnicodeEncodeError as e:
        return f"the program is not valid Unicode text (character {e.start} is a lone surrogate)"
    if size > limits.max_source_bytes:
        return f"the program is {size} bytes; the limit is {limits.max_source_bytes}"
    lines = source.count("\n") + 1
    if lines > limits.max_source_lines:
        return f"the program has {lines} lines; the limit is {limits.max_source_lines}"
    return None


def _sanitise(text: str) -> str:
    return _PATHLIKE.sub("<path>", text)


@dataclass(eq=False)  # identity semantics: kept in a set
class _Run:
    """Book-keeping for one live child (shared with ``cancel``)."""

    proc: subprocess.Popen
    cancelled: bool = False
    timed_out: bool = False
    reaped: bool = False
    # re-entrant: cancel() may run in a signal handler on the thread that holds the lock
    lock: threading.RLock = field(default_factory=threading.RLock)

    def kill(self) -> None:
        """SIGKILL the child's whole process group. Never after the leader is reaped: until then its
        zombie holds the group id, so the id cannot have been reused by an unrelated process."""
        with self.lock:
            if self.reaped:
                return
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Sandbox:
    """Runs untrusted Python programs in a separate, resource-limited process.

    >>> sb = Sandbox(SandboxLimits(wall_seconds=5))
    >>> sb.run("def solution():\\n    return 6 * 7").value
    42
    """

    def __init__(self, limits: SandboxLimits | None = None, *, python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        if not self.python:
            raise SandboxError(
                "cannot find a Python interpreter for the sandbox (sys.executable is empty)",
                hint="pass Sandbox(python='/path/to/python3')",
            )
        self._lock = threading.RLock()  # re-entrant for the same reason as _Run.lock
        self._runs: set[_Run] = set()

    # -- public API ---------------------------------------------------------------------------------
    def run(self, source: str, entry: str | None = "solution") -> SandboxResult:
        """Run ``source``; with ``entry`` call that function and return its value, with ``entry=None``
        run the module and return the variable ``answer`` (None if unset). Never raises for anything the
        program does; raises UsageError for a bad ``entry`` and SandboxError if no child can be started.
        A KeyboardInterrupt while waiting kills the child's process group, then propagates."""
        t0 = time.perf_counter()
        if not isinstance(source, str):
            raise UsageError(f"the program must be a str, not {type(source).__name__}")
        if entry is not None and (not _IDENTIFIER.fullmatch(entry) or entry in {"None", "True", "False"}):
            raise UsageError(
                f"entry {entry!r} is not a valid function name",
                hint="use a plain identifier such as 'solution', or entry=None to read the variable `answer`",
            )
        problem = check_source(source, self.limits)
        if problem is not None:
            return _failure("validation", problem, time.perf_counter() - t0)
        workdir = tempfile.mkdtemp(prefix="ragloop-sandbox-")
        try:
            return self._run_child(source.encode("utf-8"), entry, workdir, t0)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def cancel(self) -> int:
        """Kill every run in progress (their ``run`` calls return ``error_type="cancelled"``).
        Safe to call from another thread or a signal handler; returns how many runs were cancelled."""
        with self._lock:
            runs = list(self._runs)
        for r in runs:
            r.cancelled = True
            r.kill()
        return len(runs)

    def running_pids(self) -> list[int]:
        """Process ids (= process-group ids) of the children running now."""
        with self._lock:
            return [r.proc.pid for r in self._runs]

    # -- internals ----------------------------------------------------------------------------------
    def _run_child(self, payload: bytes, entry: str | None, workdir: str, t0: float) -> SandboxResult:
        cmd = [self.python, "-I", "-S", "-B", str(WORKER_PATH), json.dumps(self.limits.to_worker(entry))]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={},
                cwd=workdir,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise SandboxError(
                f"cannot start the sandbox interpreter {self.python}: {e}",
                hint="check that the Python interpreter exists and is executable",
            ) from e
        run = _Run(proc)
        with self._lock:
            self._runs.add(run)
        try:
            deadline = t0 + self.limits.wall_seconds
            out, err, why = self._communicate(proc, payload, deadline, run)
            status, cpu = self._reap(proc, deadline, run)
        except BaseException:
            run.kill()
            self._reap(proc, None, run)
            raise
        finally:
            with self._lock:
                self._runs.discard(run)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        return self._outcome(out, err, why, status, cpu, run, time.perf_counter() - t0)

    def _communicate(
        self, proc: subprocess.Popen, payload: bytes, deadline: float, run: _Run
    ) -> tuple[bytes, bytes, str | None]:
        """Write the program, read stdout/stderr until EOF; stop early on the deadline or overflow.
        Returns (stdout, stderr, reason) with reason in {None, "timeout", "output"}."""
        out_cap = 8 * self.limits.max_output_bytes + 65536  # the JSON line escapes captured text
        out, err = bytearray(), bytearray()
        sel = selectors.DefaultSelector()
        assert proc.stdin and proc.stdout and proc.stderr
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
        view = memoryview(payload)
        exited = False
        if view:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        try:
            while sel.get_map():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    run.kill()
                    return bytes(out), bytes(err), "timeout"
                # wake at least every 0.1 s so a Ctrl-C delivered to another thread is seen promptly
                events = sel.select(min(remaining, 0.1))
                if not events and not exited and _has_exited(proc.pid):
                    exited = True
                    run.kill()  # the child is gone; whatever is left of its group holds our pipes open
                for key, _ in events:
                    stream = key.fileobj
                    if stream is proc.stdin:
                        try:
                            n = os.write(proc.stdin.fileno(), view[:65536])
                        except BlockingIOError:
                            n = 0
                        except BrokenPipeError:  # the child stopped reading: it will say why
                            n, view = 0, view[:0]
                        view = view[n:]
                        if not view:
                            sel.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
                    try:
                        chunk = os.read(stream.fileno(), 65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(stream)
                        continue
                    if stream is proc.stdout:
                        out += chunk
                        if len(out) > out_cap:
                            run.kill()
                            return bytes(out[:out_cap]), bytes(err), "output"
                    elif len(err) < _STDERR_CAP:
                        err += chunk[: _STDERR_CAP - len(err)]
        finally:
            sel.close()
        return bytes(out), bytes(err), None

    def _reap(self, proc: subprocess.Popen, deadline: float | None, run: _Run) -> tuple[int, float]:
        """Wait for the child to exit (killing it at the deadline, which marks the run timed out), kill
        whatever is left of its process group, then collect it. Returns (wait status, CPU seconds)."""
        delay = 0.0005
        try:
            while True:
                flags = os.WEXITED | os.WNOWAIT | (os.WNOHANG if deadline is not None else 0)
                if os.waitid(os.P_PID, proc.pid, flags) is not None:
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    run.timed_out = True
                    run.kill()
                    deadline = None
                    continue
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            run.kill()  # nothing of the group may outlive the run
            with run.lock:
                _, status, usage = os.wait4(proc.pid, 0)
                run.reaped = True
        except ChildProcessError:  # already collected
            run.reaped = True
            return 0, 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        return status, usage.ru_utime + usage.ru_stime

    def _outcome(
        self, out: bytes, err: bytes, why: str | None, status: int, cpu: float, run: _Run, seconds: float
    ) -> SandboxResult:
        lim = self.limits
        if run.cancelled:
            return _failure("cancelled", "the run was cancelled", seconds)
        if why == "timeout" or run.timed_out:
            return _failure(
                "timeout", f"the program ran longer than {lim.wall_seconds:g} s (wall clock)", seconds
            )
        if why == "output":
            return _failure(
                "output_limit", f"the program wrote more than {lim.max_output_bytes} bytes", seconds
            )
        parsed = _parse_result(out)
        if parsed is not None:
            return SandboxResult(
                ok=parsed["ok"],
                value=parsed.get("value"),
                stdout=parsed.get("stdout", ""),
                error_type=parsed.get("error_type"),
                message=parsed.get("message"),
                seconds=seconds,
                line=parsed.get("line"),
            )
        # No result line: judge by how the child ended.
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= lim.cpu_seconds):
            return _failure("timeout", f"the program used more than {lim.cpu_seconds} s of CPU time", seconds)
        if code == _EXIT_MEMORY or b"MemoryError" in err:
            return _failure("memory", f"the program needed more than {lim.memory_mb} MiB", seconds)
        tail = _sanitise(err.decode("utf-8", "replace").strip().splitlines()[-1][:300]) if err.strip() else ""
        how = f"signal {signal.Signals(sig).name}" if sig else f"exit code {code}"
        log.warning("sandbox child ended without a result (%s): %s", how, tail)
        return _failure(
            "crashed",
            f"the sandbox process ended without a result ({how})" + (f": {tail}" if tail else ""),
            seconds,
        )


def _has_exited(pid: int) -> bool:
    """True once ``pid`` has exited (without collecting it, so its process-group id stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _parse_result(out: bytes) -> dict[str, Any] | None:
    """The child's single JSON result line, checked for shape; None if absent or malformed."""
    text = out.decode("utf-8", "replace").strip()
    if not text or "\n" in text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    if not data["ok"] and data.get("error_type") not in ERROR_TYPES:
        return None
    if not isinstance(data.get("stdout", ""), str) or not isinstance(data.get("message") or "", str):
        return None
    if data.get("line") is not None and not isinstance(data.get("line"), int):
        return None
    return data
