"""The fine-tuning grid: methods x ranks x learning rates x seeds on two tasks, resumable.

``python -m experiments.finetune.grid [--workdir runs/grid] [--tasks minilm,efficientnet]``

Tasks (sized so the whole grid runs in the background on a 2-core CPU):

* ``minilm``: all-MiniLM-L6-v2 on the movie-review sentences (max 32 tokens, batch 16,
  ``MINILM_STEPS`` steps; the full validation and test splits).
* ``efficientnet``: EfficientNet-Lite0 on Fashion-MNIST at 32 px (batch 32,
  ``EFFNET_STEPS`` steps; the last four blocks' 1x1 convolutions and the head adapted;
  2,000 validation and 2,000 test images).
* ``efficientnet_3x``: the same with three times the steps (the schedule stretched with
  them), for full fine-tuning, LoRA and SDS-LoRA only (``TASK_METHODS``): does the gap
  LoRA leaves to full fine-tuning close with more steps, and does SDS-LoRA close it faster?

Methods: full fine-tuning, LoRA, rsLoRA, SDS-LoRA and Riemannian-preconditioned LoRA;
ranks 8 and 32 for the adapters. Phase 1 trains every learning rate of ``LRS`` with seed
0 and picks, per (task, method, rank), the one with the best validation accuracy (ties:
lower validation loss). Phase 2 trains seeds 1 and 2 at that rate. Each run is a trainer
workdir (``<workdir>/<task>/<method>_r<rank>_lr<lr>_s<seed>``): a finished run is read
back, an interrupted one resumes from its checkpoint, so the command run again continues
the grid where it stopped. ``finetune.json`` is rewritten after every run, and its records
(at the same step count) are taken rather than retrained, so a grid continues from the
committed results file on a fresh checkout too.

Writes ``experiments/results/finetune.json`` (one record per run), ``finetune.md`` (mean
and standard deviation over seeds, and the share of the LoRA-to-full gap SDS-LoRA closes)
and ``finetune.png``; ``--regenerate`` rebuilds the last two from the JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
from absl import flags

from experiments import cli


RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"
METHODS = ("full", "lora", "rslora", "sds", "riemannian")
LABELS = {"full": "full FT", "lora": "LoRA", "rslora": "rsLoRA", "sds": "SDS-LoRA",
          "riemannian": "Riemannian LoRA"}
RANKS = (8, 32)
SEEDS = (0, 1, 2)
# Three learning rates per method, around the usual AdamW rates; six for the Riemannian
# preconditioner, which runs SGD + momentum on steps scaled by the inverse Gram matrices of
# the factors (up to 1 / damping while b is near its zero start): its first sweep, 3e-2 to
# 3e-1, diverged nearly everywhere, so it was extended down to 1e-3.
# SDS-LoRA's rates are an octave above LoRA's: its default step scale (1/sqrt(6)) makes its
# steps at a rate about those of unscaled steps at 0.4x that rate (its earlier sweep,
# unscaled, was 5e-4, 1e-3, 2e-3; those records are in finetune_superseded.json).
LRS = {"full": (3e-5, 1e-4, 3e-4), "lora": (5e-4, 1e-3, 2e-3), "rslora": (5e-4, 1e-3, 2e-3),
       "sds": (1e-3, 2e-3, 4e-3), "riemannian": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}
GAP_NOISE = 0.01  # one point of test accuracy
MINILM_STEPS = 120
EFFNET_STEPS = 100
TASKS = ("minilm", "efficientnet", "efficientnet_3x")
TASK_METHODS = {"efficientnet_3x": ("full", "lora", "sds")}  # other tasks: every method


def config_for(task: str, method: str, rank: int, lr: float, seed: int, quick: bool = False):
  from experiments.finetune.configs import efficientnet_fashion_mnist, minilm_sentiment

  if task == "minilm":
    c = minilm_sentiment.get_config("smoke" if quick else "")
    if not quick:
      c.data.max_len = 32
      c.batch_size = 16
      c.num_steps = MINILM_STEPS
  elif task in ("efficientnet", "efficientnet_3x"):
    c = efficientnet_fashion_mnist.get_config("smoke" if quick else "")
    if not quick:
      c.data.image_size = 32
      c.batch_size = 32
      c.num_steps = EFFNET_STEPS
      c.data.eval_split = "train[55000:57000]"
      c.data.test_split = "test[:2000]"
      c.adapter.targets = (r"block_1[2-5]/(expand_conv|project_conv)/kernel",
                           r"conv_head/kernel")
  else:
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
  if task == "efficientnet_3x":
    c.num_steps *= 3
  c.method = method
  c.adapter.rank = rank
  c.adapter.alpha = 2.0 * rank
  c.optim.learning_rate = lr
  c.seed = seed
  # Validation once, at the end (it is what picks the rate); a checkpoint half-way.
  c.eval_every = c.num_steps
  c.checkpoint_every = max(c.num_steps // 2, 1)
  c.export = False
  c.progress = False
  return c


def _default_optim():
  """The trainer's default optimizer config: the SDS-LoRA settings the grid trains with."""
  from experiments.finetune.configs import default

  return default.get_config().optim


def _step_scale() -> float:
  return float(_default_optim().sds_step_scale)


def _rewarmup_steps() -> int:
  return int(_default_optim().sds_rewarmup_steps)


def is_current(rec) -> bool:
  """Whether a record was trained with today's SDS-LoRA defaults (other methods: always).

  SDS records from before ``sds_step_scale`` (``sds_rewarmup_steps``) existed carry none:
  their steps were unscaled (not re-warmed up).
  """
  return rec["method"] != "sds" or (
      abs(rec.get("sds_step_scale", 1.0) - _step_scale()) < 1e-9
      and rec.get("sds_rewarmup_steps", 0) == _rewarmup_steps())


def _run_dir(workdir: pathlib.Path, task, method, rank, lr, seed) -> pathlib.Path:
  tag = ""  # SDS-LoRA's: never an older default's run
  if method == "sds":
    rewarmup = _rewarmup_steps()
    tag = f"_step{_step_scale():.3g}" + (f"_rw{rewarmup}" if rewarmup else "")
  return workdir / task / f"{method}{tag}_r{rank}_lr{lr:g}_s{seed}"


def train_or_read_back(make_config, wd: pathlib.Path) -> dict:
  """The summary of the run in ``wd``: read back when finished, else trained (resumed)."""
  from experiments.finetune.train import finished_summary, train_and_evaluate

  config = make_config()
  summary = finished_summary(config, wd)
  if summary is not None:
    return summary
  start = time.perf_counter()
  summary = train_and_evaluate(config, wd, resume=True)
  if summary["interrupted"]:
    raise SystemExit(1)
  summary["wall_seconds"] = time.perf_counter() - start
  (wd / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def train_one(workdir, task, method, rank, lr, seed, quick=False) -> dict:
  """Trains one run (or reads it back when finished); returns its record."""
  wd = _run_dir(workdir, task, method, rank, lr, seed)
  config = config_for(task, method, rank, lr, seed, quick)
  summary = train_or_read_back(lambda: config, wd)
  extra = {"sds_step_scale": float(config.optim.sds_step_scale),
           "sds_rewarmup_steps": int(config.optim.sds_rewarmup_steps)} if method == "sds" else {}
  return {"task": task, "method": method, "rank": rank, "lr": lr, "seed": seed, **extra,
          "test_accuracy": summary["test_accuracy"],
          "validation_accuracy": summary["validation_accuracy"],
          "validation_loss": summary["validation_loss"],
          "final_train_loss": summary["final_train_loss"], "steps": summary["steps"],
          "wall_seconds": summary.get("wall_seconds")}


def methods_of(task: str) -> tuple:
  return tuple(m for m in METHODS if m in TASK_METHODS.get(task, METHODS))


def cells(tasks):
  for task in tasks:
    for method in methods_of(task):
      for rank in ((None,) if method == "full" else RANKS):
        yield task, method, rank


def _key(rec) -> tuple:
  return rec["task"], rec["method"], rec["rank"], rec["lr"], rec["seed"]


def _steps(task: str, quick: bool) -> int:
  return config_for(task, "lora", 8, 1e-3, 0, quick).num_steps


def _lrs(quick: bool) -> dict:
  return {m: v[:2] for m, v in LRS.items()} if quick else LRS


def run(workdir: pathlib.Path, tasks, quick=False, log=print, known=(), save=None) -> list[dict]:
  """Runs the grid; ``known`` records (same key and step count) are taken, not retrained.

  ``save(records)`` is called after every run with everything known so far, so an
  interrupted grid leaves its finished runs in the results file.
  """
  lrs, seeds = _lrs(quick), (SEEDS[:2] if quick else SEEDS)
  steps = {t: _steps(t, quick) for t in tasks}
  known = {_key(r): r for r in known
           if r["task"] in steps and r["steps"] == steps[r["task"]] and is_current(r)}
  todo = [(c, lr) for c in cells(tasks) for lr in lrs[c[1]]]
  todo_total = len(todo) + sum(1 for _ in cells(tasks)) * (len(seeds) - 1)
  records, start = [], time.perf_counter()

  def one(task, method, rank, lr, seed):
    rec = known.pop((task, method, rank or 0, lr, seed), None)
    rec = rec or train_one(workdir, task, method, rank or 0, lr, seed, quick)
    records.append({k: v for k, v in rec.items() if k != "chosen_lr"})
    if save is not None:
      save(annotate(records + list(known.values()), lrs))
    what = "val" if seed == seeds[0] else "test"
    log(f"[{len(records)}/{todo_total}] {task} {method} r{rank} lr {lr:g} seed {seed}: "
        f"{what} {rec[what.replace('val', 'validation') + '_accuracy']:.4f} "
        f"({time.perf_counter() - start:.0f} s)")

  for (task, method, rank), lr in todo:
    one(task, method, rank, lr, seeds[0])
  for task, method, rank in cells(tasks):
    best = choose_lr(records, task, method, rank or 0)
    for seed in seeds[1:]:
      one(task, method, rank, best, seed)
  return annotate(records, lrs)


def annotate(records, lrs=None) -> list[dict]:
  """Marks ``chosen_lr`` on the runs at each cell's chosen rate, once all its rates ran."""
  lrs = lrs or LRS
  out = [dict(r) for r in records]
  for task, method, rank in {(r["task"], r["method"], r["rank"]) for r in out}:
    cell = [r for r in out if (r["task"], r["method"], r["rank"]) == (task, method, rank)]
    first = min(r["seed"] for r in cell)
    complete = {r["lr"] for r in cell if r["seed"] == first} >= set(lrs[method])
    best = choose_lr(cell, task, method, rank) if complete else None
    for r in cell:
      r["chosen_lr"] = r["lr"] == best
  return sorted(out, key=lambda r: (r["task"], METHODS.index(r["method"]), r["rank"],
                                    r["seed"], r["lr"]))


def choose_lr(records, task, method, rank) -> float:
  """The seed-0 learning rate with the best validation accuracy (ties: lower loss)."""
  cands = [r for r in records if (r["task"], r["method"], r["rank"]) == (task, method, rank)
           and r["seed"] == min(x["seed"] for x in records)]
  return max(cands, key=lambda r: (r["validation_accuracy"], -r["validation_loss"]))["lr"]


def _stats(records, task, method, rank):
  rows = [r for r in records if (r["task"], r["method"], r["rank"]) == (task, method, rank)
          and r.get("chosen_lr")]
  acc = np.array([r["test_accuracy"] for r in rows])
  loss = np.array([r["final_train_loss"] for r in rows])
  return rows, acc, loss


def _tasks_of(records) -> list[str]:
  """The records' tasks in ``TASKS`` order (others after them, as first seen)."""
  seen = list(dict.fromkeys(r["task"] for r in records))
  return [t for t in TASKS if t in seen] + [t for t in seen if t not in TASKS]


def table(records) -> str:
  tasks = _tasks_of(records)
  lines = ["| task | method | rank | lr (chosen) | seeds | test acc. mean ± sd | final train loss |",
           "|---|---|---|---|---|---|---|"]
  gaps = []
  for task in tasks:
    full = _stats(records, task, "full", 0)[1]
    for method in methods_of(task):
      for rank in ((0,) if method == "full" else RANKS):
        rows, acc, loss = _stats(records, task, method, rank)
        if not rows:
          continue
        lines.append(f"| {task} | {LABELS[method]} | {rank or '-'} | {rows[0]['lr']:g} | "
                     f"{len(rows)} | {acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f}"
                     f" | {loss.mean():.4f} |")
    for rank in RANKS:
      lora, sds = _stats(records, task, "lora", rank)[1], _stats(records, task, "sds", rank)[1]
      if len(full) and len(lora) and len(sds):
        gap = full.mean() - lora.mean()
        # A share of a gap smaller than the seed-to-seed spread (or than one point of
        # accuracy, about the binomial standard error of these test sets) means nothing.
        noise = max([GAP_NOISE] + [x.std(ddof=1) for x in (full, lora, sds) if len(x) > 1])
        share = (f"{(sds.mean() - lora.mean()) / gap:+.2f}" if gap > noise
                 else f"- (gap {gap:+.4f} within noise {noise:.4f})")
        gaps.append(f"| {task} | {rank} | {len(full)}/{len(lora)}/{len(sds)} | "
                    f"{full.mean():.4f} | {lora.mean():.4f} | {sds.mean():.4f} | {share} |")
  pending = {(r["task"], r["method"], r["rank"]) for r in records} - {
    (r["task"], r["method"], r["rank"]) for r in records if r.get("chosen_lr")}
  if pending:
    lines += ["", f"Partial grid: {len(records)} runs recorded; {len(pending)} cells still "
              "lack a learning rate of their sweep and are not shown."]
  if gaps:
    lines += ["", "Share of the LoRA-to-full-fine-tuning gap (test accuracy) that SDS-LoRA closes:",
              "", "| task | rank | seeds (full/LoRA/SDS) | full FT | LoRA | SDS-LoRA | share closed |",
              "|---|---|---|---|---|---|---|", *gaps]
  return "\n".join(lines)


def plot(records, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = _tasks_of(records)
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    labels, means, sds = [], [], []
    for method in METHODS:
      for rank in ((0,) if method == "full" else RANKS):
        _, acc, _ = _stats(records, task, method, rank)
        if len(acc):
          labels.append(LABELS[method] + ("" if method == "full" else f"\nr={rank}"))
          means.append(acc.mean())
          sds.append(acc.std(ddof=1) if len(acc) > 1 else 0.0)
    ax.bar(range(len(means)), means, yerr=sds, capsize=3,
           color=["tab:gray" if "full" in lab else "tab:blue" if "SDS" in lab else "tab:orange"
                  for lab in labels])
    ax.set_xticks(range(len(means)), labels, fontsize=6)
    lo = min(means) - 3 * max(max(sds), 0.005) if means else 0
    ax.set_ylim(max(lo, 0), min(1.0, max(means) + 3 * max(max(sds), 0.005)) if means else 1)
    ax.set_title(f"{task}: test accuracy, mean ± sd over seeds", fontsize=9)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


def report(records, stem: pathlib.Path, table_fn, plot_fn) -> None:
  """Writes ``<stem>.md`` (the table, also printed) and ``<stem>.png`` from ``records``."""
  md = table_fn(records)
  stem.with_suffix(".md").write_text(md + "\n")
  plot_fn(records, stem.with_suffix(".png"))
  print(md)


def _write_json(path: pathlib.Path, records) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(records, indent=1) + "\n")
  tmp.replace(path)  # atomic: an interrupted write leaves the previous file


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", "runs/grid", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_string("tasks", ",".join(TASKS), "Comma-separated tasks.", flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the table and plot go.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Smoke configs, for tests.", flag_values=FLAGS)
flags.DEFINE_bool("regenerate", False, "Rebuild the table and plot from finetune.json only.",
                  flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
  if unknown:
    raise ValueError(f"--tasks: unknown {unknown}; choose from {TASKS}")
  results = pathlib.Path(args.results)
  results.mkdir(parents=True, exist_ok=True)
  path = results / "finetune.json"
  if args.regenerate:
    records = json.loads(path.read_text())
  else:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    known = json.loads(path.read_text()) if path.exists() else []
    tasks = args.tasks.split(",")
    # Records trained with older SDS-LoRA defaults move to finetune_superseded.json.
    old = [r for r in known if not is_current(r)]
    if old:
      kept = results / "finetune_superseded.json"
      prior = json.loads(kept.read_text()) if kept.exists() else []
      _write_json(kept, prior + old)
      known = [r for r in known if is_current(r)]
      _write_json(path, known)
    # Records of tasks not run this time stay in the file, in every write (an
    # interrupted run of one task must not lose the other task's results).
    # (``run`` hands ``save`` annotated records; ``others`` are annotated in the file.)
    others = [r for r in known if r["task"] not in tasks]
    records = run(pathlib.Path(args.workdir), tasks, args.quick, log, known=known,
                  save=lambda recs: _write_json(path, recs + others))
    records = annotate(records + others, _lrs(args.quick))
    _write_json(path, records)
  report(records, results / "finetune", table, plot)
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
