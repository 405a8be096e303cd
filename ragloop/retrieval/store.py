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
import hmac
import json
import logging
import os
import re
import secrets
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
SIGNATURE = "manifest.sig"  # optional: HMAC-SHA256 of manifest.json with the local key (``--sign``)
KEY_FILE = "index.key"
SIGNED_REGISTRY = "signed-indexes.json"
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
# Keyed manifest (opt-in tamper evidence)
#
# The sha256 hashes in the manifest and pointer catch accidental damage (a torn write, a flipped bit, a
# truncated copy); anyone who can write the index can recompute them. A signed index also carries
# manifest.sig = HMAC-SHA256(key, manifest.json) (RFC 2104, Python's hmac) with a 32-byte key that never leaves
# ~/.ragloop/index.key (created 0600): editing any file then needs the key. Stripping the signature is caught
# for indexes this key signed (they are listed next to the key, in signed-indexes.json). Not promised: a
# rollback to an older generation signed with the same key, or an attacker who can read the key.


def key_path() -> Path:
    """The local index key: ``$RAGLOOP_INDEX_KEY`` or ``ragloop_home()/index.key``."""
    env = os.environ.get("RAGLOOP_INDEX_KEY")
    return Path(env).expanduser() if env else ragloop_home() / KEY_FILE


def load_key(*, create: bool = False) -> bytes:
    """The index key (32 random bytes, stored hex). ``create``: make one (mode 0600) if there is none."""
    path = key_path()
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            raise IndexStoreError(f"this index is signed but there is no key at {path}",
                                  hint="restore the key file, or re-create the index with --rebuild") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return load_key()
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created the index signing key %s (mode 0600)", path)
        return load_key()
    except (OSError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"cannot read the index key {path}: {e}") from None
    if path.stat().st_mode & 0o077:
        raise IndexStoreError(f"the index key {path} is readable by other users",
                              hint=f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise IndexStoreError(f"the index key {path} is not a hex key of 16+ bytes",
                              hint="move it away; the next `ragloop index --sign` creates a new one")
    return key


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"ragloop-index-key-id:" + key).hexdigest()[:16]


def signature_bytes(key: bytes, manifest_bytes: bytes) -> bytes:
    """``manifest.sig``: ``{"alg": "HMAC-SHA256", "key_id": …, "mac": hex}`` over the manifest's bytes."""
    mac = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    return (json.dumps({"alg": "HMAC-SHA256", "key_id": _key_id(key), "mac": mac}) + "\n").encode("ascii")


def _registry_path() -> Path:
    return key_path().with_name(SIGNED_REGISTRY)


def _signed_roots() -> set[str]:
    try:
        data = json.loads(_registry_path().read_text(encoding="utf-8"))
        return {str(p) for p in data.get("indexes", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def is_registered_signed(root: Path) -> bool:
    """Whether this machine's key signed the index at ``root`` (its signature is then required)."""
    return str(root.resolve()) in _signed_roots()


def register_signed(root: Path) -> None:
    roots = _signed_roots() | {str(root.resolve())}
    path = _registry_path()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"indexes": sorted(roots)}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_signature(root: Path, gen_dir: Path, manifest_bytes: bytes) -> str | None:
    """Verify ``manifest.sig`` when there is one (or when this key signed the index); returns the key id of a
    valid signature, None for an unsigned index. A bad or missing signature is an ``IndexStoreError``."""
    sig_path = gen_dir / SIGNATURE
    try:
        raw = sig_path.read_bytes()
    except FileNotFoundError:
        if is_registered_signed(root):
            raise IndexStoreError(f"{gen_dir} has no {SIGNATURE}, but this index was signed with your key: "
                                  "its files were replaced or the signature removed", hint=_rebuild_hint(root)) from None
        return None
    try:
        sig = json.loads(raw)
        alg, key_id, mac = sig["alg"], sig["key_id"], sig["mac"]
    except (ValueError, KeyError, TypeError):
        raise IndexStoreError(f"the signature {sig_path} is damaged", hint=_rebuild_hint(root)) from None
    key = load_key()
    if alg != "HMAC-SHA256" or key_id != _key_id(key):
        raise IndexStoreError(f"{sig_path} was made with another key ({key_id}; yours is {_key_id(key)})",
                              hint="use the key that signed it (RAGLOOP_INDEX_KEY), or re-index with --rebuild")
    expected = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(mac), expected):
        raise IndexStoreError(f"the manifest of {gen_dir} does not match its signature: the index was changed "
                              "without the key", hint=_rebuild_hint(root))
    return key_id


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


def save_generation(
    root: Path, payload: GenerationPayload, ops: StoreOps | None = None, *, keep: str | None = None,
    sign: bool | None = None,
) -> int:
    """Write ``payload`` as a new generation and make it current; returns its number.

    The caller holds ``writer_lock(root)``. On any error before the pointer is replaced, the partial
    generation is removed and the previous one stays current, untouched. Afterwards one older generation
    is kept — ``keep`` (the generation the caller loaded and verified), else the newest one that verifies —
    and the others are removed: a damaged generation is never kept in place of the last good one.
    ``sign``: write ``manifest.sig`` (HMAC-SHA256 with the local key); None = sign if the index is signed.
    """
    ops = ops or StoreOps()
    for rel in payload.files:
        if not _FILE_RE.match(rel):
            raise ValueError(f"unexpected index file name {rel!r}")
    try:
        ptr, pointer_ok = read_pointer(root), True
    except IndexStoreError:  # a damaged pointer (--rebuild repairs it): nothing is known to be unpublished
        ptr, pointer_ok = None, False
    current = int(_GEN_RE.match(ptr.generation).group(1)) if ptr else None  # type: ignore[union-attr]
    # Leftovers of crashed writers: any generation newer than the current one was never published.
    for num, path in generation_dirs(root):
        if pointer_ok and (current is None or num > current):
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
        if sign or (sign is None and is_registered_signed(root)):
            ops.write_file(gen_dir / SIGNATURE, signature_bytes(load_key(create=True), manifest_bytes))
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
    # Keep the last good previous generation (readers may still be loading it; it is the fallback if the new
    # one is ever damaged); drop the others, damaged ones included.
    older = [(num, path) for num, path in reversed(generation_dirs(root)) if num != number]
    kept = keep if keep is not None and any(p.name == keep for _, p in older) else None
    if kept is None:
        kept = next((p.name for _, p in older if generation_intact(root, p)), None)
    for _num, path in older:
        if path.name != kept:
            try:
                ops.remove_tree(path)
            except OSError as e:  # garbage collection is best effort
                log.warning("could not remove old generation %s: %s", path, e)
    if sign:  # after the GC: the unsigned generation kept above stays (the signature is required from now on)
        register_signed(root)
    return number


def generation_intact(root: Path, gen_dir: Path) -> bool:
    """Whether a generation's manifest parses, its signature (if the index is signed) holds and every file
    matches its recorded size and sha256 (a cheap check: no FAISS or SQLite load)."""
    try:
        manifest_bytes = (gen_dir / MANIFEST).read_bytes()
        check_signature(root, gen_dir, manifest_bytes)
        manifest = Manifest.model_validate_json(manifest_bytes)
        for rel, entry in manifest.files.items():
            if not _FILE_RE.match(rel):
                return False
            _read_verified(gen_dir, rel, entry, root)
    except (OSError, ValidationError, IndexStoreError):
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Loading and verification


@dataclass
class Snapshot:
    """One loaded, verified generation: everything in memory, independent of later writes.

    ``fallback_from`` names the current generation when it was damaged and this older, intact one is
    served instead (``fallback_reason`` says what was wrong with it)."""

    root: Path
    generation: str
    manifest: Manifest
    faiss: Any
    docstore: DocStore
    bm25: Any
    fallback_from: str | None = None
    fallback_reason: str | None = None

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


def _load_generation(root: Path, ptr: Pointer | None, gen_name: str | None = None) -> Snapshot:
    """Load and verify one generation: the pointer's (its manifest hash must match), or ``gen_name`` (an older
    generation, whose manifest is checked by its own hashes, its signature and the counts)."""
    gen_dir = root / (ptr.generation if ptr is not None else str(gen_name))
    manifest_path = gen_dir / MANIFEST
    manifest_bytes = manifest_path.read_bytes()  # FileNotFoundError -> caller retries
    if ptr is not None and _sha256(manifest_bytes) != ptr.manifest_sha256:
        raise IndexStoreError(f"the manifest {manifest_path} is damaged (sha256 differs from {POINTER})",
                              hint=_rebuild_hint(root))
    check_signature(root, gen_dir, manifest_bytes)
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
    return Snapshot(root, gen_dir.name, manifest, index, docstore, bm25)


def _generation_number(name: str) -> int:
    m = _GEN_RE.match(name)
    return int(m.group(1)) if m else -1


def _load_fallback(root: Path, ptr: Pointer, damage: str) -> Snapshot | None:
    """The newest intact generation older than the damaged current one, or None when there is none.

    Only *older* generations qualify: a newer one was never published (a crashed writer's leftover)."""
    current = _generation_number(ptr.generation)
    for num, path in reversed(generation_dirs(root)):
        if num >= current:
            continue
        try:
            snap = _load_generation(root, None, path.name)
        except (OSError, IndexStoreError):
            continue
        snap.fallback_from, snap.fallback_reason = ptr.generation, damage
        log.warning("index %s: generation %s is damaged (%s); serving the previous intact generation %s — "
                    "re-index to repair it", root, ptr.generation, damage, path.name)
        return snap
    return None


def load_snapshot(root: Path, *, attempts: int = 3, fallback: bool = True) -> Snapshot:
    """Resolve ``CURRENT`` once and load that generation, verifying hashes, counts and dimensions.

    If a concurrent writer garbage-collects the generation while it is being read (the pointer moved on
    twice meanwhile), the pointer is resolved again. If the current generation is damaged and ``fallback``,
    the newest intact older generation is served with a warning (``Snapshot.fallback_from``); with none,
    or with a damaged pointer, the damage is the error.
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
            err = IndexStoreError(f"index file {e.filename} is missing", hint=_rebuild_hint(root))
        except IndexStoreError as e:
            err = e
        if fallback and (snap := _load_fallback(root, ptr, err.message)) is not None:
            return snap
        raise err from None
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
    """Full integrity check of the generation a search would be served from (raises ``IndexStoreError`` when
    none is intact) and a hash check of the others, reported per generation. ``served`` names that
    generation; when the current one is damaged, ``fallback`` is true and its damage is reported."""
    snap = load_snapshot(root)
    snap.docstore.close()
    signed = check_signature(root, root / snap.generation, (root / snap.generation / MANIFEST).read_bytes())
    report: dict[str, Any] = {"index": str(root), "current": snap.fallback_from or snap.generation,
                              "served": snap.generation, "fallback": snap.fallback_from is not None,
                              "signature": f"ok (HMAC-SHA256, key {signed})" if signed else "none (unsigned index)",
                              "documents": snap.manifest.counts.documents, "chunks": snap.manifest.counts.chunks,
                              "files_checked": len(snap.manifest.files) + 2, "generations": {}}
    for _, path in generation_dirs(root):
        if path.name == snap.generation:
            report["generations"][path.name] = "ok (served, previous: the current one is damaged)" \
                if snap.fallback_from else "ok (current)"
        elif path.name == snap.fallback_from:
            report["generations"][path.name] = f"damaged (current): {str(snap.fallback_reason)[:200]}"
        else:
            report["generations"][path.name] = "ok (previous)" if generation_intact(root, path) else \
                "damaged or incomplete"
    return report
