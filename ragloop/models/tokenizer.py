"""The tokenizer front door: text → ids, ids → text, incremental detokenization, and the round-trip check.

Every policy in ragloop tokenizes through these functions, so "what does the model see" has one answer:

- ``encode(tok, text)``: token ids of ``text`` with no BOS/EOS added; special-token strings written in the
  text (``<|im_end|>``) become their control tokens (chat rendering relies on this; message *content* is
  neutralised beforehand by ``chat.neutralize_special_tokens``).
- ``decode(tok, ids)``: the exact text of ``ids``, special tokens kept and no clean-up of spaces, so
  ``decode(encode(text)) == text`` for a lossless (byte-level BPE) tokenizer.
- ``IncrementalDetokenizer``: ids → text one token at a time, never splitting a multi-byte UTF-8 character
  (the prefix/read-offset scheme of TGI and vLLM); what streaming prints.
- ``round_trip(tok, text)``: ids, pieces and whether decoding gives the text back (``ragloop tokens``).
  Byte-level BPE (GPT-2, Radford et al. 2019; SmolLM2) is lossless; SentencePiece unigram tokenizers such
  as T5's (Kudo & Richardson 2018) normalise text (NFKC, whitespace), so for them it can fail — which is
  why the check exists rather than being assumed.
- ``load_tokenizer(spec)``: the tokenizer of a policy spec (re-exported from ``loading``).

Example (SmolLM2's tokenizer)::

    >>> ids = encode(tok, "Hi there")            # [26843, 665]
    >>> decode(tok, ids)
    'Hi there'
    >>> round_trip(tok, "Hi there").ok
    True

These used to live in ``loading`` (``load_tokenizer``), ``local`` (``LocalPolicy.tokenize/detokenize``) and
``decoding`` (``IncrementalDetokenizer``); those names still import from their old modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.models.loading import load_tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence

__all__ = ["IncrementalDetokenizer", "RoundTrip", "decode", "encode", "load_tokenizer", "round_trip"]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``: no BOS/EOS added, special-token strings become control tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` exactly: special tokens kept, no clean-up of spaces around punctuation."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class RoundTrip:
    """``round_trip``'s answer: the ids, each id's vocabulary piece and text, and the decoded whole."""

    text: str
    ids: list[int]
    pieces: list[str]  # vocabulary entries, e.g. "Ġthere" (byte-level BPE marks a leading space with Ġ)
    texts: list[str]  # each id decoded on its own (a piece of a multi-byte character shows as U+FFFD)
    decoded: str

    @property
    def ok(self) -> bool:
        """Whether decoding the ids gives the text back exactly."""
        return self.decoded == self.text


def round_trip(tokenizer: Any, text: str) -> RoundTrip:
    """Tokenize ``text``, decode it back and report both: ``round_trip(tok, "Hi").ok -> True``."""
    ids = encode(tokenizer, text)
    return RoundTrip(
        text=text,
        ids=ids,
        pieces=[str(p) for p in tokenizer.convert_ids_to_tokens(ids)],
        texts=[decode(tokenizer, [i]) for i in ids],
        decoded=decode(tokenizer, ids),
    )


class IncrementalDetokenizer:
    """Token ids → text, one token at a time, never splitting a multi-byte character.

    ``push`` returns the text that became final with this token ('' while a character is incomplete);
    ``flush`` returns whatever is left (incomplete bytes decode to U+FFFD). The concatenation of all
    pieces equals ``decode(tokenizer, ids)`` for byte-level BPE tokenizers. Each push decodes a short
    window (from the last emitted boundary), not the whole sequence, so streaming stays O(1) per token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    @property
    def pending(self) -> bool:
        """Whether some pushed tokens have not produced text yet (an incomplete character)."""
        return self._read < len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        if not self.pending:
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
