"""Training checkpoints: safetensors for weights, JSON for state, verified on load (SECURITY.md §5).

Layout of one run directory::

    <run>/checkpoints/step-00000040/
        model.safetensors        # one file per tensor group ("model", "value_head", …)
        state.json               # step, epoch, metrics, KL controller, Python RNG …  (JSON only)
        torch_state.pt           # optimizer state + torch RNG states (tensors/numbers only)
        manifest.json            # format, step, and sha256 + size of every file above
    <run>/checkpoints/LATEST     # name of the newest complete checkpoint (replaced atomically)

Rules:
- A checkpoint is written into a temporary sibling directory, fsynced, then renamed; ``LATEST`` is replaced
  with ``os.replace`` only after that. A crash leaves either the old or the new checkpoint, never half.
- Nothing containing NaN/Inf is ever written (``TrainingError``), so the last checkpoint is always good.
- Loading checks every file against the manifest's sha256 and size (a truncated or tampered checkpoint is
  refused with a TrainingError naming the file), and reads ``torch_state.pt`` with
  ``torch.load(weights_only=True)`` — no arbitrary unpickling — and only from inside the run's own
  ``checkpoints`` directory (no symlinks leading out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragloop.core.errors import TrainingError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.json"
TORCH_STATE = "torch_state.pt"
LATEST = "LATEST"


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    state: dict[str, Any]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # group → name → tensor
    torch_state: dict[str, Any] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nonfinite_names(obj: Any, prefix: str = "") -> list[str]:
    """Names of floating tensors (nested in dicts/lists) that hold NaN or Inf."""
    import torch

    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += _nonfinite_names(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            bad += _nonfinite_names(v, f"{prefix}[{i}]")
    return bad


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, Any]],
    state: dict[str, Any],
    torch_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point ``LATEST`` at it; keeps the newest ``keep`` checkpoints.

    ``tensors``: group name → {tensor name → tensor} (each group is one safetensors file).
    ``state``: JSON-serialisable. ``torch_state``: optimizer state dicts and RNG tensors (saved with
    torch.save, loaded back with weights_only=True). Raises TrainingError if anything is NaN/Inf.
    """
    import torch
    from safetensors.torch import save_file

    bad = _nonfinite_names(tensors) + _nonfinite_names(torch_state or {}, "torch_state")
    if bad:
        raise TrainingError(f"refusing to save a checkpoint with non-finite values in {', '.join(bad[:5])}")
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        for group, tdict in tensors.items():
            if not group.isidentifier():
                raise ValueError(f"tensor group name must be an identifier, got {group!r}")
            clean = {k: v.detach().contiguous().cpu() for k, v in tdict.items()}
            save_file(clean, str(tmp / f"{group}.safetensors"), metadata={"format": "pt"})
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=1, sort_keys=True), encoding="utf-8")
        if torch_state is not None:
            torch.save(torch_state, tmp / TORCH_STATE)
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "groups": sorted(tensors), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. after a rollback): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name, encoding="utf-8")
    os.replace(pointer_tmp, root / LATEST)
    _fsync_path(root)
    _prune(root, keep=keep, current=name)
    return final


def _prune(root: Path, *, keep: int, current: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for p in steps[: max(0, len(steps) - keep)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``LATEST`` names, or None when the run has none yet."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not name.startswith("step-") or "/" in name or "\\" in name:
        raise TrainingError(f"{pointer} is damaged (names {name!r})", hint="delete the run directory or pick a checkpoint")
    return root / name


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
        return True
    except (ValueError, FileNotFoundError):
        return False


def load_checkpoint(run_dir: str | Path, path: str | Path | None = None, *, load_torch_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint of ``run_dir`` (``LATEST`` when ``path`` is None).

    Raises TrainingError when there is none, when it lies outside the run's checkpoints directory, or when
    a file is missing, truncated or altered (sha256 mismatch).
    """
    import torch
    from safetensors.torch import load_file

    root = checkpoints_dir(run_dir)
    ck = Path(path) if path is not None else latest_checkpoint(run_dir)
    if ck is None:
        raise TrainingError(f"no checkpoint in {run_dir}", hint="start without --resume to begin a new run")
    if not _inside(ck, root):
        raise TrainingError(f"refusing to load {ck}: checkpoints are only read from the run's own {root}")
    try:
        manifest = json.loads((ck / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"checkpoint {ck} has no readable manifest ({e})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise TrainingError(f"checkpoint {ck}: unknown manifest format {manifest.get('format')!r}")
    for fname, meta in manifest["files"].items():
        f = ck / fname
        if "/" in fname or not _inside(f, ck):
            raise TrainingError(f"checkpoint {ck}: file {fname} is missing or outside the checkpoint")
        if f.stat().st_size != meta.get("bytes"):
            raise TrainingError(f"checkpoint {ck}: {fname} has {f.stat().st_size} bytes, expected {meta.get('bytes')} "
                                f"(truncated or altered)")
        if _sha256(f) != meta.get("sha256"):
            raise TrainingError(f"checkpoint {ck}: {fname} does not match its sha256 (altered or damaged)")
    unlisted = {p.name for p in ck.iterdir()} - set(manifest["files"]) - {MANIFEST}
    if unlisted:
        raise TrainingError(f"checkpoint {ck}: unexpected files {sorted(unlisted)}")
    state = json.loads((ck / STATE).read_text(encoding="utf-8"))
    tensors = {g: load_file(str(ck / f"{g}.safetensors")) for g in manifest.get("groups", [])}
    torch_state = None
    if load_torch_state and TORCH_STATE in manifest["files"]:
        torch_state = torch.load(ck / TORCH_STATE, weights_only=True, map_location="cpu")
    return Checkpoint(path=ck, step=int(manifest["step"]), state=state, tensors=tensors, torch_state=torch_state)


# ----------------------------------------------------------------------------------------- RNG state


def capture_rng(generator: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch part, JSON part) of the RNG state: torch's global RNG (+ a data-order generator) as tensors,
    Python's ``random`` as JSON."""
    import random

    import torch

    torch_part = {"torch": torch.get_rng_state()}
    if generator is not None:
        torch_part["data"] = generator.get_state()
    version, internal, gauss = random.getstate()
    return torch_part, {"python_random": [version, list(internal), gauss]}


def restore_rng(torch_part: dict[str, Any], json_part: dict[str, Any], generator: Any | None = None) -> None:
    import random

    import torch

    torch.set_rng_state(torch_part["torch"])
    if generator is not None and "data" in torch_part:
        generator.set_state(torch_part["data"])
    if "python_random" in json_part:
        v, internal, gauss = json_part["python_random"]
        random.setstate((v, tuple(internal), gauss))


# ------------------------------------------------------------------------------------- policy export

POLICY_META = "ragloop.json"


def export_policy(model: Any, tokenizer: Any, out_dir: str | Path, *, name: str, manifest: dict[str, Any]) -> Path:
    """Write a policy that ``load_policy(out_dir)`` accepts: plain HF layout (config.json, model.safetensors,
    tokenizer files) with LoRA adapters merged into the weights, plus ``ragloop.json`` (the run manifest:
    config, seed, versions, data hashes). The training model is not modified (a merged copy is written).
    An existing directory at ``out_dir`` is replaced only after the new one is complete."""
    import copy

    from ragloop.models.loading import write_model_dir

    merged = model
    if hasattr(model, "merge_and_unload"):  # a peft LoRA model: merge a copy
        merged = copy.deepcopy(model).merge_and_unload()
    bad = _nonfinite_names(dict(merged.state_dict()))
    if bad:
        raise TrainingError(f"refusing to export a policy with non-finite weights ({', '.join(bad[:3])})")
    out = Path(out_dir)
    aside = None
    if out.exists():
        aside = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.rename(out, aside)
    try:
        write_model_dir(merged, tokenizer, out, metadata={"name": name, "kind": "policy", "run": manifest},
                        manifest_name=POLICY_META)
    except BaseException:
        if aside is not None and not out.exists():
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def run_manifest(config: dict[str, Any], *, seed: int, data: dict[str, str] | None = None) -> dict[str, Any]:
    """What a run was: its config, seed, library versions and the sha256 of its data."""
    import platform
    import time
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("ragloop", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config, "seed": seed,
            "versions": versions, "data": data or {}}
