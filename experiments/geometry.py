"""Gradient geometry during real fine-tuning: LoRA vs SDS-LoRA on MiniLM sentiment.

``python -m experiments.geometry [--steps 150] [--every 10] [--workdir runs/geometry]``

Fine-tunes all-MiniLM-L6-v2 on the movie-review sentences with each method (the main
job's settings, fewer steps by default) and logs ``sdslora_jax.diagnostics`` for every
adapted kernel every ``--every`` steps, on that step's batch:

* effective rank and condition number of the factor gradients (the paper's claim: LoRA's
  are scaled by the other factor's singular values, which lowers their effective rank;
  SDS-LoRA's are not);
* condition number and stable rank of the factors;
* the cosine between the full fine-tuning gradient of each kernel and the kernel update
  the method's gradient step induces (the claim: SDS-LoRA's is better aligned).

Writes ``experiments/results/geometry.json`` (one record per method, kernel and metric,
with its steps and values), ``geometry.md`` and ``geometry.png``. Runs checkpoint as the trainer does: an interrupted command
run again resumes; ``--regenerate`` rebuilds the plot from the JSON alone.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments.finetune import reporting
from experiments.finetune.configs import minilm_sentiment


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("lora", "sds")
LABELS = {"lora": "LoRA", "sds": "SDS-LoRA"}
PANELS = (
    ("grad_b_effective_rank", "effective rank of dL/db"),
    ("grad_a_effective_rank", "effective rank of dL/da"),
    ("grad_b_condition", "condition number of dL/db"),
    ("alignment", "cos(full-FT gradient, induced update)"),
)


def run(steps: int, every: int, workdir: pathlib.Path, progress: bool) -> list[dict]:
  from experiments.finetune.train import finished_summary, train_and_evaluate

  out = []
  for method in METHODS:
    config = minilm_sentiment.get_config()
    config.method = method
    config.num_steps = steps
    config.eval_every = config.checkpoint_every = max(steps // 2, 1)
    config.diagnostics.every = every
    config.diagnostics.alignment = True
    config.export = False
    config.progress = progress
    wd = workdir / method
    if finished_summary(config, wd) is None:
      print(f"{method}: {steps} steps, diagnostics every {every} -> {wd}", file=sys.stderr)
      if train_and_evaluate(config, wd, resume=True)["interrupted"]:
        raise SystemExit(1)
    latest = {}
    for r in reporting.MetricWriter(wd, enabled=False).read():
      if r["split"] == "diagnostics":
        latest[r["step"]] = r  # a resumed run may log a step twice: keep the last
    series: dict[tuple, list] = {}
    for step, r in sorted(latest.items()):
      for key, value in r.items():
        if key not in ("split", "step"):
          series.setdefault(tuple(key.rsplit("/", 1)), []).append((step, value))
    for (kernel, metric), pts in sorted(series.items()):
      out.append({"method": method, "kernel": kernel, "metric": metric,
                  "steps": [p[0] for p in pts], "values": [float(f"{p[1]:.5g}") for p in pts]})
  return out


def _flat(records: list[dict]) -> list[dict]:
  """One row per (method, kernel, metric, step) from the JSON's series."""
  return [{"method": r["method"], "kernel": r["kernel"], "metric": r["metric"], "step": s,
           "value": v} for r in records for s, v in zip(r["steps"], r["values"])]


def plot(records: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 3.0))
  colors = {"lora": "tab:red", "sds": "tab:blue"}
  for ax, (metric, title) in zip(axes, PANELS):
    for method in METHODS:
      rows = [r for r in records if r["method"] == method and r["metric"] == metric]
      for kernel in sorted({r["kernel"] for r in rows if r["kernel"] != "mean"}):
        pts = sorted((r["step"], r["value"]) for r in rows if r["kernel"] == kernel)
        xs, ys = zip(*pts)
        ax.plot(xs, np.clip(ys, None, 1e8), color=colors[method], lw=0.4, alpha=0.25)
      pts = sorted((r["step"], r["value"]) for r in rows if r["kernel"] == "mean")
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, np.clip(ys, None, 1e8), color=colors[method], lw=2,
                label=f"{LABELS[method]} (mean; thin: each kernel)")
    if "condition" in metric:
      ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=7)
  fig.suptitle("all-MiniLM-L6-v2, movie-review sentiment, rank 8: gradient geometry per "
               "adapted kernel", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=60)
  plt.close(fig)


def summary(records: list[dict]) -> str:
  """Markdown: each panel's mean metric at the first, middle and last logged step."""
  steps = sorted({r["step"] for r in records})
  picks = [steps[0], steps[len(steps) // 2], steps[-1]] if steps else []
  lines = ["| metric (mean over kernels) | method | " + " | ".join(f"step {s}" for s in picks)
           + " |", "|---|---|" + "---|" * len(picks)]
  for metric, title in PANELS:
    for method in METHODS:
      by = {r["step"]: r["value"] for r in records
            if r["method"] == method and r["metric"] == metric and r["kernel"] == "mean"}
      lines.append(f"| {title} | {LABELS[method]} | "
                   + " | ".join(f"{by.get(s, float('nan')):.3g}" for s in picks) + " |")
  return "\n".join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", 150, "Training steps.", flag_values=FLAGS)
flags.DEFINE_integer("every", 10, "Diagnostics every this many steps.", flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/geometry", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the table and plot go.", flag_values=FLAGS)
flags.DEFINE_bool("regenerate", False, "Rebuild the plot and table from geometry.json only.",
                  flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bars.", flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  results = pathlib.Path(args.results)
  results.mkdir(parents=True, exist_ok=True)
  if args.regenerate:
    records = json.loads((results / "geometry.json").read_text())
  else:
    start = time.perf_counter()
    records = run(args.steps, args.every, pathlib.Path(args.workdir), not args.no_progress)
    print(f"geometry: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    (results / "geometry.json").write_text(json.dumps(records) + "\n")
  plot(_flat(records), results / "geometry.png")
  md = summary(_flat(records))
  (results / "geometry.md").write_text(md + "\n")
  print(md)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
