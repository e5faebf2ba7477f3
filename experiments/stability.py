"""SDS-LoRA at twice LoRA's best learning rate: divergence and the loss jump at the switch.

``python -m experiments.stability [--tasks minilm,efficientnet] [--seeds 0,1,2,3,4]``

Each task is the fine-tuning grid's rank-8 run (``experiments.finetune.grid``) at twice
the rate the grid chose for LoRA (MiniLM 2e-3, EfficientNet 4e-3), with training losses
logged every step, for ``VARIANTS``: LoRA, SDS-LoRA as it was before the step-size fix
(``sds_unscaled``) and SDS-LoRA's defaults. Per run:

- ``diverged``: the mean training loss of the last 20 steps is above 95 % of that of the
  first 5: the run learned nothing, or undid it (MiniLM starts near ``ln 2``, where a run
  collapsed to one class also ends; healthy runs end at 60-75 % of it, EfficientNet's at
  about 27 %);
- ``jump``: the largest loss of the 5 updates after the switch minus the mean of the 5
  before it (as in ``experiments.ablations``);
- ``lora_change``: LoRA's largest step-to-step loss change (absolute) in the same steps
  (the 5 before the switch to the 5 after), same seed, so same batches: the bar a jump
  must not clear.

Runs are resumable trainer workdirs; ``stability.json`` is rewritten after every run
(records found there are taken, not retrained). Writes ``experiments/results/
stability.{json,md,png}``; ``--regenerate`` rebuilds the table and plot from the JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import flags

from experiments import cli
from experiments.ablations import WINDOW, _losses
from experiments.finetune import grid

RESULTS = grid.RESULTS
RANK = 8
TASKS = {"minilm": 2e-3, "efficientnet": 4e-3}  # twice the grid's chosen LoRA rate
# name -> (method, config overrides, what it is)
VARIANTS = {
    "lora": ("lora", {}, "LoRA"),
    "sds_unscaled": ("sds", {"optim.sds_step_scale": 1.0},
                     "SDS-LoRA, factor steps unscaled (the defaults before)"),
    "sds": ("sds", {}, "SDS-LoRA's defaults"),
}


def config_for(task: str, name: str, seed: int):
  method, overrides, _ = VARIANTS[name]
  c = grid.config_for(task, method, RANK, TASKS[task], seed)
  c.log_every = 1
  for key, value in overrides.items():
    node, field = key.split(".")
    setattr(c[node], field, value)
  return c


def _switch_step(task: str) -> int:
  return max(config_for(task, "sds", 0).optim.sds_warmup_steps, 1)


def train_variant(workdir: pathlib.Path, task: str, name: str, seed: int) -> dict:
  wd = workdir / task / f"{name}_s{seed}"
  summary = grid.train_or_read_back(lambda: config_for(task, name, seed), wd)
  losses = _losses(wd)
  curve = [losses[s] for s in sorted(losses)]
  t = _switch_step(task)
  before = [losses[s] for s in range(t - WINDOW + 1, t + 1) if s in losses]
  after = [losses[s] for s in range(t + 1, t + WINDOW + 1) if s in losses]
  return {"task": task, "variant": name, "method": VARIANTS[name][0],
          "settings": VARIANTS[name][1], "lr": TASKS[task], "rank": RANK, "seed": seed,
          "switch_step": t, "jump": max(after) - float(np.mean(before)),
          "diverged": diverged(curve),
          "test_accuracy": summary["test_accuracy"],
          "validation_accuracy": summary["validation_accuracy"],
          "mean_loss_last_20": float(np.mean(curve[-20:])),
          "steps": summary["steps"], "wall_seconds": summary.get("wall_seconds"),
          "losses": curve}


def diverged(curve) -> bool:
  """Whether a run's training loss (one value per step) ended above 95 % of its start."""
  return bool(np.mean(curve[-20:]) > 0.95 * np.mean(curve[:5]))


def lora_change(records, task: str, seed: int) -> float | None:
  """LoRA's largest |loss step-to-step change| around the switch (same task and seed)."""
  for r in records:
    if (r["task"], r["variant"], r["seed"]) == (task, "lora", seed):
      t, losses = r["switch_step"], r["losses"]  # losses[k] is the loss of update k + 1
      window = losses[t - WINDOW: t + WINDOW]
      return float(np.max(np.abs(np.diff(window))))
  return None


def table(records) -> str:
  lines = ["| task | lr | variant | what | seeds | diverged | test acc. (± sd) | "
           "loss, last 20 steps | jump after switch: mean / max | LoRA's largest change: "
           "mean / max | seeds with jump <= LoRA's change |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for task in TASKS:
    for name in VARIANTS:
      rows = [r for r in records if (r["task"], r["variant"]) == (task, name)]
      if not rows:
        continue
      acc = np.array([r["test_accuracy"] for r in rows])
      loss = np.array([r["mean_loss_last_20"] for r in rows])
      sd = f" ± {acc.std(ddof=1):.4f}" if len(rows) > 1 else ""
      bars = [lora_change(records, task, r["seed"]) for r in rows]
      known = [(r["jump"], b) for r, b in zip(rows, bars) if b is not None]
      jumps = np.array([r["jump"] for r in rows])
      bar_col = (f"{np.mean([b for _, b in known]):.3f} / {max(b for _, b in known):.3f}"
                 if known else "-")
      ok = f"{sum(j <= b for j, b in known)} / {len(known)}" if name != "lora" and known else "-"
      jump_col = f"{jumps.mean():+.3f} / {jumps.max():+.3f}" if name != "lora" else "-"
      lines.append(
          f"| {task} | {TASKS[task]:g} | {name} | {VARIANTS[name][2]} | {len(rows)} | "
          f"{sum(r['diverged'] for r in rows)} | {acc.mean():.4f}{sd} | {loss.mean():.4f} | "
          f"{jump_col} | {bar_col} | {ok} |")
  return "\n".join(lines)


def plot(records, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for name in VARIANTS:
      for k, r in enumerate(x for x in records if (x["task"], x["variant"]) == (task, name)):
        smooth = np.convolve(r["losses"], np.ones(WINDOW) / WINDOW, mode="valid")
        ax.plot(np.arange(WINDOW, len(r["losses"]) + 1), smooth, lw=1, alpha=0.8,
                color={"lora": "k", "sds_unscaled": "tab:red", "sds": "tab:blue"}[name],
                label=name if k == 0 else None)
    ax.axvline(_switch_step(task), color="gray", lw=0.5, ls="--")
    ax.set_title(f"{task}, lr {TASKS[task]:g}, rank {RANK}, one line per seed", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({WINDOW}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", "runs/stability", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_string("tasks", ",".join(TASKS), "Comma-separated tasks.", flag_values=FLAGS)
flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated seeds.", flag_values=FLAGS)
flags.DEFINE_string("variants", ",".join(VARIANTS), "Comma-separated variants.",
                    flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the tables and plots go.", flag_values=FLAGS)
flags.DEFINE_bool("regenerate", False, "Rebuild the outputs from the saved records only.",
                  flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  results = pathlib.Path(args.results)
  path = results / "stability.json"
  records = json.loads(path.read_text()) if path.exists() else []
  for r in records:  # the definition lives here, not in the records
    r["diverged"] = diverged(r["losses"])
  if not args.regenerate:
    known = {(r["task"], r["variant"], r["seed"]): r for r in records}
    for task in args.tasks.split(","):
      if task not in TASKS:
        raise SystemExit(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
      for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.variants.split(","):
          if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
          if (task, name, seed) not in known:
            known[task, name, seed] = train_variant(pathlib.Path(args.workdir), task, name, seed)
            records = list(known.values())
            grid._write_json(path, records)
          r = known[task, name, seed]
          print(f"{task} {name} seed {seed}: test {r['test_accuracy']:.4f} "
                f"jump {r['jump']:+.3f} diverged {r['diverged']}", file=sys.stderr, flush=True)
  grid.report(records, results / "stability", table, plot)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
