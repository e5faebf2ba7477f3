"""Progress, metrics (JSON lines and TensorBoard events), curves and summary tables."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class MetricWriter:
  """Appends ``{"split", "step", ...}`` records to ``metrics.jsonl`` and TensorBoard.

  TensorBoard event files are written by ``tensorboardX`` (no TensorFlow) under
  ``workdir/tensorboard``. Only the lead process writes (``enabled``).
  """

  def __init__(self, workdir: pathlib.Path, *, enabled: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._repair()
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def _repair(self) -> None:
    """Drops a torn last record (a writer killed mid-line); its step is logged again after
    the resume, which restarts from a checkpoint before it."""
    if self.path.is_symlink():
      raise ValueError(f"{self.path} is a symbolic link; the trainer writes only files it "
                       "created (remove the link)")
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    if data and not data.endswith(b"\n"):
      with open(self.path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)

  def write(self, split: str, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled or not values:
      return
    record = {"split": split, "step": int(step), **{k: _num(v) for k, v in values.items()}}
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def write_hparams(self, meta: Mapping[str, Any]) -> None:
    if self.enabled:
      self._tb.add_text("run", "```\n" + json.dumps(meta, indent=2) + "\n```")

  def read(self) -> list[dict]:
    """All records; for a step logged twice (a run resumed before it), the last one."""
    if not self.path.exists():
      return []
    latest = {}
    lines = self.path.read_text().split("\n")
    for i, line in enumerate(lines):
      if line.strip():
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          if i == len(lines) - 1:  # a torn last record: the run was killed while writing it
            break
          raise ValueError(f"{self.path}:{i + 1}: not a JSON record") from None
        latest[(r["split"], r["step"])] = r
    return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def write_atomic(path: pathlib.Path, data: bytes | str) -> None:
  """Writes ``path`` whole or not at all: a new file beside it, then a rename over it (which
  replaces a symbolic link at ``path`` instead of writing through it)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _num(v):
  try:
    return float(v) if not isinstance(v, (int, str)) else v
  except (TypeError, ValueError):
    return str(v)


class Progress:
  """A tqdm bar with loss, learning rate and throughput, on stderr."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                       desc="train")

  def update(self, step: int, record: Mapping[str, float], unit: str) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                          **{f"{unit}/s": f"{record[f'{unit}_per_s']:.0f}"})

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def plot_run(records: Sequence[Mapping[str, Any]], path, *, title: str = "") -> None:
  """Training loss and validation accuracy against step, one run."""
  plot_runs({title or "run": records}, path)


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path, *, title: str = "") -> None:
  """Training loss (left) and validation accuracy (right) of several runs, one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
  for name, records in runs.items():
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval" and "accuracy" in r]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name, lw=1.2)
    ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label=name)
  ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
  ax_acc.set(xlabel="step", ylabel="validation accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  write_atomic(path, buf.getvalue())
  plt.close(fig)


_COLUMNS = (
  ("method", "method", "{}"),
  ("validation_accuracy", "val. acc.", "{:.4f}"),
  ("test_accuracy", "test acc.", "{:.4f}"),
  ("final_train_loss", "final loss", "{:.4f}"),
  ("step_time_median_s", "step time (s)", "{:.3f}"),
  ("trainable_parameters", "trainable params", "{:,}"),
)


def summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of run summaries."""
  head = "| " + " | ".join(c[1] for c in _COLUMNS) + " |"
  rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
  rows = []
  for s in summaries:
    cells = []
    for key, _, fmt in _COLUMNS:
      v = s.get(key)
      cells.append("-" if v is None else fmt.format(v))
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join([head, rule, *rows])
