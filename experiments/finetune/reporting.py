"""Progress, metrics (JSON lines and TensorBoard events), curves and summary tables.

Metrics are written through clu: a ``clu.metric_writers.MultiWriter`` of
:class:`JsonlWriter` (``metrics.jsonl``, what :func:`read_metrics` and the plots read),
:class:`TensorBoardXWriter` (TensorBoard events without TensorFlow) and clu's
``LoggingWriter``; the trainer's logging windows are timed by
``clu.periodic_actions.ReportProgress`` on a :class:`TrainClock`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _import_clu():
  """``clu.metric_writers`` and ``clu.periodic_actions``, without importing TensorFlow.

  clu 0.0.12's ``clu/metric_writers/__init__.py`` imports its TensorFlow summary writer
  (``import tensorflow``, 5.3 s on a 2-core CPU, and no dependency of clu's nor of the
  experiments'), and ``clu.periodic_actions`` imports that package. What is used here
  (the ``MetricWriter`` interface, ``MultiWriter``, ``LoggingWriter``, the periodic
  actions) needs none of it, so the package is registered with those modules alone; any
  other of its names (``SummaryWriter``, ``create_default_writer``) runs the real
  ``__init__`` when first read. Where it was imported already, it is used as it is.
  """
  if "clu.metric_writers" not in sys.modules:
    import clu

    spec = importlib.util.find_spec("clu.metric_writers")
    package = importlib.util.module_from_spec(spec)

    def full_package(name):
      if name.startswith("__"):
        raise AttributeError(name)
      vars(package).pop("__getattr__", None)
      spec.loader.exec_module(package)
      return getattr(package, name)

    package.__getattr__ = full_package
    sys.modules["clu.metric_writers"] = package
    clu.metric_writers = package
    interface = importlib.import_module("clu.metric_writers.interface")
    package.MetricWriter = interface.MetricWriter
    package.MultiWriter = importlib.import_module("clu.metric_writers.multi_writer").MultiWriter
    package.LoggingWriter = importlib.import_module(
        "clu.metric_writers.logging_writer").LoggingWriter
  from clu import metric_writers, periodic_actions
  return metric_writers, periodic_actions


metric_writers, periodic_actions = _import_clu()


class JsonlWriter(metric_writers.MetricWriter):
  """A clu metric writer of JSON lines: ``{"split", "step", name: value, ...}`` records.

  A scalar named ``split/name`` goes to the record of ``split`` as ``name`` (the name
  may hold more slashes); one ``write_scalars`` call gives one record per split. Only
  scalars are kept (texts, images and the rest go to the other writers). The file is
  opened for each record, appended to, never through a symbolic link; a torn last record
  (a writer killed mid-line) is dropped when the writer opens it again: its step is
  logged again after the resume, which restarts from a checkpoint before it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if self.path.is_symlink():
      raise ValueError(f"{self.path} is a symbolic link; the trainer writes only files it "
                       "created (remove the link)")
    if self.path.exists():
      data = self.path.read_bytes()
      if data and not data.endswith(b"\n"):
        with open(self.path, "r+b") as f:
          f.truncate(data.rfind(b"\n") + 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    records = {}
    for key, value in scalars.items():
      split, _, name = key.partition("/")
      if not name:
        raise ValueError(f"scalar {key!r}: metrics.jsonl needs names 'split/name'")
      records.setdefault(split, {"split": split, "step": int(step)})[name] = _num(value)
    if not records:
      return
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as f:
      f.write("".join(json.dumps(r) + "\n" for r in records.values()))

  def read(self) -> list[dict]:
    return read_metrics(self.path)

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a ``metrics.jsonl``, by step; for a step logged twice (a run resumed
  before it), the last one. A torn last record (the run was killed while writing it) is
  left out; any other line that is not JSON is an error."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  latest = {}
  lines = path.read_text().split("\n")
  for i, line in enumerate(lines):
    if line.strip():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        if i == len(lines) - 1:
          break
        raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
      latest[(r["split"], r["step"])] = r
  return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))


class TensorBoardXWriter(metric_writers.MetricWriter):
  """A clu metric writer of TensorBoard event files through ``tensorboardX``.

  clu's own ``SummaryWriter`` needs TensorFlow and its ``TorchTensorboardWriter`` needs
  PyTorch; tensorboardX needs neither. Scalars that are not finite are left out.
  """

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.fspath(logdir))

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      value = float(value)
      if math.isfinite(value):
        self._tb.add_scalar(key, value, int(step))

  def write_texts(self, step, texts):
    for key, text in texts.items():
      self._tb.add_text(key, text, int(step))

  def write_hparams(self, hparams):
    self.write_texts(0, {"hparams": "```\n" + json.dumps(dict(hparams), indent=2,
                                                             default=str) + "\n```"})

  def write_images(self, step, images):
    for key, image in images.items():
      image = np.asarray(image)
      self._tb.add_images(key, image if image.ndim == 4 else image[None], int(step),
                          dataformats="NHWC")

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, array in arrays.items():
      bins = (num_buckets or {}).get(key, "tensorflow")
      self._tb.add_histogram(key, np.asarray(array), int(step), bins=bins)

  def write_summaries(self, step, values, metadata=None):
    raise NotImplementedError("TensorBoardXWriter writes no raw summaries")

  def write_videos(self, step, videos):
    raise NotImplementedError("TensorBoardXWriter writes no videos")

  def write_audios(self, step, audios, *, sample_rate):
    raise NotImplementedError("TensorBoardXWriter writes no audio")

  def flush(self):
    self._tb.flush()

  def close(self):
    self._tb.close()


class MetricWriter:
  """The trainer's metrics: ``write(split, step, values)`` to a clu ``MultiWriter``.

  Its writers are :class:`JsonlWriter` (``workdir/metrics.jsonl``),
  :class:`TensorBoardXWriter` (``workdir/tensorboard``) and clu's ``LoggingWriter``
  (absl logging at INFO); each value ``v`` of ``split`` is the scalar ``split/name``.
  Only the lead process writes (``enabled``); any process can ``read``.
  """

  def __init__(self, workdir: pathlib.Path, *, enabled: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    writers = []
    if enabled:
      writers = [JsonlWriter(self.path), TensorBoardXWriter(pathlib.Path(workdir) / "tensorboard"),
                 metric_writers.LoggingWriter()]
    self.writer = metric_writers.MultiWriter(writers)

  def write(self, split: str, step: int, values: Mapping[str, Any]) -> None:
    if self.enabled and values:
      self.writer.write_scalars(int(step), {f"{split}/{k}": v for k, v in values.items()})

  def write_hparams(self, meta: Mapping[str, Any]) -> None:
    """The run's metadata (nested JSON) as TensorBoard text ``run``."""
    if self.enabled:
      self.writer.write_texts(0, {"run": "```\n" + json.dumps(meta, indent=2) + "\n```"})

  def read(self) -> list[dict]:
    """All records; for a step logged twice (a run resumed before it), the last one."""
    return read_metrics(self.path)

  def close(self) -> None:
    self.writer.close()


class LastScalars(metric_writers.MultiWriter):
  """A clu writer that keeps the scalars written to it (the latest value of each name)
  instead of writing them: how the trainer reads ``ReportProgress``'s ``steps_per_sec``."""

  def __init__(self):
    super().__init__([])
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.update(scalars)


class TrainClock:
  """Monotonic time less the time spent in :meth:`paused` blocks (evaluation, checkpoints,
  diagnostics): the clock ``ReportProgress`` times the training steps with."""

  def __init__(self):
    self._paused = 0.0

  def __call__(self) -> float:
    return time.monotonic() - self._paused

  @contextlib.contextmanager
  def paused(self):
    start = time.monotonic()
    try:
      yield
    finally:
      self._paused += time.monotonic() - start


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
