"""Shared helpers for the retrieval tests: a minimal PDF writer, corpora, and an embedder that counts calls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ragloop.retrieval import HashingEmbedder, SourceDocument

TOPICS = {
    "sampling.md": "# Sampling\n\nNucleus sampling keeps the smallest set of tokens whose cumulative probability exceeds p.\n",
    "faiss.txt": "FAISS performs fast similarity search over dense vectors with inner product or L2 distance.\n",
    "bm25.rst": "BM25\n====\n\nOkapi BM25 ranks documents by term frequency and inverse document frequency.\n",
    "ppo.md": "# PPO\n\nProximal policy optimisation clips the probability ratio to keep updates small.\n",
}


def make_pdf(pages: Sequence[str]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per page (enough for pypdf to extract)."""
    objs: list[bytes] = []
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    font_id = 3 + 2 * n
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    for i, text in enumerate(pages):
        esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({esc}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                    f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write_corpus(root: Path, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or TOPICS).items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def docs(spec: dict[str, str]) -> list[SourceDocument]:
    return [SourceDocument.from_text(k, v) for k, v in spec.items()]


class CountingEmbedder(HashingEmbedder):
    """A hashing embedder that records every text it embeds (to prove what was, and was not, re-embedded)."""

    def __init__(self, dimension: int = 64) -> None:
        super().__init__(dimension)
        self.embedded: list[str] = []

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded.extend(texts)
        return super().embed_documents(texts)
