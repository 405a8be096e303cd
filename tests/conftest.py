"""Test-wide settings: offline by construction, a temporary ragloop home, shared model fixtures."""

from __future__ import annotations

import os
import socket

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails loudly (tests are offline by construction)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")) or self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise _NetworkBlocked(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def ragloop_home(tmp_path, monkeypatch):
    """A temporary RAGLOOP_HOME (the model cache stays shared, see RAGLOOP_CACHE)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("RAGLOOP_HOME", str(home))
    return home
