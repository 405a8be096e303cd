"""Crash-safe persistence of an index (SECURITY.md §2): generations, manifest, one atomic pointer, a lock.

Layout of an index directory::

    mydocs/
      CURRENT            {"generation": "gen-000007", "manifest_sha256": "..."}   (the one pointer)
      LOCK               flock()ed by the writer; holds its pid
      gen-000006/        the previous generation, kept until the next one is durable
      gen-000007/
        manifest.json    format version, embedder name + dimension, metric, counts, sha256 of every file
        vectors.faiss    faiss.serialize_index bytes
        docstore.sqlite  SQLite documents + chunks
        bm25/            bm25s arrays (.npy, no pickle) and JSON

A save writes a new generation directory (every file written, fsynced), fsyncs the directories, then
writes ``CURRENT.tmp``, fsyncs it, ``os.replace``s it over ``CURRENT`` and fsyncs the index directory.
A crash at any step leaves ``CURRENT`` naming a complete, verified generation: the old one before the
replace, the new one after. The promise: after a save returns, the new index survives a process crash;
if a save is interrupted at any point, the previous index is still loadable and unchanged
(``tests/retrieval/test_faults.py`` kills the writer at every step to check it). Readers resolve ``CURRENT`` once and load everything into memory, so they keep a
consistent snapshot while writers work. There is no pickle anywhere.

Every filesystem step of a save goes through ``StoreOps``; its ``hook`` runs before each step, which is how
the tests kill a writer (``os._exit``) or fill the disk (``OSError(ENOSPC)``) at step N.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ragloop.core.config import ragloop_home
from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import bm25 as bm25_mod
from ragloop.retrieval import faiss_index
from ragloop.retrieval.docstore import DocStore

log = logging.getLogger(__name__)

FORMAT = "ragloop-index"
FORMAT_VERSION = 1
POINTER = "CURRENT"
LOCK = "LOCK"
MANIFEST = "manifest.json"
VECTORS = "vectors.faiss"
DOCSTORE = "docstore.sqlite"
BM25_DIR = "bm25"
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_FILE_RE = re.compile(rf"^({re.escape(VECTORS)}|{re.escape(DOCSTORE)}|{BM25_DIR}/[A-Za-z0-9._-]+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_index_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A bare name (``mydocs``) means ``ragloop_home()/indexes/mydocs``; a path with a slash, ``~``, or an
    existing directory is used as is.

    ``resolve_index_path("./x") -> Path("./x")``; ``resolve_index_path("mydocs") -> ~/.ragloop/indexes/mydocs``
    """
    s = os.fspath(name_or_path)
    if not s:
        raise UsageError("the index name is empty", hint="pass --index NAME or --index PATH")
    if "/" in s or os.sep in s or s.startswith("~") or os.path.isdir(s):
        return Path(s).expanduser()
    if not _NAME_RE.match(s):
        raise UsageError(f"bad index name {s!r}: use letters, digits, '.', '_' and '-'",
                         hint="or give a path such as ./myindex")
    return ragloop_home() / "indexes" / s


# ----------------------------------------------------------------------------------------------------------
# Filesystem steps (fault-injection surface)

StepKind = Literal["mkdir", "open", "write", "fsync", "fsync_dir", "replace", "remove"]


@dataclass
class StoreOps:
    """The filesystem steps of a save. ``hook(step_number, kind, path)`` runs before each step (tests only)."""

    hook: Callable[[int, str, str], None] | None = None
    steps: int = 0

    def _step(self, kind: StepKind, path: Path) -> None:
        self.steps += 1
        if self.hook is not None:
            self.hook(self.steps, kind, str(path))

    def mkdir(self, path: Path) -> None:
        self._step("mkdir", path)
        os.mkdir(path)

    def write_file(self, path: Path, data: bytes) -> None:
        """Create ``path`` (it must not exist), write ``data``, fsync. The ``write`` step falls mid-file."""
        self._step("open", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            half = len(data) // 2
            _write_all(fd, data[:half])
            self._step("write", path)  # a crash here leaves a torn file
            _write_all(fd, data[half:])
            self._step("fsync", path)
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        self._step("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._step("replace", dst)
        os.replace(src, dst)

    def remove_tree(self, path: Path) -> None:
        self._step("remove", path)
        shutil.rmtree(path, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ----------------------------------------------------------------------------------------------------------
# Lock


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the index's writer lock (``flock`` on ``LOCK``); a second writer fails at once naming the holder."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise IndexStoreError(
                f"index {root} is being written by another process (pid {holder})",
                hint="wait for that indexing run to finish, or stop it; only one writer at a time",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock (the kernel also releases it if the process dies)


# ----------------------------------------------------------------------------------------------------------
# Manifest and pointer


class FileEntry(BaseModel):
    sha256: str
    size: int


class Counts(BaseModel):
    documents: int
    chunks: int


class Manifest(BaseModel):
    """What a generation holds; read from disk, so validated."""

    format: Literal["ragloop-index"]
    format_version: int
    generation: int
    created_at: float
    embedder: dict[str, Any]  # at least name, dimension (see Embedder.spec)
    metric: Literal["inner_product"] = "inner_product"
    faiss: dict[str, Any]
    chunking: dict[str, Any]
    bm25: dict[str, Any]
    counts: Counts
    files: dict[str, FileEntry]

    @property
    def embedder_name(self) -> str:
        return str(self.embedder.get("name", ""))

    @property
    def dimension(self) -> int:
        return int(self.embedder.get("dimension", 0))


class Pointer(BaseModel):
    generation: str
    manifest_sha256: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pointer(root: Path) -> Pointer | None:
    """The current pointer, or None when the index has none yet. A damaged pointer is an error."""
    p = root / POINTER
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IndexStoreError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        ptr = Pointer.model_validate_json(data)
    except ValidationError:
        raise IndexStoreError(f"the index pointer {p} is damaged", hint=_rebuild_hint(root)) from None
    if not _GEN_RE.match(ptr.generation):
        raise IndexStoreError(f"the index pointer {p} names an invalid generation {ptr.generation!r}",
                              hint=_rebuild_hint(root))
    return ptr


def _rebuild_hint(root: Path) -> str:
    return f"re-create it from your documents: ragloop index PATHS --index {root} --rebuild"


def generation_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _GEN_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# Saving


@dataclass
class GenerationPayload:
    """The files of a new generation, as bytes, plus manifest fields."""

    files: dict[str, bytes]  # relative path -> content
    embedder: dict[str, Any]
    faiss: dict[str, Any]
    chunking: dict[str, Any]
    bm25: dict[str, Any]
    counts: Counts
    extra: dict[str, Any] = field(default_factory=dict)


def save_generation(root: Path, payload: GenerationPayload, ops: StoreOps | None = None) -> int:
    """Write ``payload`` as a new generation and make it current; returns its number.

    The caller holds ``writer_lock(root)``. On any error before the pointer is replaced, the partial
    generation is removed and the previous one stays current, untouched.
    """
    ops = ops or StoreOps()
    for rel in payload.files:
        if not _FILE_RE.match(rel):
            raise ValueError(f"unexpected index file name {rel!r}")
    ptr = read_pointer(root)
    current = int(_GEN_RE.match(ptr.generation).group(1)) if ptr else None  # type: ignore[union-attr]
    # Leftovers of crashed writers: any generation newer than the current one was never published.
    for num, path in generation_dirs(root):
        if current is None or num > current:
            log.info("removing unpublished generation %s left by an interrupted writer", path)
            ops.remove_tree(path)
    gens = generation_dirs(root)
    number = (gens[-1][0] if gens else 0) + 1
    gen_dir = root / f"gen-{number:06d}"
    tmp_pointer = root / f"{POINTER}.tmp"
    try:
        if tmp_pointer.exists():
            tmp_pointer.unlink()
        ops.mkdir(gen_dir)
        if any(rel.startswith(BM25_DIR + "/") for rel in payload.files):
            ops.mkdir(gen_dir / BM25_DIR)
        entries = {}
        for rel, data in sorted(payload.files.items()):
            ops.write_file(gen_dir / rel, data)
            entries[rel] = FileEntry(sha256=_sha256(data), size=len(data))
        manifest = Manifest(
            format=FORMAT, format_version=FORMAT_VERSION, generation=number, created_at=time.time(),
            embedder=payload.embedder, faiss=payload.faiss, chunking=payload.chunking, bm25=payload.bm25,
            counts=payload.counts, files=entries,
        )
        manifest_bytes = (json.dumps(manifest.model_dump(), indent=1, sort_keys=True) + "\n").encode("utf-8")
        ops.write_file(gen_dir / MANIFEST, manifest_bytes)
        if (gen_dir / BM25_DIR).is_dir():
            ops.fsync_dir(gen_dir / BM25_DIR)
        ops.fsync_dir(gen_dir)
        ops.fsync_dir(root)
        pointer = Pointer(generation=gen_dir.name, manifest_sha256=_sha256(manifest_bytes))
        ops.write_file(tmp_pointer, (pointer.model_dump_json() + "\n").encode("utf-8"))
    except OSError as e:
        shutil.rmtree(gen_dir, ignore_errors=True)
        tmp_pointer.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise IndexStoreError(f"disk full while saving the index {root}; the previous index is unchanged",
                                  hint="free some space and run the command again") from None
        raise IndexStoreError(f"could not save the index {root}: {e.strerror or e}; "
                              "the previous index is unchanged") from None
    try:
        ops.replace(tmp_pointer, root / POINTER)  # the commit point
        ops.fsync_dir(root)
    except OSError as e:
        raise IndexStoreError(f"could not publish generation {gen_dir.name} of {root}: {e.strerror or e}") from None
    # Keep the previous generation (readers may still be loading it); drop anything older.
    for num, path in generation_dirs(root):
        if num != number and num != current:
            try:
                ops.remove_tree(path)
            except OSError as e:  # garbage collection is best effort
                log.warning("could not remove old generation %s: %s", path, e)
    return number


# ----------------------------------------------------------------------------------------------------------
# Loading and verification


@dataclass
class Snapshot:
    """One loaded, verified generation: everything in memory, independent of later writes."""

    root: Path
    generation: str
    manifest: Manifest
    faiss: Any
    docstore: DocStore
    bm25: Any

    @property
    def n_chunks(self) -> int:
        return self.manifest.counts.chunks


def _read_verified(gen_dir: Path, rel: str, entry: FileEntry, root: Path) -> bytes:
    path = gen_dir / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise IndexStoreError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) != entry.size or _sha256(data) != entry.sha256:
        raise IndexStoreError(
            f"index file {path} is damaged (size {len(data)} vs {entry.size} expected, or its sha256 differs)",
            hint=_rebuild_hint(root),
        )
    return data


def _load_generation(root: Path, ptr: Pointer) -> Snapshot:
    gen_dir = root / ptr.generation
    manifest_path = gen_dir / MANIFEST
    manifest_bytes = manifest_path.read_bytes()  # FileNotFoundError -> caller retries
    if _sha256(manifest_bytes) != ptr.manifest_sha256:
        raise IndexStoreError(f"the manifest {manifest_path} is damaged (sha256 differs from {POINTER})",
                              hint=_rebuild_hint(root))
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as e:
        raise IndexStoreError(f"the manifest {manifest_path} is invalid: {e.errors()[0]['msg']}",
                              hint=_rebuild_hint(root)) from None
    if manifest.format_version != FORMAT_VERSION:
        raise IndexStoreError(f"index {root} has format version {manifest.format_version}; this ragloop reads "
                              f"version {FORMAT_VERSION}", hint=_rebuild_hint(root))
    names = set(manifest.files)
    required = {VECTORS, DOCSTORE}
    if not required <= names or not all(_FILE_RE.match(n) for n in names):
        raise IndexStoreError(f"the manifest {manifest_path} lists unexpected files {sorted(names)}",
                              hint=_rebuild_hint(root))
    what = f"{gen_dir}"
    data = {rel: _read_verified(gen_dir, rel, entry, root) for rel, entry in manifest.files.items()}
    counts = manifest.counts
    index = faiss_index.deserialize(data[VECTORS], what=str(gen_dir / VECTORS))
    problems = []
    if index.d != manifest.dimension:
        problems.append(f"vectors have dimension {index.d}, the manifest says {manifest.dimension}")
    if index.ntotal != counts.chunks:
        problems.append(f"{index.ntotal} vectors for {counts.chunks} chunks")
    docstore = DocStore(data[DOCSTORE], what=str(gen_dir / DOCSTORE))
    n_docs, n_chunks = docstore.counts()
    if (n_docs, n_chunks) != (counts.documents, counts.chunks):
        problems.append(f"docstore holds {n_docs} documents / {n_chunks} chunks, the manifest says "
                        f"{counts.documents} / {counts.chunks}")
    problems += docstore.check_consistency()
    bm25 = None
    if any(n.startswith(BM25_DIR + "/") for n in names):
        bm25 = bm25_mod.load_bm25(gen_dir / BM25_DIR)
        if bm25_mod.bm25_num_docs(bm25) != counts.chunks:
            problems.append(f"BM25 index has {bm25_mod.bm25_num_docs(bm25)} documents for {counts.chunks} chunks")
    if problems:
        docstore.close()
        raise IndexStoreError(f"index {what} is inconsistent: {'; '.join(problems)}", hint=_rebuild_hint(root))
    faiss_index.configure_search(index, faiss_index.FaissConfig(**manifest.faiss))
    return Snapshot(root, ptr.generation, manifest, index, docstore, bm25)


def load_snapshot(root: Path, *, attempts: int = 3) -> Snapshot:
    """Resolve ``CURRENT`` once and load that generation, verifying hashes, counts and dimensions.

    If a concurrent writer garbage-collects the generation while it is being read (the pointer moved on
    twice meanwhile), the pointer is resolved again.
    """
    if not root.is_dir():
        raise IndexStoreError(f"no index at {root}", hint=f"create it with: ragloop index PATHS --index {root}")
    for attempt in range(attempts):
        ptr = read_pointer(root)
        if ptr is None:
            raise IndexStoreError(f"{root} holds no index (no {POINTER} file)",
                                  hint=f"create it with: ragloop index PATHS --index {root}")
        try:
            return _load_generation(root, ptr)
        except FileNotFoundError as e:
            again = read_pointer(root)
            if again is not None and again != ptr and attempt + 1 < attempts:
                continue
            raise IndexStoreError(f"index file {e.filename} is missing", hint=_rebuild_hint(root)) from None
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------
# Stats and verify


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def index_stats(root: Path) -> dict[str, Any]:
    """Documents, chunks, embedder, dimension, size and generations of an index (loads and verifies it)."""
    snap = load_snapshot(root)
    try:
        m = snap.manifest
        gens = [{"generation": p.name, "current": p.name == snap.generation, "bytes": _dir_size(p)}
                for _, p in generation_dirs(root)]
        return {
            "index": str(root), "generation": snap.generation, "documents": m.counts.documents,
            "chunks": m.counts.chunks, "embedder": m.embedder_name, "dimension": m.dimension,
            "faiss": m.faiss.get("kind", "flat"), "chunking": m.chunking,
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at)),
            "bytes": _dir_size(root / snap.generation), "total_bytes": _dir_size(root), "generations": gens,
        }
    finally:
        snap.docstore.close()


def verify_index(root: Path) -> dict[str, Any]:
    """Full integrity check of the current generation (raises ``IndexStoreError``) and a hash check of the
    others, reported per generation."""
    snap = load_snapshot(root)
    snap.docstore.close()
    report: dict[str, Any] = {"index": str(root), "current": snap.generation, "documents":
                              snap.manifest.counts.documents, "chunks": snap.manifest.counts.chunks,
                              "files_checked": len(snap.manifest.files) + 2, "generations": {}}
    for _, path in generation_dirs(root):
        if path.name == snap.generation:
            report["generations"][path.name] = "ok (current)"
            continue
        try:
            manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
            for rel, entry in manifest.files.items():
                _read_verified(path, rel, entry, root)
            report["generations"][path.name] = "ok (previous)"
        except (OSError, ValidationError, IndexStoreError) as e:
            report["generations"][path.name] = f"damaged or incomplete: {str(e)[:160]}"
    return report
