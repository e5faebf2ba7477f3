"""LoRA vs SDS-LoRA on the least-squares teacher problem across condition numbers.

For kappa in 1..1000, each method is trained with plain gradient descent (fixed
lr) and with Adam (warm-up + cosine decay), each at its own best learning rate
from a small sweep. Prints a table (steps to reach a relative loss of 1e-6 and the
final relative loss) and writes a plot and the table to experiments/results/.

Run: python -m experiments.condition_number [--steps 3000] [--out experiments/results]
[--overwrite]. Existing result files are not replaced without --overwrite.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments import teacher

KAPPAS = (1, 10, 100, 1000)
LRS = {"sgd": (0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2, 3e-2)}
THRESHOLD = 1e-6
LABELS = {"lora": "LoRA", "sds": "SDS-LoRA", "sds_no_warmup": "SDS-LoRA, no warm-up"}


def _rank_key(curve: np.ndarray) -> tuple[float, float]:
  """Best lr: fewest steps to the threshold, then lowest final loss."""
  hit = teacher.steps_to(curve, THRESHOLD)
  final = float(curve[-1]) if np.isfinite(curve[-1]) else np.inf
  return (hit if hit is not None else np.inf, final)


def run(steps: int) -> dict:
  results = {}
  total = len(KAPPAS) * len(teacher.METHODS) * sum(len(v) for v in LRS.values())
  done, start = 0, time.time()
  for opt, lrs in LRS.items():
    for kappa in KAPPAS:
      cfg = teacher.Teacher(kappa=float(kappa))
      for method in teacher.METHODS:
        best = None
        for lr in lrs:
          curve = teacher.train(cfg, method, opt, lr, steps=steps)
          done += 1
          print(
              f"[{done:3d}/{total}] {opt:4s} kappa={kappa:<5g} {method:14s} lr={lr:<6g} "
              f"steps to {THRESHOLD:g}: {teacher.steps_to(curve, THRESHOLD)}  "
              f"final {curve[-1]:.2e}  ({time.time() - start:.0f}s)",
              flush=True,
          )
          if best is None or _rank_key(curve) < _rank_key(best[1]):
            best = (lr, curve)
        lr, curve = best
        results[(opt, kappa, method)] = dict(
            lr=lr,
            steps_to_threshold=teacher.steps_to(curve, THRESHOLD),
            final_loss=float(curve[-1]),
            curve=curve,
        )
  return results


def table(results: dict) -> str:
  lines = [
      f"| optimizer | kappa | {' | '.join(LABELS[m] for m in teacher.METHODS)} |",
      "|---|---|" + "---|" * len(teacher.METHODS),
  ]
  for opt in LRS:
    for kappa in KAPPAS:
      cells = []
      for m in teacher.METHODS:
        r = results[(opt, kappa, m)]
        steps = r["steps_to_threshold"]
        steps = f"{steps}" if steps is not None else "not reached"
        cells.append(f"{steps} ({r['final_loss']:.1e}, lr {r['lr']:g})")
      lines.append(f"| {opt} | {kappa} | {' | '.join(cells)} |")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
      2, len(KAPPAS), figsize=(3.2 * len(KAPPAS), 5.6), sharey=True, sharex=True
  )
  colors = {"lora": "tab:red", "sds": "tab:blue", "sds_no_warmup": "tab:cyan"}
  for row, opt in enumerate(LRS):
    for col, kappa in enumerate(KAPPAS):
      ax = axes[row, col]
      for m in teacher.METHODS:
        r = results[(opt, kappa, m)]
        idx = np.unique(np.geomspace(1, len(r["curve"]), 250).astype(int)) - 1
        ax.loglog(
            idx + 1,
            np.maximum(r["curve"][idx], 1e-16),
            color=colors[m],
            lw=1.3,
            ls="--" if m == "sds_no_warmup" else "-",
            label=f"{LABELS[m]} (lr {r['lr']:g})",
        )
      ax.axhline(THRESHOLD, color="gray", lw=0.6, ls=":")
      ax.set_title(f"{'GD' if opt == 'sgd' else 'Adam+cosine'}, kappa={kappa}", fontsize=9)
      ax.tick_params(labelsize=7)
      if col == 0:
        ax.set_ylabel("relative loss", fontsize=8)
      if row == 1:
        ax.set_xlabel("step", fontsize=8)
      ax.legend(fontsize=6, loc="lower left")
  fig.suptitle("Rank-8 teacher (64x64): loss vs step, each method at its best lr", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", 3000, "Training steps.", flag_values=FLAGS)
flags.DEFINE_string("out", "experiments/results", "Where the results go.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing result files.", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  out = pathlib.Path(args.out)
  outputs = [out / f"condition_number.{ext}" for ext in ("md", "json", "png")]
  existing = [str(p) for p in outputs if p.exists()]
  if existing and not args.overwrite:
    cli.error(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
  out.mkdir(parents=True, exist_ok=True)
  results = run(args.steps)
  md = table(results)
  print("\nSteps to relative loss < 1e-6 (final relative loss, best lr):\n" + md)
  (out / "condition_number.md").write_text(md + "\n")
  (out / "condition_number.json").write_text(
      json.dumps(
          [
              dict(optimizer=o, kappa=k, method=m, **{x: v for x, v in r.items() if x != "curve"})
              for (o, k, m), r in results.items()
          ],
          indent=1,
      )
  )
  plot(results, out / "condition_number.png")
  print(f"wrote {out / 'condition_number.png'}, .md and .json")


if __name__ == "__main__":
  cli.run(main, FLAGS)
