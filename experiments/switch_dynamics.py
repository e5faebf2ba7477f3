"""What each update does to the adapters around SDS-LoRA's switch (MiniLM sentiment).

``python -m experiments.switch_dynamics [--lrs=1e-3,2e-3] [--steps 40] [--seed 0]``

Trains LoRA and SDS-LoRA (the main job's settings, 10-step warm-up) for ``--steps``
updates at each learning rate with ``diagnostics.step_metrics_until`` on, so every
update logs ``sdslora_jax.diagnostics.tree_step_metrics`` for all 36 adapters. Per
method, rate and update it reports the training loss and, over the adapters, the median
of: the factor norms ``|a|``, ``|b|``; the relative steps ``|da|/|a|``, ``|db|/|b|``; the
largest principal angle between consecutive spans of ``a`` and of ``b`` (degrees); and,
for SDS-LoRA, ``|dW_refresh| / |dW_step|``, the change of each layer's update that the
basis refresh causes against the one the step causes with the bases held (the SDS
gradient does not see the former). Writes ``experiments/results/switch_dynamics.{json,md}``.
The runs resume from their checkpoints when the command is run again.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from absl import flags

from experiments import cli
from experiments.finetune import reporting
from experiments.finetune.configs import minilm_sentiment

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
METRICS = ("a_norm", "b_norm", "a_rel_step", "b_rel_step", "a_angle_deg", "b_angle_deg",
           "refresh_to_step")

FLAGS = flags.FlagValues()
flags.DEFINE_list("lrs", ["1e-3", "2e-3"], "Peak learning rates.", flag_values=FLAGS)
flags.DEFINE_list("methods", ["lora", "sds"], "Methods.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 40, "Updates per run (the switch is after update 10).",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed.", flag_values=FLAGS)
flags.DEFINE_float("step_scale", 1.0, "SDS-LoRA's optim.sds_step_scale. The records in the "
                   "README are of 1.0 (unscaled; they predate the scaled default), except where "
                   "they say otherwise.", flag_values=FLAGS)
flags.DEFINE_integer("rewarmup_steps", 0, "SDS-LoRA's optim.sds_rewarmup_steps. The records "
                     "in the README are of 0 (they predate the re-warm-up default, 10).",
                     flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/switch_dynamics", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the records go.", flag_values=FLAGS)


def _per_step(rows: list[dict], losses: dict[int, float]) -> list[dict]:
  """Medians over the adapters of each update's metrics."""
  out = []
  for r in rows:
    by_metric: dict[str, list[float]] = {}
    for key, value in r.items():
      if "/" not in key:
        continue
      name = key.rsplit("/", 1)[1]
      by_metric.setdefault(name, []).append(value)
    a_norm, b_norm = by_metric["a_norm"], by_metric["b_norm"]
    derived = {
        "a_norm": a_norm, "b_norm": b_norm,
        "a_rel_step": [s / n for s, n in zip(by_metric["a_step"], a_norm) if n > 0],
        "b_rel_step": [s / n for s, n in zip(by_metric["b_step"], b_norm) if n > 0],
        "a_angle_deg": [v * 57.29578 for v in by_metric["a_angle"]],
        "b_angle_deg": [v * 57.29578 for v in by_metric["b_angle"]],
        "refresh_to_step": [v for v in by_metric["refresh_to_step"] if v == v],
    }
    rec = {"step": r["step"], "loss": losses.get(r["step"]),
           "switched": max(by_metric["switched"])}
    rec.update({k: statistics.median(v) if v else None for k, v in derived.items()})
    out.append(rec)
  return out


def _table(records: list[dict]) -> str:
  lines = ["| method | lr | step | loss | " + " | ".join(METRICS) + " |",
           "|---|---|---|---|" + "---|" * len(METRICS)]
  for rec in records:
    for row in rec["steps"]:
      if row["step"] % 2 and not 9 <= row["step"] <= 13:
        continue  # every other update, all of them around the switch
      cells = [rec["method"], f"{rec['lr']:g}", str(row["step"]),
               "-" if row["loss"] is None else f"{row['loss']:.4f}"]
      cells += ["-" if row[m] is None else f"{row[m]:.3g}" for m in METRICS]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  from absl import logging as absl_logging

  from experiments.finetune.train import train_and_evaluate

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and TFDS log every file at INFO

  records = []
  for lr in [float(x) for x in args.lrs]:
    for method in args.methods:
      config = minilm_sentiment.get_config()
      config.method, config.seed = method, args.seed
      config.optim.learning_rate = lr
      config.num_steps = args.steps
      config.log_every = 1
      config.eval_every = args.steps
      config.checkpoint_every = args.steps
      config.export = False
      config.progress = False
      config.diagnostics.step_metrics_until = args.steps
      config.optim.sds_step_scale = args.step_scale
      config.optim.sds_rewarmup_steps = args.rewarmup_steps
      tag = "" if args.step_scale == 1.0 or method != "sds" else f"_scale{args.step_scale:g}"
      tag += f"_rewarmup{args.rewarmup_steps}" if args.rewarmup_steps and method == "sds" else ""
      workdir = pathlib.Path(args.workdir) / f"{method}_lr{lr:g}_seed{args.seed}{tag}"
      print(f"{method} at lr {lr:g}: {workdir}", flush=True)
      train_and_evaluate(config, workdir, resume=True)
      metrics = reporting.read_metrics(workdir / "metrics.jsonl")
      losses = {r["step"]: r["loss"] for r in metrics if r["split"] == "train"}
      rows = [r for r in metrics if r["split"] == "step_metrics"]
      records.append({"method": method, "lr": lr, "seed": args.seed,
                      "step_scale": args.step_scale if method == "sds" else None,
                      "rewarmup_steps": args.rewarmup_steps if method == "sds" else None,
                      "steps": _per_step(rows, losses)})
  out = pathlib.Path(args.results)
  out.mkdir(parents=True, exist_ok=True)
  (out / "switch_dynamics.json").write_text(json.dumps(records, indent=1))
  table = _table(records)
  (out / "switch_dynamics.md").write_text(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
