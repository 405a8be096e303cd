"""``ragloop index | search``: build and query a document index.

Thin commands over ``ragloop.retrieval``: parse options, call one library function, print. File names and
document text are untrusted: control characters are escaped before they reach the terminal.

Exit codes of ``index``: 0 success, 7 some files failed (the index was saved with the rest), 2 usage
error (bad option, path not found, nothing to index), 5 index problem (damaged, locked, incompatible).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from ragloop.core.errors import UsageError

INDEX_HELP = (
    "Index name or path. A bare name such as 'mydocs' means $RAGLOOP_HOME/indexes/mydocs "
    "(~/.ragloop/indexes/mydocs by default); a value with a '/' or an existing directory is used as a path."
)
EMBEDDER_HELP = (
    "Embedder: a local sentence-transformers directory, or 'default' (the embedded all-MiniLM-L6-v2). "
    "'hashing' is a tiny test embedder (no model, poor quality). Default: the index's own embedder."
)


def _safe(text: str) -> str:
    """``_safe("a\\nb\\x1b[2J") -> "a\\\\nb"``: one line, no escape sequence, control or bidi character from a file
    name or a document reaches the terminal (a newline in a file name no longer breaks the line)."""
    from ragloop.agents.safety import escape_display

    return escape_display(text)


def _embedder(value: str | None) -> Any:
    if value is None:
        return None
    from ragloop.retrieval.embeddings import load_embedder

    return load_embedder(value)


def _progress_callback(enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar on stderr (when it is a terminal), and the callback that drives it."""
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    tasks: dict[str, Any] = {}

    def callback(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task({"read": "reading", "embed": "embedding"}.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, callback


def _print_summary(s: Any) -> None:
    verb = "indexed" if s.changed else "up to date:"
    gen = f" ({s.generation})" if s.generation else ""
    typer.echo(f"{verb} {s.documents} documents, {s.chunks} chunks in {_safe(s.index)}{gen}")
    typer.echo(f"  {s.added} added, {s.updated} updated, {s.unchanged} unchanged, {s.removed} removed; "
               f"{s.chunks_embedded} chunks embedded with {s.embedder} in {s.seconds:.1f} s")
    n_skipped = sum(len(v) for v in s.skipped.values())
    if n_skipped:
        reasons = ", ".join(f"{r} {len(v)}" for r, v in sorted(s.skipped.items()))
        typer.echo(f"skipped {n_skipped}: {reasons}")
        for reason, paths in sorted(s.skipped.items()):
            for p in paths[:5]:
                typer.echo(f"  {reason}: {_safe(p)}")
            if len(paths) > 5:
                typer.echo(f"  {reason}: ... and {len(paths) - 5} more (--json lists all)")
    for w in s.warnings:
        typer.echo(f"warning: {_safe(w)}", err=True)
    if s.errors:
        typer.echo(f"errors {len(s.errors)} (these files were not indexed):", err=True)
        for e in s.errors:
            typer.echo(f"  {_safe(e.path)}: {e.reason}" + (f" ({_safe(e.detail)})" if e.detail else ""), err=True)


def index_cmd(
    paths: list[str] = typer.Argument(None, help="Files and directories to index (incremental: only new or "
                                      "changed files are embedded; deleted files under these paths are removed)."),
    index: str = typer.Option("default", "--index", "-i", help=INDEX_HELP),
    stats: bool = typer.Option(False, "--stats", help="Show documents, chunks, embedder, dimension, size, generations."),
    verify: bool = typer.Option(False, "--verify", help="Check the index's integrity (hashes, counts, dimensions)."),
    embedder: str | None = typer.Option(None, "--embedder", help=EMBEDDER_HELP),
    chunk_tokens: int | None = typer.Option(None, "--chunk-tokens", help="Chunk size in embedder tokens (default 200)."),
    chunk_overlap: int | None = typer.Option(None, "--chunk-overlap", help="Overlap between chunks in tokens (default 32)."),
    faiss_kind: str | None = typer.Option(None, "--faiss", help="Vector index: flat (exact, default), hnsw or ivf (large corpora)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Follow symlinks inside directories."),
    include_hidden: bool = typer.Option(False, "--include-hidden", help="Index dot-files and dot-directories."),
    max_file_mb: float = typer.Option(50.0, "--max-file-mb", help="Skip files larger than this (MiB)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-chunk and re-embed everything (new embedder or chunk size, damaged index)."),
    sign: bool = typer.Option(False, "--sign", help="Sign the manifest with HMAC-SHA256 and the local key "
                              "$RAGLOOP_HOME/index.key (created 0600): tampering then needs the key. Checked "
                              "automatically on every load; later updates stay signed. See docs/INDEX.md."),
    warn_chunks: int = typer.Option(5000, "--warn-chunks", help="Warn, before embedding, about a file cut into "
                                    "more chunks than this (0 = never)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or stats / verify report) as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    list_all: bool = typer.Option(False, "--list", help="List the indexes under $RAGLOOP_HOME/indexes with "
                                  "documents, chunks, size and date."),
    docs: bool = typer.Option(False, "--docs", help="List the documents of --index with their chunk counts."),
    remove: list[str] = typer.Option(None, "--remove", help="Remove this document (file, directory or id from "
                                     "--docs) from --index; repeatable. Crash-safe: a new generation."),
    delete: bool = typer.Option(False, "--delete", help="Delete --index entirely (asks first unless --yes)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (--delete)."),
) -> None:
    """Index documents (txt, md, rst, html, pdf, json/jsonl, csv, source code) for search and agents.

    Crash-safe: once this command succeeds the new index survives a crash; if it is interrupted at any
    point, the previous index stays loadable and unchanged. Exit codes: 0 ok, 7 some files failed (the
    rest was indexed), 2 usage error, 5 index error (damaged, locked by another writer, other embedder).

    Examples:
      ragloop index ./docs ./notes.pdf --index mydocs
      ragloop index ./docs --index mydocs --sign
      ragloop index --index mydocs --verify
      ragloop index --list
      ragloop index --index mydocs --docs
      ragloop index --index mydocs --remove ./docs/old.md
      ragloop index --index mydocs --delete --yes
    """
    from ragloop.retrieval import store

    if list_all or docs or remove or delete:
        _manage(index, paths, list_all=list_all, docs=docs, remove=remove or [], delete=delete, yes=yes,
                as_json=as_json)
        return
    root = store.resolve_index_path(index)
    if stats or verify:
        if paths:
            raise UsageError("--stats and --verify take no paths", hint=f"ragloop index --index {index} --stats")
        report = store.index_stats(root) if stats else store.verify_index(root)
        if as_json:
            typer.echo(json.dumps(report, indent=1))
        elif stats:
            typer.echo(f"index       {_safe(report['index'])}\ngeneration  {report['generation']} "
                       f"(created {report['created_at']})\ndocuments   {report['documents']}\nchunks      "
                       f"{report['chunks']}\nembedder    {report['embedder']}\ndimension   {report['dimension']}\n"
                       f"faiss       {report['faiss']}\nchunking    {report['chunking']['chunk_tokens']} tokens, "
                       f"overlap {report['chunking']['chunk_overlap']}\nsize        {report['bytes'] / 1e6:.2f} MB "
                       f"(all generations {report['total_bytes'] / 1e6:.2f} MB)\ngenerations "
                       + ", ".join(g["generation"] + (" (current)" if g["current"] else "") for g in report["generations"]))
        else:
            if report["fallback"]:
                typer.echo(f"DAMAGED: {_safe(report['index'])} current generation {report['current']}; searches "
                           f"are served from {report['served']} (the last intact generation): "
                           f"{report['documents']} documents, {report['chunks']} chunks")
            else:
                typer.echo(f"ok: {_safe(report['index'])} {report['current']}: {report['documents']} documents, "
                           f"{report['chunks']} chunks, all hashes, counts and dimensions check out")
            typer.echo(f"  signature: {report['signature']}")
            for g, status in report["generations"].items():
                typer.echo(f"  {g}: {_safe(status)}")
        if verify and report["fallback"]:
            from ragloop.core.errors import IndexStoreError

            raise IndexStoreError(f"generation {report['current']} of {_safe(str(root))} is damaged; serving "
                                  f"{report['served']}", hint=f"re-create it: ragloop index PATHS --index {index} --rebuild")
        return
    if not paths:
        raise UsageError("give files or directories to index", hint="ragloop index ./docs --index mydocs")
    if max_file_mb <= 0:
        raise UsageError(f"--max-file-mb must be positive, got {max_file_mb}")
    from ragloop.retrieval.chunking import ChunkingConfig
    from ragloop.retrieval.faiss_index import FaissConfig
    from ragloop.retrieval.indexer import IndexConfig, build_index

    chunking = None
    if chunk_tokens is not None or chunk_overlap is not None:
        defaults = ChunkingConfig()
        chunking = ChunkingConfig(chunk_tokens if chunk_tokens is not None else defaults.chunk_tokens,
                                  chunk_overlap if chunk_overlap is not None else defaults.chunk_overlap)
    config = IndexConfig(chunking=chunking, faiss=FaissConfig(kind=faiss_kind) if faiss_kind else None,
                         max_file_bytes=int(max_file_mb * 1024 * 1024), follow_symlinks=follow_symlinks,
                         include_hidden=include_hidden, rebuild=rebuild, sign=sign,
                         warn_chunks_per_file=max(0, warn_chunks))
    if quiet:
        from ragloop.cli.progress import quiet_libraries

        quiet_libraries()
    bar, callback = _progress_callback(not quiet and not as_json)
    if bar is not None:
        with bar:
            summary = build_index(paths, root, embedder=_embedder(embedder), config=config, progress=callback)
    else:
        summary = build_index(paths, root, embedder=_embedder(embedder), config=config)
    if as_json:
        typer.echo(summary.model_dump_json(indent=1))
    else:
        _print_summary(summary)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _manage(index: str, paths: list[str] | None, *, list_all: bool, docs: bool, remove: list[str], delete: bool,
            yes: bool, as_json: bool) -> None:
    """``--list``, ``--docs``, ``--remove``, ``--delete``: one at a time, no paths."""
    from ragloop.retrieval import manage

    if sum([list_all, docs, bool(remove), delete]) > 1:
        raise UsageError("use one of --list, --docs, --remove, --delete at a time")
    if paths:
        raise UsageError("--list/--docs/--remove/--delete take no positional paths",
                         hint=f"ragloop index --index {index} --remove PATH")
    if list_all:
        infos = manage.list_indexes()
        if as_json:
            typer.echo(json.dumps([i.to_dict() for i in infos], indent=1))
        elif not infos:
            typer.echo("no indexes yet under $RAGLOOP_HOME/indexes (ragloop index ./docs --index mydocs)")
        for i in infos if not as_json else []:
            state = f"  damaged: {i.error}" if i.error else ""
            typer.echo(f"{_safe(i.name):<20} {i.documents:>6} docs {i.chunks:>8} chunks {i.bytes / 1e6:>9.2f} MB  "
                       f"{i.updated or '-':<16}  {i.embedder}{state}")
        return
    if docs:
        items = manage.list_documents(index)
        if as_json:
            typer.echo(json.dumps([d.to_dict() for d in items], indent=1, ensure_ascii=False))
            return
        for d in items:
            title = f"  ({_safe(d.title)})" if d.title and d.title not in d.doc_id else ""
            typer.echo(f"{d.chunks:>6} chunks  {_safe(d.doc_id)}{title}")
        typer.echo(f"{len(items)} documents, {sum(d.chunks for d in items)} chunks")
        return
    if remove:
        summary, ids = manage.remove_documents(index, remove)
        for i in ids:
            typer.echo(f"removed {_safe(i)}")
        typer.echo(f"{summary.documents} documents, {summary.chunks} chunks left in {_safe(summary.index)} "
                   f"({summary.generation})")
        return
    root = manage.index_root(index)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not deleting {root} without confirmation", hint="add --yes to delete it")
        info = manage.index_info(root)
        if not typer.confirm(f"Delete index {root} ({info.documents} documents, {info.bytes / 1e6:.2f} MB)?"):
            typer.echo("not deleted")
            raise typer.Exit(1)
    manage.delete_index(index)
    typer.echo(f"deleted {_safe(str(root))}")


def search_cmd(
    query: str = typer.Argument(..., help="What to search for."),
    index: str = typer.Option("default", "--index", "-i", help=INDEX_HELP),
    k: int = typer.Option(5, "-k", "--top-k", help="Number of results."),
    mode: str = typer.Option("hybrid", "--mode", "-m", help="dense (embeddings), bm25 (keywords) or hybrid (both, fused)."),
    embedder: str | None = typer.Option(None, "--embedder", help=EMBEDDER_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per hit: rank, score, chunk_id, source, text, ..."),
) -> None:
    """Search an index; prints the best chunks with their source and score.

    Examples:
      ragloop search "how does nucleus sampling work?" --index mydocs -k 5
      ragloop search "BM25 saturation" --index mydocs --mode bm25 --json
    """
    from ragloop.cli.text import require_utf8
    from ragloop.retrieval.retriever import SEARCH_MODES, Retriever

    require_utf8(query, "the query")
    if mode not in SEARCH_MODES:
        raise UsageError(f"unknown --mode {mode!r}", hint=f"use one of {', '.join(SEARCH_MODES)}")
    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}")
    with Retriever.open(index, embedder=_embedder(embedder)) as r:
        hits = r.search(query, k=k, mode=mode)  # type: ignore[arg-type]
    if as_json:
        for h in hits:
            typer.echo(json.dumps(h.model_dump(), ensure_ascii=False))
        return
    if not hits:
        typer.echo("no results")
        return
    for h in hits:
        where = []
        if "page" in h.metadata:
            where.append(f"page {h.metadata['page']}")
        if "line_start" in h.metadata:
            where.append(f"lines {h.metadata['line_start']}-{h.metadata['line_end']}")
        loc = f" ({', '.join(where)})" if where else ""
        typer.echo(f"{h.rank}. [{h.score:.4f}] {_safe(h.source)}{loc}  chunk {h.chunk_id}")
        for line in h.text.strip().split("\n"):
            typer.echo(f"    {_safe(line)}")


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)
