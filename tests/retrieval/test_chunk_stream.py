"""Issue 14: chunking streams a huge single-line file in bounded memory, and the indexer warns before it
embeds more than N chunks from one file."""

from __future__ import annotations

import logging
import tracemalloc

from ragloop.retrieval import HashingEmbedder
from ragloop.retrieval.chunking import Chunker, ChunkingConfig
from ragloop.retrieval.indexer import IndexConfig, build_index
from ragloop.retrieval.loaders import SourceDocument


def _chunker(block: int | None = None) -> Chunker:
    e = HashingEmbedder(16)
    c = Chunker(ChunkingConfig(chunk_tokens=50, chunk_overlap=10), e.count_tokens, e.max_tokens, additive=True)
    if block is not None:
        c.BLOCK_CHARS = block
    return c


def _line(n_words: int) -> str:
    return " ".join(f"w{i % 7919}" for i in range(n_words))  # one line, a vocabulary of ~8k words


def test_streamed_chunks_match_the_whole_text_split_below_a_block():
    text = _line(3000)
    assert len(text) < Chunker.BLOCK_CHARS
    c = _chunker()
    whole = c._split_block(text, None)
    assert list(c.iter_split(text)) == whole


def test_streamed_chunks_run_on_across_blocks():
    text = _line(20_000)
    c = _chunker(block=5_000)
    pieces = list(c.iter_split(text))
    assert len(pieces) > 20 * len(text) // 5_000 // 10
    ends = 0
    for p, start in pieces:
        assert text[start : start + len(p)] == p  # offsets are right
        assert start <= ends  # no gap: every chunk starts inside (overlap) or right after the previous one
        ends = max(ends, start + len(p))
        assert c._count_exact([p])[0] <= c.max_tokens
    assert ends >= len(text.rstrip())
    assert [s for _, s in pieces] == sorted(s for _, s in pieces)


def test_memory_stays_flat_on_a_single_line_file():
    c = _chunker(block=50_000)
    text_small, text_big = _line(20_000), _line(200_000)  # ~0.2 MB and ~2.3 MB, one line each

    def peak(text: str) -> tuple[int, int]:
        tracemalloc.start()
        n = sum(1 for _ in c.iter_split(text))  # consumed as a stream, nothing kept
        _cur, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return n, top

    sum(1 for _ in c.iter_split(_line(2_000)))  # warm-up: imports and the splitter are not the text's memory
    n_small, peak_small = peak(text_small)
    n_big, peak_big = peak(text_big)
    assert n_big > 8 * n_small
    # 10x the text, about the same working memory (the whole-text split held every word at once)
    assert peak_big < 2 * peak_small + 1_000_000, (peak_small, peak_big)


def test_indexer_warns_before_embedding_a_file_with_too_many_chunks(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ragloop.retrieval.indexer")  # whatever other tests did to "ragloop"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "huge.txt").write_text(_line(6_000) + "\n")
    (tmp_path / "docs" / "small.txt").write_text("a small note\n")
    embedded: list[int] = []

    class Recording(HashingEmbedder):
        def embed_documents(self, texts):
            embedded.append(len(texts))
            assert any("huge.txt" in r.message and "chunks" in r.message for r in caplog.records), \
                "the warning must come before the embedding"
            return super().embed_documents(texts)

    s = build_index([tmp_path / "docs"], tmp_path / "idx", embedder=Recording(64),
                    config=IndexConfig(chunking=ChunkingConfig(50, 10), warn_chunks_per_file=20))
    assert embedded and s.chunks > 20
    assert len(s.warnings) == 1 and "huge.txt" in s.warnings[0] and "--warn-chunks" in s.warnings[0]
    quiet = build_index([tmp_path / "docs"], tmp_path / "idx2", embedder=HashingEmbedder(64),
                        config=IndexConfig(chunking=ChunkingConfig(50, 10), warn_chunks_per_file=0))
    assert quiet.warnings == []


def test_chunk_ids_and_ordinals_are_sequential_when_streamed():
    c = _chunker(block=5_000)
    doc = SourceDocument.from_text("d", _line(8_000))
    chunks = list(c.iter_chunks(doc))
    assert [ch.ordinal for ch in chunks] == list(range(len(chunks)))
    assert len({ch.chunk_id for ch in chunks}) == len(chunks) and chunks == c.chunk(doc)
