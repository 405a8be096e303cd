"""Encoder-decoder policies (T5, BART, …) behind the ``Policy`` protocol, the three model families, and T5's
span corruption.

Three families of transformer (Vaswani et al. 2017) are used in ragloop (``docs/ARCHITECTURES.md``):

- *decoder-only* (GPT, Radford et al. 2018; SmolLM2): one causal stack reads the prompt and writes the
  continuation — the default policy (``LocalPolicy``);
- *encoder-decoder* (T5, Raffel et al. 2020; BART, Lewis et al. 2020): a bidirectional encoder reads the
  prompt once, a causal decoder writes the answer while cross-attending to it — ``Seq2SeqPolicy`` here;
- *encoder-only* (BERT, Devlin et al. 2019; MiniLM): a bidirectional stack that encodes but cannot
  generate — the embedder and the reward model.

``model_family(config)`` tells them apart from a ``config.json``.

``Seq2SeqPolicy`` decodes with the same loop as the decoder-only policy (``decoding.DecodeRun``: greedy,
temperature, top-k, top-p, repetition penalty, stop strings, n candidates, logprobs, streaming), over a
``Seq2SeqStepper``: ``prefill`` runs the encoder once on the prompt and the decoder on its start token;
``step`` feeds one decoder token with the self-attention cache. The prompt (a raw string, or chat messages
rendered with the tokenizer's chat template) is the *encoder* input; the generation is the decoder's.
``prompt_tokens`` counts encoder tokens. A raw string is therefore input, not text to continue: a prompt that
prefills the start of the answer (PAL's raw style) does not carry over — the decoder starts afresh. The
repetition penalty counts the prompt's tokens as seen, as for the decoder-only policy (transformers counts
only decoder tokens for encoder-decoders). The encoder and the decoder each have the context window
(``n_positions``), checked separately. Grammar-constrained decoding, the fast decode path and reduced
precisions are not offered for this family (a UsageError says so).

SFT trains it with the loss on the target only: the encoder reads the conversation up to an assistant turn,
the decoder learns that turn (``ragloop.alignment.seq2seq_data``). PPO is not offered for this family.

``span_corrupt`` is T5's pre-training objective (Raffel et al. 2020, §3.1.4 and Fig. 2): random spans of
the input are replaced by sentinel tokens ``<extra_id_0>``, ``<extra_id_1>``, … and the target lists each
sentinel followed by the words it replaced, ending with one more sentinel.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from ragloop.core.errors import ModelLoadError, UsageError
from ragloop.models.chat import check_fits, render_messages
from ragloop.models.decoding import DecodeRun, left_pad
from ragloop.models.tokenizer import decode as tokenizer_decode
from ragloop.models.tokenizer import encode as tokenizer_encode
from ragloop.models.types import ChatMessages, Generation, GenerationConfig, Prompt, as_messages

log = logging.getLogger(__name__)

Family = Literal["decoder-only", "encoder-decoder", "encoder-only"]
FAMILIES: tuple[Family, ...] = ("decoder-only", "encoder-decoder", "encoder-only")

# model types that are encoders only (they appear in transformers' causal-LM table too, as BERT-as-decoder)
_ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                            "xlm-roberta", "mpnet", "camembert", "modernbert", "nomic_bert"})
_ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                  "ForMultipleChoice")

__all__ = ["FAMILIES", "Family", "Seq2SeqPolicy", "Seq2SeqStepper", "load_seq2seq_policy", "model_family",
           "read_model_family", "span_corrupt", "span_corrupt_words", "random_spans"]


# --------------------------------------------------------------------------------------------------------
# families


def model_family(config: Mapping[str, Any]) -> Family:
    """The family of a model from its ``config.json`` contents::

        model_family({"model_type": "t5", "is_encoder_decoder": True})          -> "encoder-decoder"
        model_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) -> "decoder-only"
        model_family({"model_type": "bert", "architectures": ["BertModel"]})    -> "encoder-only"
    """
    if config.get("is_encoder_decoder"):
        return "encoder-decoder"
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) and not a.startswith("Bert") for a in archs):
        return "decoder-only"
    if str(config.get("model_type", "")) in _ENCODER_TYPES or any(a.endswith(_ENCODER_HEADS) for a in archs):
        return "encoder-only"
    return "decoder-only"


def read_model_family(model_dir: str | os.PathLike[str]) -> Family:
    """``model_family`` of the ``config.json`` in ``model_dir`` (decoder-only when there is none, e.g. GGUF)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return "decoder-only"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"unreadable {path}: {e}", hint="restore the model directory") from None
    return model_family(config if isinstance(config, dict) else {})


# --------------------------------------------------------------------------------------------------------
# span corruption (T5)


def random_spans(n: int, *, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 rng: random.Random) -> list[tuple[int, int]]:
    """Noise spans ``[start, end)`` over ``n`` items, as T5's ``random_spans_noise_mask``: ``round(n ·
    noise_density)`` noise items (at least 1, fewer than ``n``) in ``round(noise / mean_span_length)`` spans
    (at least 1); noise and non-noise lengths are random partitions, interleaved starting with non-noise."""
    if n < 2:
        return []
    num_noise = min(max(round(n * noise_density), 1), n - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, n - num_noise)

    def partition(total: int, parts: int) -> list[int]:  # ``parts`` positive integers summing to ``total``
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    noise, keep = partition(num_noise, num_spans), partition(n - num_noise, num_spans)
    spans, pos = [], 0
    for k, z in zip(keep, noise, strict=True):
        pos += k
        spans.append((pos, pos + z))
        pos += z
    return spans


def span_corrupt_words(words: Sequence[str], spans: Sequence[tuple[int, int]], *,
                       sentinel: str = "<extra_id_{}>") -> tuple[str, str]:
    """Replace each span of ``words`` by a sentinel; the target is each sentinel followed by what it hid, then
    a closing sentinel (T5 paper, Fig. 2)::

        >>> span_corrupt_words("Thank you for inviting me to your party last week .".split(), [(2, 4), (8, 9)])
        ('Thank you <extra_id_0> me to your party <extra_id_1> week .', '<extra_id_0> for inviting <extra_id_1> last <extra_id_2>')
    """
    spans = sorted(spans)
    for (s, e), nxt in zip(spans, [*spans[1:], (len(words), len(words))], strict=True):
        if not (0 <= s < e <= nxt[0] <= len(words)):
            raise ValueError(f"spans must be non-empty, in range and disjoint: {list(spans)}")
    inp: list[str] = []
    tgt: list[str] = []
    pos = 0
    for i, (s, e) in enumerate(spans):
        inp += [*words[pos:s], sentinel.format(i)]
        tgt += [sentinel.format(i), *words[s:e]]
        pos = e
    inp += words[pos:]
    tgt.append(sentinel.format(len(spans)))
    return " ".join(inp), " ".join(tgt)


def span_corrupt(text: str, *, noise_density: float = 0.15, mean_span_length: float = 3.0, seed: int = 0,
                 sentinel: str = "<extra_id_{}>") -> tuple[str, str]:
    """T5's span-corruption pair ``(input, target)`` for ``text`` (Raffel et al. 2020): about
    ``noise_density`` of its whitespace-separated words, in spans of mean length ``mean_span_length``,
    hidden behind sentinels. T5 corrupts SentencePiece tokens; words keep the pair readable and
    tokenizer-independent. Same ``seed`` → same pair. With a text of 10 words (1.5 → 2 noise words, 1 span)::

        >>> span_corrupt("Thank you for inviting me to your party last week.", seed=0)
        ('Thank you for inviting me to your party <extra_id_0>', '<extra_id_0> last week. <extra_id_1>')
    """
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_span_length >= 1:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
    words = text.split()
    if len(words) < 2:
        raise ValueError("span corruption needs a text of at least two words")
    spans = random_spans(len(words), noise_density=noise_density, mean_span_length=mean_span_length,
                         rng=random.Random(seed))
    return span_corrupt_words(words, spans, sentinel=sentinel)


# --------------------------------------------------------------------------------------------------------
# decoding


def _to_right_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows → right-padded (real tokens first): absolute-position encoders (BART) must see
    each prompt at positions 0…n-1 whatever the batch; ``[[0, 5, 6]] -> [[5, 6, 0]]``."""
    pads = (mask == 0).sum(dim=1)  # (B,)
    if not bool(pads.any()):
        return ids, mask
    rows = [torch.roll(ids[b], -int(pads[b])) for b in range(ids.shape[0])]
    masks = [torch.roll(mask[b], -int(pads[b])) for b in range(ids.shape[0])]
    return torch.stack(rows), torch.stack(masks)  # (B, S) each


class Seq2SeqStepper:
    """The forward pass of an encoder-decoder for ``DecodeRun``: the encoder once, then the decoder token by
    token with its cache (self-attention keys/values grow; cross-attention's are computed once)."""

    def __init__(self, model: Any, start_id: int) -> None:
        self.model = model
        self.start_id = int(start_id)
        self._encoded: Any = None
        self._mask: torch.Tensor | None = None
        self._cache: Any = None

    def _decoder(self, dec_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=self._encoded, attention_mask=self._mask, decoder_input_ids=dec_ids,
                         cache=self._cache, use_cache=True)
        self._cache = out.past_key_values
        return out.logits[:, -1, :].float()  # (B, V)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        ids, mask = _to_right_padding(input_ids, attention_mask.long())
        self._mask = mask.to(device)  # (B, S) the encoder's padding, also the cross-attention mask
        self._encoded = self.model.get_encoder()(input_ids=ids.to(device), attention_mask=self._mask)
        self._cache = None
        start = torch.full((ids.shape[0], 1), self.start_id, dtype=torch.long, device=device)  # (B, 1)
        return self._decoder(start)

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self._encoded is None or self._mask is None:
            raise RuntimeError("step() before prefill()")
        return self._decoder(next_ids.to(self._mask.device).view(-1, 1))  # (B, 1) in → (B, V) out


def _end_ids(model: Any, tokenizer: Any) -> set[int]:
    from ragloop.models.local import _end_token_ids  # the decoder-only policy's rule, shared

    return _end_token_ids(model, tokenizer)


class Seq2SeqPolicy:
    """A local encoder-decoder model as a ``Policy``. See the module docstring."""

    family: Family = "encoder-decoder"

    def __init__(self, model: Any, tokenizer: Any, *, name: str, context_window: int | None = None,
                 max_batch_rows: int = 64) -> None:
        config = model.config
        if not getattr(config, "is_encoder_decoder", False):
            raise UsageError(f"{name} is not an encoder-decoder model", hint="load it with LocalPolicy")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        cw = context_window or getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.context_window = int(cw or 512)  # T5's relative positions have no hard limit; 512 is what it saw
        self.max_batch_rows = max_batch_rows
        self.end_ids = _end_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(config, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else min(self.end_ids))
        start = getattr(config, "decoder_start_token_id", None)
        self.start_id = int(start if start is not None else self.pad_id)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise UsageError(f"{name} has no end-of-sequence token", hint="set eos_token_id in its config")
        self.eos_id = int(eos)  # appended to every training target, so the decoder learns to stop

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str = "seq2seq",
                   context_window: int | None = None) -> Seq2SeqPolicy:
        """Wrap an in-memory encoder-decoder and its tokenizer (e.g. ``build_tiny_t5``'s) as a policy."""
        from ragloop.models.chat import ensure_chat_template

        ensure_chat_template(tokenizer)
        return cls(model, tokenizer, name=name, context_window=context_window)

    def __repr__(self) -> str:
        return f"Seq2SeqPolicy(name={self.name!r}, context_window={self.context_window})"

    # -- text ----------------------------------------------------------------------------------------------

    def render(self, messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages``: the encoder's input text (shared with training)."""
        return render_messages(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        return tokenizer_encode(self.tokenizer, text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return tokenizer_decode(self.tokenizer, ids)

    def encode(self, prompt: Prompt) -> list[int]:
        """The encoder's input ids for ``prompt`` (with the tokenizer's own special tokens, e.g. T5's ``</s>``)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty", hint="give some text to continue")
            text = prompt
        else:
            msgs = as_messages(prompt)
            if not msgs or not any(m["content"].strip() for m in msgs):
                raise UsageError("the prompt is empty", hint="give at least one message with some content")
            text = self.render(msgs)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode(prompt))

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """The encoder's input and the decoder's output each within the context window."""
        check_fits(prompt_tokens, 0, self.context_window)
        check_fits(0, max_new_tokens, self.context_window)

    # -- decoding ------------------------------------------------------------------------------------------

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = bool(getattr(self.model, "training", False))
        if was_training:
            self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def _encode_checked(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[list[int]]:
        if cfg.grammar is not None:
            raise UsageError(f"{self.name} is an encoder-decoder policy: grammar-constrained decoding is not "
                             "supported for it", hint="drop the grammar, or use a decoder-only policy")
        encoded = []
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            try:
                self.check_fits(len(ids), cfg.max_new_tokens)
            except UsageError as e:
                if len(prompts) > 1:
                    e.message = f"prompt {i}: {e.message}"
                    e.args = (e.message,)
                raise
            encoded.append(ids)
        return encoded

    def _run(self, encoded: Sequence[list[int]], cfg: GenerationConfig, offset: int = 0) -> DecodeRun:
        return DecodeRun(Seq2SeqStepper(self.model, self.start_id), encoded, cfg, tokenizer=self.tokenizer,
                         end_ids=self.end_ids, pad_id=self.pad_id, prompt_offset=offset)

    def decode_run(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> DecodeRun:
        """A lazy batched decode (iterate for ``(row, text)`` pieces, then ``.results()``), as ``LocalPolicy``'s."""
        cfg = cfg or GenerationConfig()
        return self._run(self._encode_checked(prompts, cfg), cfg)

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        """``cfg.n`` candidates for one prompt (sampled as one batch)."""
        return self.generate_batch([prompt], cfg)[0]

    def generate_batch(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> list[list[Generation]]:
        """``cfg.n`` candidates for each prompt, in batches of at most ``max_batch_rows`` rows."""
        cfg = cfg or GenerationConfig()
        if isinstance(prompts, str):
            raise UsageError("generate_batch takes a list of prompts, not one string")
        if not prompts:
            return []
        encoded = self._encode_checked(prompts, cfg)
        per_chunk = max(1, self.max_batch_rows // cfg.n)
        out: list[list[Generation]] = []
        with self._eval_mode():
            for start in range(0, len(encoded), per_chunk):
                out.extend(self._run(encoded[start : start + per_chunk], cfg, start).results())
        return out

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Text pieces of one candidate as they are decoded; their concatenation equals ``generate``'s text."""
        cfg = cfg or GenerationConfig()
        if cfg.n != 1:
            raise UsageError(f"streaming produces one candidate; got n={cfg.n}", hint="use n=1 to stream")
        run = self.decode_run([prompt], cfg)
        with self._eval_mode():
            for _, piece in run:
                yield piece

    # -- scoring -------------------------------------------------------------------------------------------

    def score(self, prompt: Prompt, continuation: str) -> list[float]:
        """Per-token log-probabilities of ``continuation``'s tokens as the decoder's output for ``prompt``."""
        enc = self.encode(prompt)
        target = self.tokenize(continuation)
        if not target:
            return []
        self.check_fits(len(enc), len(target))
        device = self.model.device
        ids = torch.tensor([enc], dtype=torch.long, device=device)  # (1, S)
        dec = torch.tensor([[self.start_id, *target[:-1]]], dtype=torch.long, device=device)  # (1, T) shifted right
        with torch.no_grad(), self._eval_mode():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        lp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
        return lp.gather(-1, torch.tensor(target, device=device).unsqueeze(-1)).squeeze(-1).tolist()

    def logprobs_of(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError(f"{self.name} is an encoder-decoder policy: PPO is not supported for it",
                         hint="train it with SFT, or run PPO on a decoder-only policy")

    def batch_inputs(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` for id lists, with this policy's pad token."""
        return left_pad(seqs, self.pad_id)


# --------------------------------------------------------------------------------------------------------
# loading


def load_seq2seq_policy(path: str | os.PathLike[str], *, name: str | None = None, dtype: Any = "float32") -> Seq2SeqPolicy:
    """A ``Seq2SeqPolicy`` from a local Hugging Face directory (``AutoModelForSeq2SeqLM``; offline)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ragloop.core.config import set_offline_defaults
    from ragloop.models.chat import ensure_chat_template
    from ragloop.models.loading import _quiet_progress, resolve_dtype

    set_offline_defaults()
    p = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        with _quiet_progress():  # no progress bar for a load that takes a second (as for decoder-only policies)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(p), dtype=resolve_dtype(dtype), local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"could not load encoder-decoder model from {p}: {type(e).__name__}: {e}") from None
    ensure_chat_template(tok)
    model.eval()
    return Seq2SeqPolicy(model, tok, name=name or p.name)
