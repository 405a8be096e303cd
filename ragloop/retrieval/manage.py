"""Managing indexes: list them, list an index's documents, remove documents, delete an index.

Built on the store's public API only (``store.read_pointer``, ``generation_dirs``, ``Manifest``,
``load_snapshot``, ``writer_lock``) and on ``indexer.delete_documents``, so every change keeps the store's
promise: removing a document writes a new generation and swaps the one pointer (a crash leaves the old
index loadable), and deleting an index happens under the writer lock, after an atomic rename, so a reader
or a concurrent writer never sees half an index.

``delete_index`` refuses a directory that does not look like a ragloop index (anything but ``CURRENT``,
``CURRENT.tmp``, ``LOCK`` and ``gen-*`` directories in it), so a mistyped ``--index ~/Documents`` cannot
remove a user's files.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragloop.core.config import ragloop_home
from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval.indexer import IndexSummary, delete_documents
from ragloop.retrieval.loaders import display_path
from ragloop.retrieval.store import (
    MANIFEST,
    POINTER,
    Manifest,
    generation_dirs,
    load_snapshot,
    read_pointer,
    resolve_index_path,
    writer_lock,
)

_INDEX_ENTRIES = {POINTER, POINTER + ".tmp", "LOCK"}


@dataclass
class IndexInfo:
    """One index under ``$RAGLOOP_HOME/indexes`` (``error`` set, counts zero, when it cannot be read)."""

    name: str
    path: str
    documents: int
    chunks: int
    bytes: int
    updated: str  # when the current generation was written (local time)
    embedder: str
    generations: int
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DocumentInfo:
    doc_id: str
    source: str
    title: str
    chunks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def index_root(index: str | os.PathLike[str]) -> Path:
    return resolve_index_path(index) if isinstance(index, str) else Path(index)


def is_index_dir(path: Path) -> bool:
    """True when ``path`` holds only what a ragloop index holds (and at least a pointer or a generation)."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    gens = {p.name for _, p in generation_dirs(path)}
    return bool(names) and names <= (_INDEX_ENTRIES | gens) and bool(names & ({POINTER} | gens))


def index_info(root: Path, name: str | None = None) -> IndexInfo:
    """Counts, size and date of one index from its manifest (cheap: no vectors are loaded)."""
    gens = generation_dirs(root)
    try:
        ptr = read_pointer(root)
        if ptr is None:
            raise IndexStoreError("no CURRENT pointer (an indexing run never finished)")
        m = Manifest.model_validate_json((root / ptr.generation / MANIFEST).read_bytes())
    except (OSError, ValueError, IndexStoreError) as e:
        msg = e.message if isinstance(e, IndexStoreError) else str(e).splitlines()[0]
        return IndexInfo(name or root.name, str(root), 0, 0, _dir_size(root), "", "", len(gens), error=msg[:200])
    return IndexInfo(name or root.name, str(root), m.counts.documents, m.counts.chunks, _dir_size(root),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created_at)), m.embedder_name, len(gens))


def list_indexes(home: Path | None = None) -> list[IndexInfo]:
    """Every index under ``<home>/indexes`` (the bare names ``--index NAME`` resolves), sorted by name."""
    base = (home or ragloop_home()) / "indexes"
    if not base.is_dir():
        return []
    return [index_info(p, p.name) for p in sorted(base.iterdir()) if p.is_dir() and is_index_dir(p)]


def list_documents(index: str | os.PathLike[str]) -> list[DocumentInfo]:
    """The documents of an index with their chunk counts, in id order."""
    snap = load_snapshot(index_root(index))
    try:
        counts: dict[str, int] = {}
        for c in snap.docstore.all_chunks(parse_metadata=False):
            counts[c.doc_id] = counts.get(c.doc_id, 0) + 1
        docs = [DocumentInfo(d.doc_id, d.source, d.title, counts.get(d.doc_id, 0))
                for d in snap.docstore.documents(parse_metadata=False)]
    finally:
        snap.docstore.close()
    return sorted(docs, key=lambda d: d.doc_id)


def match_documents(known: list[str], path: str) -> list[str]:
    """The document ids that ``path`` names: the id itself, the id of that file (absolute path), or every
    document under that directory. ``match_documents(["/d/a.md", "/d/sub/b.md"], "/d/sub") -> ["/d/sub/b.md"]``
    """
    if path in known:
        return [path]
    absolute = display_path(os.path.abspath(os.path.expanduser(path)))
    if absolute in known:
        return [absolute]
    prefixes = tuple({p.rstrip("/") + "/" for p in (path, absolute)})
    return [k for k in known if k.startswith(prefixes)]


def remove_documents(index: str | os.PathLike[str], paths: list[str]) -> tuple[IndexSummary, list[str]]:
    """Remove the documents ``paths`` name (files, directories or ids) as a new generation; returns the
    summary and the ids removed. A path that names no document is an error (nothing is changed)."""
    root = index_root(index)
    known = [d.doc_id for d in list_documents(root)]
    ids: list[str] = []
    for p in paths:
        found = match_documents(known, p)
        if not found:
            raise UsageError(f"no document in {root} matches {p!r}",
                             hint=f"list them with: ragloop index --index {index} --docs")
        ids.extend(i for i in found if i not in ids)
    if len(ids) == len(known):
        raise UsageError(f"that would remove every document of {root}",
                         hint=f"delete the whole index instead: ragloop index --index {index} --delete")
    return delete_documents(root, ids), ids


def delete_index(index: str | os.PathLike[str]) -> Path:
    """Delete an index directory (all generations). Refuses anything that is not a ragloop index, and an
    index another process is writing. Returns the path deleted."""
    root = index_root(index)
    if not root.exists():
        raise UsageError(f"no index at {root}", hint="ragloop index --list shows the indexes")
    if not is_index_dir(root):
        raise UsageError(f"{root} does not look like a ragloop index (it holds other files); not deleting it",
                         hint="an index directory holds only CURRENT, LOCK and gen-* entries")
    trash = root.with_name(f".{root.name}.deleting-{os.getpid()}")
    with writer_lock(root):
        # one atomic rename: readers opening the name now get "no index", never a half-deleted one
        os.replace(root, trash)
    shutil.rmtree(trash)
    return root
