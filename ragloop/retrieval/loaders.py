"""Finding and reading the user's documents, with every bad input reported (SECURITY.md §3).

``discover_files`` walks the paths given on the command line without following symlinks (unless asked),
never opens non-regular files (a FIFO blocks forever), detects symlink loops, and returns the files to
read plus one ``FileProblem`` per thing it skipped. ``load_file`` reads one file into a ``SourceDocument``
(a list of ``Segment``s: pages of a PDF, rows of a CSV, records of a JSONL file, or one segment of text),
or raises ``FileProblemError`` naming why it cannot. Parsing uses the libraries of the field: pypdf through
langchain-community's ``PyPDFParser``, BeautifulSoup for HTML, ``json`` and ``csv`` from the standard library.

Text decoding is strict: UTF-8, UTF-8 with BOM, UTF-16/32 with BOM — never ``errors="ignore"``, which would
index mangled text without telling anyone.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragloop.core.errors import DataError, UsageError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".log", ""}
CODE_LANGUAGES = {  # suffix -> langchain_text_splitters.Language value (separators for code-aware chunking)
    ".py": "python", ".pyi": "python", ".js": "js", ".jsx": "js", ".mjs": "js", ".ts": "ts", ".tsx": "ts",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".swift": "swift", ".kt": "kotlin",
    ".scala": "scala", ".lua": "lua", ".pl": "perl", ".hs": "haskell", ".ex": "elixir", ".sol": "sol",
    ".sh": None, ".bash": None, ".zsh": None, ".sql": None, ".r": None, ".m": None, ".css": None,
    ".toml": None, ".yaml": None, ".yml": None, ".ini": None, ".cfg": None, ".conf": None, ".xml": None,
}
PROSE_LANGUAGES = {".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".tex": "latex"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | set(CODE_LANGUAGES) | {".html", ".htm", ".pdf", ".json", ".jsonl", ".csv"}
BINARY_SNIFF_BYTES = 8000  # the same window git uses to call a file binary
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024

ProblemKind = Literal["skipped", "error"]


@dataclass
class Segment:
    """A piece of a document that chunks never cross: a page, a CSV row, a JSON record, or all the text.

    ``metadata`` holds where it is in the source, e.g. ``{"page": 3}`` or ``{"line": 12}`` (1-based first line).
    """

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceDocument:
    """One document to index. ``doc_id`` is stable across runs (the file path, or the record id)."""

    doc_id: str
    segments: list[Segment]
    source: str = ""
    title: str = ""
    content_hash: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.source:
            self.source = self.doc_id
        if not self.content_hash:
            payload = json.dumps(
                [self.title, [[s.text, s.metadata] for s in self.segments], self.metadata],
                sort_keys=True, ensure_ascii=False, default=str,
            )
            self.content_hash = hashlib.sha256(payload.encode("utf-8")).hexdigest()

    @property
    def text(self) -> str:
        """The whole document: segments joined by blank lines."""
        return "\n\n".join(s.text for s in self.segments)

    @classmethod
    def from_text(
        cls, doc_id: str, text: str, *, title: str = "", source: str = "", metadata: dict[str, Any] | None = None
    ) -> SourceDocument:
        """An in-memory document; a title is put in front of the text (it is part of what gets embedded)."""
        body = f"{title}\n\n{text}" if title and text else (title or text)
        return cls(doc_id=str(doc_id), segments=[Segment(body, {"line": 1})], source=source, title=title,
                   metadata=dict(metadata or {}))


@dataclass
class FileProblem:
    """A file (or directory) that was not indexed, and why. ``reason`` is a short fixed phrase."""

    path: str
    reason: str
    detail: str = ""
    kind: ProblemKind = "skipped"


class FileProblemError(Exception):
    """Raised by ``load_file``; carries the ``FileProblem`` to report."""

    def __init__(self, problem: FileProblem) -> None:
        super().__init__(f"{problem.path}: {problem.reason} {problem.detail}".strip())
        self.problem = problem


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable, UTF-8-safe form of a path: undecodable bytes become ``\\xNN`` escapes.

    ``display_path(b'/tmp/caf\\xe9.txt'.decode('utf-8', 'surrogateescape')) -> '/tmp/caf\\\\xe9.txt'``
    """
    raw = os.fsencode(os.fspath(path))
    return raw.decode("utf-8", "backslashreplace")


def _skip(path: Path | str, reason: str, detail: str = "") -> FileProblemError:
    return FileProblemError(FileProblem(display_path(path), reason, detail, "skipped"))


def _error(path: Path | str, reason: str, detail: str = "") -> FileProblemError:
    return FileProblemError(FileProblem(display_path(path), reason, detail, "error"))


# ----------------------------------------------------------------------------------------------------------
# Discovery


def discover_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    follow_symlinks: bool = False,
    include_hidden: bool = False,
) -> tuple[list[Path], list[FileProblem]]:
    """The regular files under ``paths`` (sorted, deduplicated) and the problems met on the way.

    Paths named on the command line are followed even when they are symlinks (like ``find -H``); inside
    directories, symlinks are skipped unless ``follow_symlinks``, and then directory cycles are detected by
    (device, inode). A path that does not exist is a ``UsageError``: indexing must not go on and drop the
    documents that used to live under it.
    """
    files: list[Path] = []
    problems: list[FileProblem] = []
    seen_files: set[tuple[int, int]] = set()
    roots = [Path(os.path.abspath(os.fspath(p))) for p in paths]
    missing = [str(p) for p in roots if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"path not found: {', '.join(display_path(m) for m in missing)}",
                         hint="check the spelling; nothing was indexed and the index is unchanged")
    for root in roots:
        try:
            st = os.stat(root)
        except OSError as e:
            problems.append(_problem_for_stat_error(root, e))
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(root, st, files, problems, seen_files, follow_symlinks, include_hidden)
        elif stat.S_ISREG(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                files.append(root)
        else:
            problems.append(_skip(root, "not a regular file", _file_type(st.st_mode)).problem)
    return files, problems


def _problem_for_stat_error(path: Path, e: OSError) -> FileProblem:
    if e.errno == 40:  # ELOOP
        return _skip(path, "symlink loop").problem
    if e.errno == 2:  # ENOENT through a dangling symlink
        return _skip(path, "broken symlink").problem
    return _error(path, "unreadable", e.strerror or str(e)).problem


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _walk(
    root: Path,
    root_st: os.stat_result,
    files: list[Path],
    problems: list[FileProblem],
    seen_files: set[tuple[int, int]],
    follow_symlinks: bool,
    include_hidden: bool,
) -> None:
    # Iterative depth-first walk; each stack entry carries the (dev, ino) of its ancestors for cycle checks.
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(root, frozenset({(root_st.st_dev, root_st.st_ino)}))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError as e:
            problems.append(_error(directory, "unreadable directory", e.strerror or str(e)).problem)
            continue
        for entry in entries:
            path = Path(entry.path)
            if not include_hidden and entry.name.startswith("."):
                problems.append(_skip(path, "hidden", "use --include-hidden").problem)
                continue
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    problems.append(_skip(path, "symlink", "use --follow-symlinks").problem)
                    continue
                st = entry.stat(follow_symlinks=True) if is_link else entry.stat(follow_symlinks=False)
            except OSError as e:
                problems.append(_problem_for_stat_error(path, e))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if key in ancestors:
                    problems.append(_skip(path, "symlink loop", "points back to a parent directory").problem)
                    continue
                stack.append((path, ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                if key in seen_files:
                    continue  # the same file reached twice (hard link or followed symlink)
                seen_files.add(key)
                files.append(path)
            else:
                problems.append(_skip(path, "not a regular file", _file_type(st.st_mode)).problem)
    files.sort()


# ----------------------------------------------------------------------------------------------------------
# Reading one file


def read_file_bytes(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, re-checked after opening (the path may have changed since discovery).

    ``O_NONBLOCK`` makes opening a FIFO that replaced the file return at once instead of blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == 40:
            raise _skip(path, "symlink loop") from None
        raise _error(path, "unreadable", e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _skip(path, "not a regular file", _file_type(st.st_mode))
        if st.st_size > max_bytes:
            raise _skip(path, "too large", f"{st.st_size} bytes > limit {max_bytes} (use --max-file-mb)")
        if st.st_size == 0:
            raise _skip(path, "empty")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            b = os.read(fd, min(remaining, 1 << 20))
            if not b:
                break
            chunks.append(b)
            remaining -= len(b)
    except OSError as e:
        raise _error(path, "unreadable", e.strerror or str(e)) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise _skip(path, "too large", f"grew past the limit of {max_bytes} bytes while reading")
    if not data:
        raise _skip(path, "empty")
    return data


def decode_text(data: bytes) -> str:
    """Strict decoding: a BOM selects UTF-8/16/32, otherwise UTF-8. Newlines become ``\\n``.

    Raises ``UnicodeDecodeError`` (never ignores or replaces bytes).
    ``decode_text(b'\\xef\\xbb\\xbfhi\\r\\n') -> 'hi\\n'``
    """
    if data.startswith(codecs.BOM_UTF8):
        text = data[len(codecs.BOM_UTF8):].decode("utf-8")
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        text = data.decode("utf-32")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        text = data.decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def has_bom(data: bytes) -> bool:
    return data.startswith((codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def _decode_or_raise(path: Path, data: bytes) -> str:
    if not has_bom(data) and b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise _skip(path, "binary", "NUL byte in the first 8000 bytes")
    try:
        return decode_text(data)
    except UnicodeDecodeError as e:
        raise _error(path, "bad encoding",
                     f"not valid UTF-8 at byte {e.start} (convert the file to UTF-8, e.g. with iconv)") from None


def check_supported(path: Path) -> None:
    """Raise a ``FileProblemError`` (skipped) for a file type ragloop does not read."""
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise _skip(path, "unsupported type", path.suffix.lower())


def load_file(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> SourceDocument:
    """Read and parse one file. Raises ``FileProblemError`` for anything that cannot be indexed."""
    check_supported(path)
    return parse_file(path, read_file_bytes(path, max_bytes))


def parse_file(path: Path, data: bytes, content_hash: str | None = None) -> SourceDocument:
    """Parse the bytes of ``path`` by its suffix. ``content_hash`` defaults to sha256 of ``data``."""
    check_supported(path)
    suffix = path.suffix.lower()
    content_hash = content_hash or hashlib.sha256(data).hexdigest()
    name = display_path(path)
    meta: dict[str, Any] = {"file_name": display_path(path.name)}
    if suffix == ".pdf":
        segments, title = _parse_pdf(path, data)
    elif suffix in (".html", ".htm"):
        segments, title = _parse_html(_decode_or_raise(path, data))
    elif suffix == ".json":
        segments, title = _parse_json(path, _decode_or_raise(path, data)), ""
    elif suffix == ".jsonl":
        segments, title = _parse_jsonl(path, _decode_or_raise(path, data)), ""
    elif suffix == ".csv":
        segments, title = _parse_csv(path, _decode_or_raise(path, data)), ""
    else:
        text = _decode_or_raise(path, data)
        segments, title = [Segment(text, {"line": 1})], _text_title(text, suffix)
        if suffix in CODE_LANGUAGES:
            meta["language"] = CODE_LANGUAGES[suffix] or suffix.lstrip(".")
        elif suffix in PROSE_LANGUAGES:
            meta["language"] = PROSE_LANGUAGES[suffix]
    segments = [s for s in segments if s.text.strip()]
    if not segments:
        raise _skip(path, "empty", "no text (a scanned PDF needs OCR first)" if suffix == ".pdf" else "")
    return SourceDocument(doc_id=name, segments=segments, source=name, title=title or meta["file_name"],
                          content_hash=content_hash, metadata=meta)


_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _text_title(text: str, suffix: str) -> str:
    """The first Markdown heading, or an RST title (a line underlined with = - ~ ...)."""
    if suffix in (".md", ".markdown"):
        m = _MD_HEADING.search(text[:20000])
        return m.group(1) if m else ""
    if suffix == ".rst":
        lines = text[:20000].split("\n")
        for a, b in zip(lines, lines[1:], strict=False):
            if a.strip() and len(b) >= len(a.strip()) and b and len(set(b.strip())) == 1 and b.strip()[0] in "=-~^*#":
                return a.strip()
    return ""


def _parse_pdf(path: Path, data: bytes) -> tuple[list[Segment], str]:
    if not data.startswith(b"%PDF-"):
        raise _error(path, "parse error", "not a PDF (no %PDF- header)")
    from langchain_community.document_loaders.parsers.pdf import PyPDFParser
    from langchain_core.documents.base import Blob

    try:
        pages = list(PyPDFParser(mode="page").lazy_parse(Blob.from_data(data, path=str(path))))
    except Exception as e:  # pypdf raises many exception types for damaged files
        raise _error(path, "parse error", f"{type(e).__name__}: {e}") from None
    segments = [
        Segment(p.page_content.replace("\r\n", "\n"), {"page": int(p.metadata.get("page", i)) + 1})
        for i, p in enumerate(pages)
    ]
    title = str(pages[0].metadata.get("title", "") or "") if pages else ""
    return segments, title


# HTML: block structure kept, boilerplate dropped. Hand-written over BeautifulSoup (already a dependency)
# rather than trafilatura/readability-lxml: those pull in several more packages for what, on documentation
# pages, comes down to the same heuristics (Kohlschütter et al. 2010, "Boilerplate Detection using Shallow
# Text Features"; the HTML5 landmark roles): drop nav/header/footer/aside and elements whose role, id or
# class names them, prefer <main>/<article>, and keep inline markup (<a>, <code>, <em>) inside its sentence.
_HTML_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "iframe", "form", "button", "select",
                   "input", "nav", "aside", "footer", "dialog"]
_HTML_DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar", "dialog"}
_HTML_BOILER = re.compile(
    r"(?:^|[-_ ])(nav|navbar|navigation|menu|footer|sidebar|side-bar|breadcrumbs?|cookies?|cookie-banner|"
    r"banner|social|share|sharing|related|advert|ads|promo|subscribe|newsletter|skip-link|pagination|toolbar|"
    r"masthead|site-header|site-footer|comments?)(?:$|[-_ ])", re.IGNORECASE)
_HTML_BLOCKS = {"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6", "ul",
                "ol", "li", "dl", "dt", "dd", "pre", "blockquote", "table", "thead", "tbody", "tr", "td", "th",
                "figure", "figcaption", "hr", "address", "details", "summary", "body", "caption"}
_HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


def _is_boilerplate(tag: Any) -> bool:
    if tag.get("role", "").lower() in _HTML_DROP_ROLES or tag.get("aria-hidden") == "true":
        return True
    if tag.name == "header" and tag.find_parent(["article", "main"]) is None:
        return True  # a site header; an article's own header holds its title
    names = " ".join([tag.get("id") or "", *(tag.get("class") or [])])
    return bool(names.strip()) and bool(_HTML_BOILER.search(names))


def html_blocks(html: str) -> tuple[list[tuple[str, str]], str]:
    """The main content of an HTML page as ``(kind, text)`` blocks (``heading``, ``text``, ``item``, ``pre``)
    and the page title. Inline tags never split a sentence; navigation, footers and sidebars are dropped.

    ``html_blocks("<nav>Home</nav><p>A <b>bold</b> claim.</p>")[0] -> [("text", "A bold claim.")]``
    """
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import Comment, Doctype, ProcessingInstruction

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_HTML_DROP_TAGS):
        tag.decompose()
    for tag in [t for t in soup.find_all(True) if _is_boilerplate(t)]:
        if not tag.decomposed:
            tag.decompose()
    root = soup.find("main") or soup.find(attrs={"role": "main"})
    if root is None:
        articles = soup.find_all("article")
        root = articles[0] if len(articles) == 1 else (soup.body or soup)
    blocks: list[tuple[str, str]] = []
    buf: list[str] = []

    def flush(kind: str = "text") -> None:
        text = " ".join("".join(buf).split())
        buf.clear()
        if text:
            blocks.append((kind, text))

    def walk(node: Any) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                buf.append(str(child))
            elif isinstance(child, Tag):
                name = child.name.lower()
                if name == "br":
                    buf.append(" ")
                elif name == "pre":
                    flush()
                    code = child.get_text().strip("\n")
                    if code.strip():
                        blocks.append(("pre", code))
                elif name in _HTML_HEADINGS:
                    flush()
                    buf.append(child.get_text(" "))
                    flush("heading")
                elif name == "li" or name == "dt":
                    flush()
                    walk(child)
                    flush("item")
                elif name == "tr":
                    flush()
                    cells = [" ".join(c.get_text(" ").split()) for c in child.find_all(["td", "th"], recursive=False)]
                    if any(cells):
                        blocks.append(("text", " | ".join(cells)))
                elif name in _HTML_BLOCKS:
                    flush()
                    walk(child)
                    flush()
                else:
                    walk(child)  # inline: stays in the sentence

    walk(root)
    flush()
    return blocks, title or next((t for k, t in blocks if k == "heading"), "")


def _parse_html(text: str) -> tuple[list[Segment], str]:
    """One segment per heading section (``{"section": heading}``), so chunks never mix two sections and a
    source can say which section it came from. Block boundaries become blank lines (the chunker's first
    split point); list items keep a ``- `` marker."""
    blocks, title = html_blocks(text)
    segments: list[Segment] = []
    section, lines, has_body = "", [], False

    def close() -> None:
        body = "\n\n".join(lines).strip()
        if body:
            segments.append(Segment(body, {"section": section} if section else {}))

    for kind, t in blocks:
        if kind == "heading":
            if has_body:  # a heading right under another stays with it (no heading-only segments)
                close()
                lines, has_body = [], False
            section = t
            lines.append("## " + t)
        else:
            lines.append(f"- {t}" if kind == "item" else t)
            has_body = True
    close()
    return segments, title


def json_to_text(value: Any, prefix: str = "") -> str:
    """Readable ``key: value`` lines for a JSON value (nested keys joined with dots).

    ``json_to_text({"a": {"b": 1}, "c": ["x", "y"]}) -> 'a.b: 1\\nc: x\\nc: y'``
    """
    if isinstance(value, dict):
        return "\n".join(t for k, v in value.items() if (t := json_to_text(v, f"{prefix}.{k}" if prefix else str(k))))
    if isinstance(value, list):
        return "\n".join(t for v in value if (t := json_to_text(v, prefix)))
    if value is None:
        return ""
    return f"{prefix}: {value}" if prefix else str(value)


def _parse_json(path: Path, text: str) -> list[Segment]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, "parse error", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(value, list):
        return [Segment(json_to_text(v), {"record": i}) for i, v in enumerate(value)]
    return [Segment(json_to_text(value), {"line": 1})]


def _parse_jsonl(path: Path, text: str) -> list[Segment]:
    segments = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(path, "parse error", f"invalid JSON on line {lineno}: {e.msg}") from None
        segments.append(Segment(json_to_text(value), {"line": lineno}))
    return segments


def _parse_csv(path: Path, text: str) -> list[Segment]:
    """One segment per row, ``column: value`` lines (the layout of LangChain's CSVLoader)."""
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise _error(path, "parse error", f"CSV: {e}") from None
    if not rows:
        return []
    header, segments = rows[0], []
    for i, row in enumerate(rows[1:], start=2):
        cells = [f"{h.strip()}: {v.strip()}" for h, v in zip(header, row, strict=False) if v.strip()]
        segments.append(Segment("\n".join(cells), {"line": i, "row": i - 1}))
    return segments


# ----------------------------------------------------------------------------------------------------------
# In-memory collections


def documents_from_records(
    rows: Iterable[dict[str, Any]], *, id_key: str = "_id", title_key: str = "title", text_key: str = "text"
) -> Iterator[SourceDocument]:
    """BEIR-style rows (``{"_id", "title", "text"}``) to documents, one each, ``doc_id = row[id_key]``."""
    for i, row in enumerate(rows):
        if id_key not in row or text_key not in row:
            raise DataError(f"record #{i} lacks {id_key!r} or {text_key!r}: keys are {sorted(row)}")
        extra = {k: v for k, v in row.items() if k not in (id_key, title_key, text_key) and v not in (None, "", {})}
        yield SourceDocument.from_text(str(row[id_key]), str(row[text_key] or ""),
                                       title=str(row.get(title_key) or ""), metadata=extra)


def read_beir_corpus(path: str | os.PathLike[str]) -> list[SourceDocument]:
    """Read a BEIR ``corpus.jsonl`` (e.g. ``shared/data/scifact/corpus.jsonl``) into documents."""
    p = Path(path)
    rows = []
    try:
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{lineno}: invalid JSON: {e.msg}") from None
    except OSError as e:
        raise DataError(f"cannot read corpus {p}: {e.strerror or e}") from None
    return list(documents_from_records(rows))
