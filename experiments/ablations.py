"""SDS-LoRA ablations on MiniLM sentiment: the switch, the warm-up, the refresh, the scale.

``python -m experiments.ablations [--workdir runs/ablations] [--seeds 0]``

Every variant is the fine-tuning grid's MiniLM run (``experiments.finetune.grid``: 32
tokens, batch 16, 120 steps, rank 8, alpha 16, AdamW with a 10-step learning-rate
warm-up and cosine decay) at learning rate ``LR`` = 2e-3, where the switch after a
10-step LoRA warm-up made the training loss jump in the main job; one setting changes per
variant (``VARIANTS``). Training losses are logged every step, so the jump after the
switch is measured on the same batches for every variant: ``jump`` is the largest loss of
the 5 updates after the switch minus the mean of the 5 before it (LoRA: the same steps).
The ablations predate ``sds_lora``'s ``step_scale``: every variant trains with unscaled
factor steps (``step_scale=1``) unless it says otherwise. The last two variants ran after
the trainer's data order changed (grain), on other batches than the rows above.

Runs are resumable trainer workdirs, and ``ablations.json`` is rewritten after every run
(its records are taken, not retrained). Writes ``experiments/results/ablations.{json,md,
png}``; ``--regenerate`` rebuilds the table and plot from the JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import flags

from experiments import cli
from experiments.finetune import grid

RESULTS = grid.RESULTS
LR, RANK, WINDOW = 2e-3, 8, 5
# name -> (method, config overrides, what it tests)
VARIANTS = {
    "lora": ("lora", {}, "LoRA, the reference"),
    "sds": ("sds", {}, "10 LoRA warm-up steps, moments reset, refresh every step (the defaults "
                       "then)"),
    "sds_keep": ("sds", {"optim.sds_switch_state": "keep"}, "moments kept at the switch"),
    "sds_rewarmup10": ("sds", {"optim.sds_rewarmup_steps": 10},
                       "10-step linear re-warm-up of the factor updates after the switch"),
    "sds_warmup0_zero": ("sds", {"optim.sds_warmup_steps": 0, "adapter.sds_init": "zero"},
                         "no warm-up: zero factors, random orthonormal bases"),
    "sds_warmup60": ("sds", {"optim.sds_warmup_steps": 60}, "60 LoRA warm-up steps (half)"),
    "sds_refresh10": ("sds", {"optim.sds_refresh": "10"}, "bases refreshed every 10 steps"),
    "sds_phases": ("sds", {"optim.sds_refresh": "phases"}, "refresh in 5 growing phases"),
    "sds_sqrt_scale": ("sds", {"adapter.sqrt_rank_scaling": True}, "scale alpha / sqrt(r)"),
    # Run later than the rows above, on grain's data order (other batches).
    "sds_retract": ("sds", {"optim.sds_refresh_rule": "retract"},
                    "refresh by the rank-r retraction (bases from the update); later data order"),
    "sds_step04": ("sds", {"optim.sds_step_scale": 0.408},
                   "factor steps x 0.408 (about 1/sqrt(6), the default now) after the switch; "
                   "later data order"),
}


def with_overrides(c, overrides: dict):
  """``c`` with ``{"node.field": value}`` overrides applied, losses logged every step."""
  c.log_every = 1
  for key, value in overrides.items():
    node, field = key.split(".")
    setattr(c[node], field, value)
  return c


def config_for(name: str, seed: int):
  method, overrides, _ = VARIANTS[name]
  c = grid.config_for("minilm", method, RANK, LR, seed)
  # The ablations predate the step scale and the re-warm-up: neither, unless stated.
  c.optim.sds_step_scale = 1.0
  c.optim.sds_rewarmup_steps = 0
  return with_overrides(c, overrides)


def switch_step(name: str) -> int:
  """The update after which SDS-LoRA switches (LoRA: the default's, for comparison)."""
  c = config_for(name, 0)
  return 1 if c.adapter.sds_init == "zero" else max(c.optim.sds_warmup_steps, 1)


def _losses(wd: pathlib.Path) -> dict[int, float]:
  out = {}
  for line in (wd / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec.get("split") == "train":
      out[rec["step"]] = rec["loss"]
  return out


def switch_jump(losses: dict[int, float], t: int) -> float:
  """The largest loss of the ``WINDOW`` updates after update ``t`` minus the mean before."""
  before = [losses[s] for s in range(t - WINDOW + 1, t + 1) if s in losses]
  after = [losses[s] for s in range(t + 1, t + WINDOW + 1) if s in losses]
  return max(after) - float(np.mean(before)) if before and after else float("nan")


def train_missing(path: pathlib.Path, records: list, keys: list, key_of, train, describe):
  """Trains every key without a record (``train(*key)``), rewriting ``path`` after each run."""
  known = {key_of(r): r for r in records}
  for key in keys:
    if key not in known:
      known[key] = train(*key)
      grid._write_json(path, list(known.values()))
    print(describe(known[key]), file=sys.stderr, flush=True)
  return list(known.values())


def check_names(given: list[str], allowed, what: str) -> list[str]:
  for name in given:
    if name not in allowed:
      raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
  return given


def train_variant(workdir: pathlib.Path, name: str, seed: int) -> dict:
  wd = workdir / f"{name}_s{seed}"
  summary = grid.train_or_read_back(lambda: config_for(name, seed), wd)
  losses = _losses(wd)
  t = switch_step(name if name != "lora" else "sds")
  jump = switch_jump(losses, t)
  return {"variant": name, "method": VARIANTS[name][0], "settings": VARIANTS[name][1],
          "lr": LR, "rank": RANK, "seed": seed, "switch_step": t, "jump": jump,
          "test_accuracy": summary["test_accuracy"],
          "validation_accuracy": summary["validation_accuracy"],
          "final_train_loss": summary["final_train_loss"],
          "mean_loss_last_20": float(np.mean([losses[s] for s in sorted(losses)[-20:]])),
          "steps": summary["steps"], "wall_seconds": summary.get("wall_seconds"),
          "losses": [losses[s] for s in sorted(losses)]}


def table(records) -> str:
  lines = ["| variant | what changes | seeds | test acc. (± sd) | val. acc. | loss, last 20 steps | "
           "jump after switch |", "|---|---|---|---|---|---|---|"]
  for name in VARIANTS:
    rows = [r for r in records if r["variant"] == name]
    if not rows:
      continue
    def col(key, fmt=".4f"):
      x = np.array([r[key] for r in rows])
      sd = f" ± {x.std(ddof=1):{fmt.lstrip('+')}}" if len(x) > 1 else ""
      return f"{x.mean():{fmt}}{sd}"

    lines.append(f"| {name} | {VARIANTS[name][2]} | {len(rows)} | {col('test_accuracy')} | "
                 f"{col('validation_accuracy')} | {col('mean_loss_last_20')} | "
                 f"{col('jump', '+.3f')} |")
  return "\n".join(lines)


def plot(records, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 3.6))
  for name in VARIANTS:
    rows = [r for r in records if r["variant"] == name]
    if not rows:
      continue
    curve = np.mean([r["losses"] for r in rows], axis=0)
    smooth = np.convolve(curve, np.ones(WINDOW) / WINDOW, mode="valid")
    ax.plot(np.arange(WINDOW, len(curve) + 1), smooth, label=name,
            lw=2 if name in ("lora", "sds") else 1, color="k" if name == "lora" else None)
  ax.set_xlabel("step")
  ax.set_ylabel(f"training loss ({WINDOW}-step mean)")
  ax.set_title(f"MiniLM sentiment, AdamW lr {LR:g}, rank {RANK}", fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


def define_flags(workdir: str, seeds: str, variants) -> flags.FlagValues:
  """The flags of a script that trains variants x seeds (this one and ``stability``)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", workdir, "Where the runs go.", flag_values=fv)
  flags.DEFINE_string("seeds", seeds, "Comma-separated seeds.", flag_values=fv)
  flags.DEFINE_string("variants", ",".join(variants), "Comma-separated variants.",
                      flag_values=fv)
  flags.DEFINE_string("results", str(RESULTS), "Where the tables and plots go.", flag_values=fv)
  flags.DEFINE_bool("regenerate", False, "Rebuild the outputs from the saved records only.",
                    flag_values=fv)
  return fv


def read_records(results: str, stem: str) -> tuple[pathlib.Path, list]:
  """``<results>/<stem>.json`` and its records (none yet: ``[]``)."""
  path = pathlib.Path(results) / f"{stem}.json"
  return path, json.loads(path.read_text()) if path.exists() else []


FLAGS = define_flags("runs/ablations", "0", VARIANTS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  results = pathlib.Path(args.results)
  path, records = read_records(args.results, "ablations")
  if not args.regenerate:
    names = check_names(args.variants.split(","), VARIANTS, "variant")
    keys = [(n, int(seed)) for seed in args.seeds.split(",") for n in names]
    records = train_missing(
        path, records, keys, lambda r: (r["variant"], r["seed"]),
        lambda n, seed: train_variant(pathlib.Path(args.workdir), n, seed),
        lambda r: f"{r['variant']} seed {r['seed']}: test {r['test_accuracy']:.4f} "
                  f"jump {r['jump']:+.3f}")
  grid.report(records, results / "ablations", table, plot)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
