"""Training metrics on disk: JSONL (one row per logged step), CSV, PNG curves, and tensorboard if installed.

``MetricsLogger`` appends a row ``{"step": s, "time": t, **metrics}`` to ``metrics.jsonl``; ``close()``
rewrites ``metrics.csv`` over the union of keys and draws ``curves.png`` (matplotlib, Agg backend). When the
``tensorboard`` package is importable the same scalars go to ``<dir>/tb`` as well — it is not a hard
dependency. A logger reopened for a resumed run drops rows logged after the checkpoint it resumes from,
so a curve never shows the steps a killed run did twice.
"""

from __future__ import annotations

import csv
import json
import logging as _logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = _logging.getLogger(__name__)


class MetricsLogger:
    """Per-step metrics of one training run under ``out_dir``."""

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.jsonl.exists() and resume_step is not None:
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(row, dict) and row.get("step", math.inf) <= resume_step:
                    self.rows.append(row)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except (ImportError, ModuleNotFoundError):
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[k] = float(v) if hasattr(v, "item") else v
        self.rows.append(row)
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self, *, curves: Sequence[str] | None = None, title: str = "") -> None:
        write_csv(self.rows, self.dir / "metrics.csv")
        keys = list(curves) if curves else numeric_keys(self.rows)
        if self.rows and keys:
            plot_curves(self.rows, keys, self.dir / "curves.png", title=title)
        if self._tb is not None:
            self._tb.close()


def numeric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return keys


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def plot_curves(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """One small panel per metric against ``step``; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), int | float) for r in rows)][:12]
    n = max(1, len(keys))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float) and math.isfinite(r[k])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(pts) < 30 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
