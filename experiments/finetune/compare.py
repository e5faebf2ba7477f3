"""The main job: LoRA vs SDS-LoRA fine-tuning all-MiniLM-L6-v2 on movie-review sentiment.

``python -m experiments.finetune.compare [--steps N] [--workdir runs/compare]
[--quantization int8|int4|nf4]``

Trains each method with the same rank, data order and schedule (each at its learning
rate), then prints a side-by-side table (validation and test accuracy, final loss, step
time, trainable parameters) and writes it, the runs' summaries and the curves to
``experiments/results/minilm_sentiment.{md,json,png}`` (``minilm_sentiment_<type>.*``
with a quantized frozen base: QLoRA). A run interrupted (or killed) part-way resumes
from its checkpoint when the command is run again.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import flags

from experiments import cli
from experiments.finetune import reporting
from experiments.finetune.configs import minilm_sentiment

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"
# The learning rate of each method: 1e-3, a usual AdamW rate for LoRA at rank 8 on a
# model of this size, for both (the learning-rate sweep is the fine-tuning grid's).
METHODS = {"lora": 1e-3, "sds": 1e-3}
LABELS = {"lora": "LoRA", "sds": "SDS-LoRA", "rslora": "rsLoRA", "full": "full FT",
          "riemannian": "Riemannian LoRA"}


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", "runs/compare", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Override num_steps.", flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the table and plot go.", flag_values=FLAGS)
flags.DEFINE_string("methods", ",".join(METHODS), "Comma-separated methods.", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bars.", flag_values=FLAGS)
flags.DEFINE_string("quantization", "none", "The frozen base's storage: none, int8, int4 or nf4.",
                    flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)

  from experiments.finetune.train import finished_summary, train_and_evaluate

  summaries, curves = [], {}
  start = time.perf_counter()
  for method in args.methods.split(","):
    config = minilm_sentiment.get_config()
    config.method = method
    config.model.quantization = args.quantization
    config.optim.learning_rate = METHODS.get(method, config.optim.learning_rate)
    if args.steps:
      config.num_steps = args.steps
      config.eval_every = max(args.steps // 3, 1)
      config.checkpoint_every = max(args.steps // 3, 1)
    config.progress = not args.no_progress
    workdir = pathlib.Path(args.workdir) / method
    summary = finished_summary(config, workdir)
    if summary is not None:
      print(f"{method}: finished earlier in {workdir}, reusing its summary", file=sys.stderr)
    else:
      print(f"{method}: lr {config.optim.learning_rate}, rank {config.adapter.rank}, "
            f"{config.num_steps} steps -> {workdir}", file=sys.stderr)
      summary = train_and_evaluate(config, workdir, resume=True)
      if summary["interrupted"]:
        return 1
    summary = {**summary, "method": LABELS.get(method, method),
               "learning_rate": config.optim.learning_rate, "rank": config.adapter.rank}
    summaries.append(summary)
    curves[LABELS.get(method, method)] = reporting.MetricWriter(workdir, enabled=False).read()
  wall = time.perf_counter() - start

  table = reporting.summary_table(summaries)
  results = pathlib.Path(args.results)
  results.mkdir(parents=True, exist_ok=True)
  stem = "minilm_sentiment" + ("" if args.quantization == "none" else f"_{args.quantization}")
  base = "" if args.quantization == "none" else f", {args.quantization} base"
  reporting.plot_runs(curves, results / f"{stem}.png",
                      title=f"all-MiniLM-L6-v2, movie-review sentiment, rank 8{base}")
  (results / f"{stem}.md").write_text(table + "\n")
  keep = ("method", "learning_rate", "rank", "steps", "validation_accuracy", "test_accuracy",
          "final_train_loss", "step_time_median_s", "trainable_parameters")
  (results / f"{stem}.json").write_text(json.dumps(
    [{k: s.get(k) for k in keep} for s in summaries], indent=2) + "\n")
  print(table)
  print(f"\nwall time {wall:.0f} s; plot: {os.path.relpath(results / f'{stem}.png')}")
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
