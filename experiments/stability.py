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

import pathlib

import numpy as np
from absl import flags

from experiments import cli
from experiments.ablations import (
    WINDOW, _losses, check_names, define_flags, read_records, switch_jump, train_missing,
    with_overrides)
from experiments.finetune import grid

RESULTS = grid.RESULTS
RANK = 8
TASKS = {"minilm": 2e-3, "efficientnet": 4e-3}  # twice the grid's chosen LoRA rate
# name -> (method, config overrides, what it is)
VARIANTS = {
    "lora": ("lora", {}, "LoRA"),
    "sds_unscaled": ("sds", {"optim.sds_step_scale": 1.0, "optim.sds_rewarmup_steps": 0},
                     "SDS-LoRA, factor steps unscaled, no re-warm-up (the paper's steps)"),
    "sds_stepscale": ("sds", {"optim.sds_rewarmup_steps": 0},
                      "SDS-LoRA, factor steps x 1/sqrt(6), no re-warm-up"),
    "sds": ("sds", {}, "SDS-LoRA's defaults: factor steps x 1/sqrt(6), ramped up over 10 "
                       "updates after the switch"),
}


def config_for(task: str, name: str, seed: int):
  method, overrides, _ = VARIANTS[name]
  return with_overrides(grid.config_for(task, method, RANK, TASKS[task], seed), overrides)


def _switch_step(task: str) -> int:
  return max(config_for(task, "sds", 0).optim.sds_warmup_steps, 1)


def train_variant(workdir: pathlib.Path, task: str, name: str, seed: int) -> dict:
  wd = workdir / task / f"{name}_s{seed}"
  summary = grid.train_or_read_back(lambda: config_for(task, name, seed), wd)
  losses = _losses(wd)
  curve = [losses[s] for s in sorted(losses)]
  t = _switch_step(task)
  return {"task": task, "variant": name, "method": VARIANTS[name][0],
          "settings": VARIANTS[name][1], "lr": TASKS[task], "rank": RANK, "seed": seed,
          "switch_step": t, "jump": switch_jump(losses, t),
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
      n_div = sum(diverged(r["losses"]) for r in rows)  # the definition here, not the record's
      lines.append(
          f"| {task} | {TASKS[task]:g} | {name} | {VARIANTS[name][2]} | {len(rows)} | "
          f"{n_div} | {acc.mean():.4f}{sd} | {loss.mean():.4f} | {jump_col} | {bar_col} | {ok} |")
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
                color={"lora": "k", "sds_unscaled": "tab:red", "sds_stepscale": "tab:blue",
                       "sds": "tab:green"}[name],
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


FLAGS = define_flags("runs/stability", "0,1,2,3,4", VARIANTS)
flags.DEFINE_string("tasks", ",".join(TASKS), "Comma-separated tasks.", flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  results = pathlib.Path(args.results)
  path, records = read_records(args.results, "stability")
  if not args.regenerate:
    tasks = check_names(args.tasks.split(","), TASKS, "task")
    names = check_names(args.variants.split(","), VARIANTS, "variant")
    keys = [(t, n, int(seed)) for t in tasks for seed in args.seeds.split(",") for n in names]
    records = train_missing(
        path, records, keys, lambda r: (r["task"], r["variant"], r["seed"]),
        lambda t, n, seed: train_variant(pathlib.Path(args.workdir), t, n, seed),
        lambda r: f"{r['task']} {r['variant']} seed {r['seed']}: test "
                  f"{r['test_accuracy']:.4f} jump {r['jump']:+.3f} diverged {r['diverged']}")
  grid.report(records, results / "stability", table, plot)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
