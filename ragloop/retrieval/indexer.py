"""Building and incrementally updating an index, from files or from in-memory documents.

An update compares each document's content hash with the current generation: unchanged documents keep
their chunks, ids and vectors (nothing is re-embedded), changed documents get new chunks, documents that
disappeared are removed — but only within the scope of the run (the paths given, or the whole collection
for ``index_documents(..., replace=True)``), so indexing ``./docs`` never drops ``./notes.pdf``. Every run
writes at most one new generation through ``store.save_generation`` under the writer lock; a run that
changes nothing writes nothing. Per-file problems are counted in the ``IndexSummary``, never dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import bm25 as bm25_mod
from ragloop.retrieval import faiss_index
from ragloop.retrieval.chunking import Chunk, Chunker, ChunkingConfig
from ragloop.retrieval.docstore import ChunkRecord, DocumentRecord, build_docstore
from ragloop.retrieval.embeddings import Embedder, load_embedder
from ragloop.retrieval.loaders import (
    DEFAULT_MAX_FILE_BYTES,
    FileProblem,
    FileProblemError,
    SourceDocument,
    check_supported,
    discover_files,
    display_path,
    parse_file,
    read_file_bytes,
)
from ragloop.retrieval.store import (
    BM25_DIR,
    DOCSTORE,
    LOCK,
    POINTER,
    VECTORS,
    Counts,
    GenerationPayload,
    Snapshot,
    StoreOps,
    generation_dirs,
    load_snapshot,
    read_pointer,
    resolve_index_path,
    save_generation,
    writer_lock,
)

log = logging.getLogger(__name__)

EXIT_PARTIAL = 7  # the index was saved, but some files failed (see IndexSummary.errors)

ProgressCallback = Callable[[str, int, int], None]  # (stage: "read" | "embed", done, total)


@dataclass
class IndexConfig:
    """Settings of an indexing run. ``None`` for chunking/faiss/bm25 means: the index's own, or the default."""

    chunking: ChunkingConfig | None = None
    faiss: faiss_index.FaissConfig | None = None
    bm25: bm25_mod.BM25Config | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files are skipped ("too large")
    follow_symlinks: bool = False  # inside directories; paths named explicitly are always followed
    include_hidden: bool = False  # dot-files and dot-directories (.git, .venv, ...)
    rebuild: bool = False  # ignore the current generation: re-chunk and re-embed everything
    embed_batch: int = 512  # chunks per embedding call (progress granularity; sorting by length is per call)
    warn_chunks_per_file: int = 5000  # warn (before embedding) about a file cut into more chunks; 0 = never
    sign: bool = False  # write an HMAC-signed manifest (store.py: keyed tamper evidence); signed indexes stay so


class ProblemReport(BaseModel):
    path: str
    reason: str
    detail: str = ""


class IndexSummary(BaseModel):
    """What an indexing run did. ``exit_code``: 0, or ``EXIT_PARTIAL`` when some files failed."""

    index: str
    generation: str | None
    changed: bool
    documents: int
    chunks: int
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks_embedded: int = 0
    skipped: dict[str, list[str]] = {}
    errors: list[ProblemReport] = []
    warnings: list[str] = []  # e.g. a file cut into very many chunks (said before embedding it)
    embedder: str = ""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.errors else 0


@dataclass
class _Candidate:
    """A document found in this run; ``load`` parses it only if its content changed."""

    doc_id: str
    content_hash: str
    load: Callable[[], SourceDocument]


@dataclass
class _Run:
    root: Path
    candidates: list[_Candidate]
    in_scope: Callable[[str], bool]  # old documents in scope but not found are removed
    keep: set[str] = field(default_factory=set)  # found but failed (transient errors): keep the old version
    problems: list[FileProblem] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def build_index(
    paths: Sequence[str | os.PathLike[str]],
    index_path: str | os.PathLike[str],
    *,
    embedder: Embedder | None = None,
    config: IndexConfig | None = None,
    progress: ProgressCallback | None = None,
    store_ops: StoreOps | None = None,
) -> IndexSummary:
    """Index files and directories into ``index_path`` (a path, or a bare name under ``~/.ragloop/indexes``).

    Incremental: only new or changed files are embedded; files deleted under ``paths`` are removed.
    Raises ``UsageError`` for a missing path or when nothing indexable is found (the index is unchanged).
    ``store_ops`` is the fault-injection hook of the tests.
    """
    config = config or IndexConfig()
    if not paths:
        raise UsageError("no paths to index", hint="give one or more files or directories")
    root = resolve_index_path(index_path) if isinstance(index_path, str) else Path(index_path)
    files, problems = discover_files(paths, follow_symlinks=config.follow_symlinks,
                                     include_hidden=config.include_hidden)
    scopes = [display_path(os.path.abspath(os.fspath(p))) for p in paths]
    own = os.path.abspath(root) + os.sep  # never index the index itself (it may live under a given path)
    files = [f for f in files if not (os.path.abspath(f) + os.sep).startswith(own)]

    def in_scope(doc_id: str) -> bool:
        return any(doc_id == s or doc_id.startswith(s.rstrip("/") + "/") for s in scopes)

    run = _Run(root, [], in_scope, problems=problems)
    for i, path in enumerate(files):
        if progress:
            progress("read", i, len(files))
        doc_id = display_path(path)
        try:
            check_supported(path)
            data = read_file_bytes(path, config.max_file_bytes)
        except FileProblemError as e:
            run.problems.append(e.problem)
            if e.problem.kind == "error":
                run.keep.add(doc_id)
            continue
        h = hashlib.sha256(data).hexdigest()
        run.candidates.append(_Candidate(doc_id, h, lambda p=path, d=data, h=h: parse_file(p, d, h)))
    if progress:
        progress("read", len(files), len(files))
    return _update(run, embedder, config, progress, store_ops, what=", ".join(map(str, paths)))


def index_documents(
    documents: Iterable[SourceDocument],
    index_path: str | os.PathLike[str],
    *,
    embedder: Embedder | None = None,
    config: IndexConfig | None = None,
    replace: bool = True,
    progress: ProgressCallback | None = None,
    store_ops: StoreOps | None = None,
) -> IndexSummary:
    """Index in-memory documents (e.g. ``read_beir_corpus('.../scifact/corpus.jsonl')``).

    ``replace=True``: the index becomes exactly these documents (unchanged ones are not re-embedded);
    ``replace=False``: add or update these, keep all others.
    """
    config = config or IndexConfig()
    root = resolve_index_path(index_path) if isinstance(index_path, str) else Path(index_path)
    docs = list(documents)
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UsageError(f"document id {dup!r} appears more than once", hint="document ids must be unique")
    run = _Run(root, [_Candidate(d.doc_id, d.content_hash, lambda d=d: d) for d in docs],
               (lambda _id: True) if replace else (lambda _id: False))
    return _update(run, embedder, config, progress, store_ops, what=f"{len(docs)} documents")


def delete_documents(
    index_path: str | os.PathLike[str], doc_ids: Iterable[str], *, store_ops: StoreOps | None = None
) -> IndexSummary:
    """Remove documents by id (a new generation); unknown ids are ignored. Removing all is refused."""
    root = resolve_index_path(index_path) if isinstance(index_path, str) else Path(index_path)
    gone = set(doc_ids)
    run = _Run(root, [], lambda doc_id: doc_id in gone)
    return _update(run, None, IndexConfig(), None, store_ops, what="delete", allow_only_removals=True)


# ----------------------------------------------------------------------------------------------------------
# The update


def _settings(old: Snapshot | None, config: IndexConfig) -> tuple[ChunkingConfig, faiss_index.FaissConfig,
                                                                   bm25_mod.BM25Config]:
    """Settings for the new generation: explicit ones win for FAISS; chunking and BM25 must match the index."""
    if old is None:
        return (config.chunking or ChunkingConfig(), config.faiss or faiss_index.FaissConfig(),
                config.bm25 or bm25_mod.BM25Config())
    m = old.manifest
    old_chunking = ChunkingConfig(**m.chunking)
    if config.chunking is not None and config.chunking != old_chunking:
        raise UsageError(
            f"index {old.root} was built with chunks of {old_chunking.chunk_tokens} tokens "
            f"(overlap {old_chunking.chunk_overlap}); changing that needs re-embedding everything",
            hint="add --rebuild to re-create the index with the new settings",
        )
    old_bm25 = bm25_mod.BM25Config.from_json(m.bm25)
    return old_chunking, config.faiss or faiss_index.FaissConfig(**m.faiss), config.bm25 or old_bm25


def _check_embedder(old: Snapshot, embedder: Embedder) -> None:
    m = old.manifest
    if embedder.name != m.embedder_name or embedder.dimension != m.dimension:
        raise IndexStoreError(
            f"index {old.root} was built with embedder {m.embedder_name!r} (dimension {m.dimension}); "
            f"this run uses {embedder.name!r} (dimension {embedder.dimension})",
            hint="use the same --embedder, a new --index, or --rebuild to re-embed everything",
        )


def _update(
    run: _Run,
    embedder: Embedder | None,
    config: IndexConfig,
    progress: ProgressCallback | None,
    store_ops: StoreOps | None,
    *,
    what: str,
    allow_only_removals: bool = False,
) -> IndexSummary:
    started = time.perf_counter()
    _check_target(run.root)
    created = not run.root.exists()
    try:
        with writer_lock(run.root):
            old = None
            if not config.rebuild and read_pointer(run.root) is not None:
                old = load_snapshot(run.root)  # a damaged current generation: its last intact one
            try:
                return _update_locked(run, old, embedder, config, progress, store_ops, what, allow_only_removals,
                                      started)
            finally:
                if old is not None:
                    old.docstore.close()
    except BaseException:
        _clean_failed_new_index(run.root, created)
        raise


def _clean_failed_new_index(root: Path, created: bool) -> None:
    """A first run that failed (nothing to index, bad input, Ctrl-C) leaves no LOCK or directory behind."""
    try:
        if (root / POINTER).exists() or generation_dirs(root):
            return
        (root / LOCK).unlink(missing_ok=True)
        (root / f"{POINTER}.tmp").unlink(missing_ok=True)
        if created:
            root.rmdir()  # only if empty: never removes anything the user put there
    except OSError:
        pass


def _check_target(root: Path) -> None:
    """A new index goes into a missing or empty directory: never litter (or later index) a user's folder."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"index path {root} exists and is not a directory", hint="choose another --index")
    try:
        has_pointer = read_pointer(root) is not None
    except IndexStoreError:  # a damaged pointer: it is an index (--rebuild repairs it, loading says so)
        has_pointer = True
    if root.is_dir() and not has_pointer:
        strangers = [p.name for p in root.iterdir()
                     if p.name not in ("LOCK", "CURRENT.tmp") and not p.name.startswith("gen-")]
        if strangers:
            raise UsageError(f"{root} is not an index and not empty (it holds {strangers[0]!r}, ...)",
                             hint="choose a new or empty directory for --index, or a bare name like mydocs")


def _update_locked(
    run: _Run,
    old: Snapshot | None,
    embedder: Embedder | None,
    config: IndexConfig,
    progress: ProgressCallback | None,
    store_ops: StoreOps | None,
    what: str,
    allow_only_removals: bool,
    started: float,
) -> IndexSummary:
    if old is None and allow_only_removals:
        raise IndexStoreError(f"no index at {run.root}")
    if old is None and not run.candidates:
        _raise_nothing(run, what)
    chunking, faiss_cfg, bm25_cfg = _settings(old, config)
    if embedder is not None and old is not None:
        _check_embedder(old, embedder)

    old_hashes = old.docstore.document_hashes() if old else {}
    found = {c.doc_id for c in run.candidates}
    new_docs: list[SourceDocument] = []
    unchanged: list[str] = []
    added = updated = 0
    for cand in run.candidates:
        if old_hashes.get(cand.doc_id) == cand.content_hash:
            unchanged.append(cand.doc_id)
            continue
        try:
            doc = cand.load()
        except FileProblemError as e:
            run.problems.append(e.problem)
            if e.problem.kind == "error":
                run.keep.add(cand.doc_id)
            continue
        new_docs.append(doc)
        if cand.doc_id in old_hashes:
            updated += 1
        else:
            added += 1
    if not new_docs and not unchanged and not allow_only_removals:
        _raise_nothing(run, what)
    replaced = {d.doc_id for d in new_docs}
    kept_old = [d for d in old_hashes
                if d not in replaced and (d in found or d in run.keep or not run.in_scope(d))]
    removed = len(old_hashes) - len(kept_old) - updated
    settings_changed = old is not None and (faiss_cfg.__dict__ != old.manifest.faiss
                                            or bm25_cfg.to_json() != old.manifest.bm25)
    if embedder is None and (new_docs or old is None):
        embedder = load_embedder(old.manifest.embedder if old else None)
        if old is not None:
            _check_embedder(old, embedder)
    embedder_name = embedder.name if embedder is not None else old.manifest.embedder_name  # type: ignore[union-attr]
    summary = IndexSummary(index=str(run.root), generation=old.generation if old else None, changed=False,
                           documents=len(kept_old) + len(new_docs), chunks=0, added=added, updated=updated,
                           unchanged=len(unchanged), removed=removed, embedder=embedder_name)
    _report_problems(summary, run.problems)
    if old is not None and not new_docs and not removed and not settings_changed:
        summary.chunks = old.n_chunks
        summary.seconds = round(time.perf_counter() - started, 3)
        return summary  # nothing to do: no new generation
    if not kept_old and not new_docs:
        raise UsageError(f"refusing to leave index {run.root} empty", hint="delete the index directory instead")

    # Chunk and embed the new and changed documents.
    new_chunks: dict[str, list[Chunk]] = {}
    if new_docs:
        assert embedder is not None
        chunker = Chunker(chunking, embedder.count_tokens, embedder.max_tokens,
                          additive=bool(getattr(embedder, "token_counts_additive", False)))
        new_chunks = {d.doc_id: chunker.chunk(d) for d in new_docs}
        limit = config.warn_chunks_per_file
        for d in new_docs:
            n = len(new_chunks[d.doc_id])
            if limit and n > limit:
                msg = (f"{d.doc_id} is cut into {n} chunks (more than {limit}); embedding them all takes a while — "
                       "is it really one document? (--warn-chunks N sets the threshold)")
                log.warning("%s", msg)  # said before the embedding starts, so a long run can be stopped
                summary.warnings.append(msg)
    flat = [c for d in new_docs for c in new_chunks[d.doc_id]]
    new_vecs = _embed(embedder, [c.text for c in flat], config.embed_batch, progress) if flat else None  # (M, D)
    pos_of_new = {c.chunk_id: i for i, c in enumerate(flat)}
    summary.chunks_embedded = len(flat)

    # Assemble the generation: documents sorted by id, chunks in order; rows 0..N-1.
    old_vectors = faiss_index.all_vectors(old.faiss) if old and kept_old else None
    doc_records: list[DocumentRecord] = []
    chunk_records: list[ChunkRecord] = []
    source_rows: list[int] = []  # per new row: old row (>= 0) or -1 - index into the new vectors
    new_by_id = {d.doc_id: d for d in new_docs}
    kept_docs: dict[str, DocumentRecord] = {}
    kept_chunks: dict[str, list[ChunkRecord]] = {}
    if old is not None and kept_old:  # one scan of each table (not two queries per document)
        keep = set(kept_old)
        kept_docs = {d.doc_id: d for d in old.docstore.documents(parse_metadata=False) if d.doc_id in keep}
        for c in old.docstore.all_chunks(parse_metadata=False):
            if c.doc_id in keep:
                kept_chunks.setdefault(c.doc_id, []).append(c)
    for doc_id in sorted(set(kept_old) | set(new_by_id)):
        if doc_id in new_by_id:
            d = new_by_id[doc_id]
            chunks = new_chunks[doc_id]
            doc_records.append(DocumentRecord(d.doc_id, d.source, d.title, d.content_hash, d.text, d.metadata,
                                              len(chunks)))
            for c in chunks:
                chunk_records.append(ChunkRecord(len(chunk_records), c.chunk_id, doc_id, c.ordinal, c.text,
                                                 c.metadata))
                source_rows.append(-1 - pos_of_new[c.chunk_id])
        else:
            assert old_vectors is not None
            doc_records.append(kept_docs[doc_id])
            for c in sorted(kept_chunks.get(doc_id, []), key=lambda c: c.ordinal):
                source_rows.append(c.row)
                c.row = len(chunk_records)
                chunk_records.append(c)
    spec: dict[str, Any] = dict(embedder.spec()) if embedder is not None else dict(old.manifest.embedder)  # type: ignore[union-attr]
    if embedder is not None:
        spec["name"], spec["dimension"] = embedder.name, embedder.dimension
    src = np.asarray(source_rows, dtype=np.int64)  # (N,)
    dim = new_vecs.shape[1] if new_vecs is not None else old_vectors.shape[1]  # type: ignore[union-attr]
    vectors = np.empty((len(src), dim), dtype=np.float32)  # (N, D)
    if old_vectors is not None:
        vectors[src >= 0] = old_vectors[src[src >= 0]]
    if new_vecs is not None:
        vectors[src < 0] = new_vecs[-1 - src[src < 0]]
    # BM25 tokens: carried over for unchanged chunks unless the BM25 tokenisation changed.
    tokenizer = bm25_mod.BM25Tokenizer(bm25_cfg)
    same_tokens = old is not None and bm25_mod.BM25Config.from_json(old.manifest.bm25) == bm25_cfg
    todo = [c for c in chunk_records if not (same_tokens and c.doc_id not in new_by_id)]
    for c, toks in zip(todo, tokenizer([c.text for c in todo]), strict=True):
        c.bm25_tokens = " ".join(toks)
    payload = _payload(doc_records, chunk_records, vectors, spec, chunking, faiss_cfg, bm25_cfg)
    number = save_generation(run.root, payload, store_ops, keep=old.generation if old is not None else None,
                             sign=True if config.sign else None)
    summary.generation = f"gen-{number:06d}"
    summary.changed = True
    summary.documents = len(doc_records)
    summary.chunks = len(chunk_records)
    summary.seconds = round(time.perf_counter() - started, 3)
    log.info("index %s: generation %s, %d documents, %d chunks", run.root, summary.generation,
             summary.documents, summary.chunks)
    return summary


def _raise_nothing(run: _Run, what: str) -> None:
    reasons: dict[str, int] = {}
    for p in run.problems:
        reasons[p.reason] = reasons.get(p.reason, 0) + 1
    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no files found"
    raise UsageError(f"nothing to index in {what} ({detail}); the index is unchanged",
                     hint="check the paths; supported: text, Markdown, reST, HTML, PDF, JSON/JSONL, CSV, source code")


def _report_problems(summary: IndexSummary, problems: list[FileProblem]) -> None:
    skipped: dict[str, list[str]] = {}
    for p in problems:
        if p.kind == "error":
            summary.errors.append(ProblemReport(path=p.path, reason=p.reason, detail=p.detail))
        else:
            skipped.setdefault(p.reason, []).append(p.path)
    summary.skipped = skipped


def _embed(embedder: Embedder, texts: list[str], batch: int, progress: ProgressCallback | None) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch):
        if progress:
            progress("embed", start, len(texts))
        v = np.asarray(embedder.embed_documents(texts[start : start + batch]), dtype=np.float32)  # (B, D)
        if v.shape != (min(batch, len(texts) - start), embedder.dimension):
            raise IndexStoreError(f"embedder {embedder.name} returned shape {v.shape}, expected "
                                  f"({min(batch, len(texts) - start)}, {embedder.dimension})")
        out.append(v)
    if progress:
        progress("embed", len(texts), len(texts))
    return np.concatenate(out) if out else np.zeros((0, embedder.dimension), np.float32)


def _payload(
    docs: list[DocumentRecord],
    chunks: list[ChunkRecord],
    vectors: np.ndarray,
    embedder_spec: dict[str, Any],
    chunking: ChunkingConfig,
    faiss_cfg: faiss_index.FaissConfig,
    bm25_cfg: bm25_mod.BM25Config,
) -> GenerationPayload:
    files: dict[str, bytes] = {
        VECTORS: faiss_index.serialize(faiss_index.build_faiss(vectors, faiss_cfg)),
        DOCSTORE: build_docstore(docs, chunks),
    }
    model = bm25_mod.build_bm25_from_tokens([c.bm25_tokens.split() for c in chunks], bm25_cfg)
    for name, data in bm25_mod.bm25_files(model).items():
        files[f"{BM25_DIR}/{name}"] = data
    return GenerationPayload(files=files, embedder=embedder_spec, faiss=asdict(faiss_cfg), chunking=asdict(chunking),
                             bm25=bm25_cfg.to_json(), counts=Counts(documents=len(docs), chunks=len(chunks)))
