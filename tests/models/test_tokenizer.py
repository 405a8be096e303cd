"""The tokenizer front door (ragloop.models.tokenizer) on the real SmolLM2 tokenizer and literal inputs."""

from __future__ import annotations

import pytest

from ragloop.models import tokenizer as T


def test_encode_decode_literal(smol_tokenizer):
    ids = T.encode(smol_tokenizer, "Hi there")
    assert ids == [26843, 665]
    assert T.decode(smol_tokenizer, ids) == "Hi there"
    assert smol_tokenizer.convert_ids_to_tokens(ids) == ["Hi", "Ġthere"]


def test_special_token_strings_become_control_tokens(smol_tokenizer):
    ids = T.encode(smol_tokenizer, "<|im_end|>")
    assert ids == [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert T.decode(smol_tokenizer, ids) == "<|im_end|>"  # kept, not skipped


@pytest.mark.parametrize("text", ["De-tokenization is lossless, isn't it?", "  two  spaces ,  here ", "naïve café 東京 🙂"])
def test_round_trip_ok(smol_tokenizer, text):
    rt = T.round_trip(smol_tokenizer, text)
    assert rt.ok and rt.decoded == text
    assert len(rt.ids) == len(rt.pieces) == len(rt.texts)


def test_round_trip_reports_a_lossy_tokenizer():
    class Lowercasing:  # a tokenizer that normalises its input, as SentencePiece's NFKC does
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text.lower()]

        def decode(self, ids, **kw):
            return "".join(chr(i) for i in ids)

        def convert_ids_to_tokens(self, ids):
            return [chr(i) for i in ids]

    rt = T.round_trip(Lowercasing(), "Hi")
    assert not rt.ok and rt.decoded == "hi"


def test_incremental_detokenizer_never_splits_a_character(smol_tokenizer):
    text = "東京 🙂!"
    ids = T.encode(smol_tokenizer, text)
    detok = T.IncrementalDetokenizer(smol_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all(T.REPLACEMENT_CHAR not in p for p in pieces)
    assert "" in pieces  # the emoji spans several tokens: some pushes hold text back


def test_old_import_paths_still_work():
    from ragloop.models.decoding import IncrementalDetokenizer
    from ragloop.models.loading import load_tokenizer

    assert IncrementalDetokenizer is T.IncrementalDetokenizer
    assert load_tokenizer is T.load_tokenizer
