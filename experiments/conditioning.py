"""Steps to convergence vs condition number on the teacher problem, over seeds, as data.

For kappa in 1..1e4 (``experiments/teacher.py``: a rank-8 64x64 target, singular values
geometric from 1 to 1/kappa, relative loss ``||dK - T||^2 / ||T||^2``), each method of
``teacher.METHODS`` is trained with two optimizers over a learning-rate sweep and 5 seeds
(a seed sets both the target's singular vectors and the initial factor ``a``):

- ``"gd"``: plain gradient descent, ``optax.sgd(lr)`` at a fixed lr;
- ``"adamw"``: ``teacher.make_adamw``, linear warm-up over 5% of the steps then cosine decay
  to lr / 100, with ``weight_decay=0``: the teacher's optimum is not at zero factors, so no
  decay is wanted, and AdamW with zero decay is Adam.

Best lr of a cell (optimizer, kappa, method): the lr with the smallest median over seeds of
the steps to a relative loss of 1e-6 (a seed that never gets there, or whose curve is not
finite anywhere, counts as infinitely many steps), ties broken by the smallest median final
loss (non-finite counts as infinite), then by the smaller lr.

Every finished (optimizer, kappa, method, lr) cell is appended to a JSON-lines cache
(``--workdir``, default runs/conditioning/cells.jsonl); a rerun skips the cells found there,
so an interrupted sweep continues. At the end, conditioning.json (one record per optimizer,
kappa, method, lr and seed), conditioning.md and conditioning.png are written from the
cache; existing ones are kept unless --overwrite. ``regenerate`` rebuilds the table and the
plot from the JSON alone.

Run: python -m experiments.conditioning [--steps 3000] [--workdir runs/conditioning]
[--out experiments/results] [--overwrite] [--quick]. --quick (kappa 1 and 100, 300 steps,
2 lrs per optimizer, 2 seeds; for tests) writes to <workdir>/quick unless --out is given.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments import teacher

THRESHOLD = 1e-6
OPTIMIZERS = {"gd": "sgd", "adamw": teacher.make_adamw}
LABELS = {"lora": "LoRA", "sds": "SDS-LoRA", "sds_no_warmup": "SDS-LoRA, no warm-up"}
OPT_LABELS = {"gd": "GD (fixed lr)", "adamw": "AdamW (wd 0) + warm-up/cosine"}
OUTPUTS = ("json", "md", "png")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  kappas: tuple[float, ...] = (1, 10, 100, 1000, 10000)
  lrs: tuple[tuple[str, tuple[float, ...]], ...] = (
      ("gd", (0.03, 0.1, 0.3, 1.0)),
      ("adamw", (1e-3, 3e-3, 1e-2, 3e-2)),
  )
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  steps: int = 3000
  threshold: float = THRESHOLD

  def cells(self):
    """``(optimizer, kappa, method, lr)`` in sweep (and results) order."""
    for opt, lrs in self.lrs:
      for kappa in self.kappas:
        for method in teacher.METHODS:
          for lr in lrs:
            yield opt, kappa, method, lr


FULL = Settings()
QUICK = Settings(
    kappas=(1, 100), lrs=(("gd", (0.1, 0.3)), ("adamw", (3e-3, 1e-2))), seeds=(0, 1), steps=300
)


def _key(settings: Settings, opt: str, kappa, method: str, lr: float) -> tuple:
  return (opt, kappa, method, lr, settings.steps, settings.threshold, tuple(settings.seeds))


def _line_key(line: dict) -> tuple:
  return (
      line["optimizer"], line["kappa"], line["method"], line["lr"], line["steps"],
      line["threshold"], tuple(line["seeds"]),
  )


def read_cache(path: pathlib.Path) -> dict:
  """Cache lines by cell key; an unreadable (e.g. half-written) line is skipped."""
  cache = {}
  if path.exists():
    for text in path.read_text().splitlines():
      try:
        line = json.loads(text)
        cache[_line_key(line)] = line
      except (ValueError, KeyError, TypeError):
        continue
  return cache


def _cell(settings: Settings, opt: str, kappa, method: str, lr: float) -> dict:
  start = time.time()
  curves = teacher.train_seeds(
      teacher.Teacher(kappa=float(kappa)), settings.seeds, method, OPTIMIZERS[opt], lr,
      steps=settings.steps,
  )
  hits, finals = [], []
  for curve in curves:
    finite = bool(np.all(np.isfinite(curve)))
    hits.append(teacher.steps_to(curve, settings.threshold) if finite else None)
    finals.append(float(curve[-1]) if np.isfinite(curve[-1]) else None)
  return dict(
      optimizer=opt, kappa=kappa, method=method, lr=lr, steps=settings.steps,
      threshold=settings.threshold, seeds=list(settings.seeds), steps_to_tol=hits,
      final_loss=finals, seconds=round(time.time() - start, 3),
  )


def run(settings: Settings = FULL, workdir: pathlib.Path | str = "runs/conditioning") -> list:
  """Runs the cells missing from ``workdir/cells.jsonl``; returns all result records."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "cells.jsonl"
  cache = read_cache(path)
  cells = list(settings.cells())
  todo = [c for c in cells if _key(settings, *c) not in cache]
  done, start = len(cells) - len(todo), time.time()
  print(f"{done}/{len(cells)} cells cached in {path}", flush=True)
  if todo and path.exists() and path.read_text()[-1:] not in ("", "\n"):
    with path.open("a") as f:
      f.write("\n")  # after a half-written line, so the next line starts fresh
  for cell in todo:
    line = _cell(settings, *cell)
    with path.open("a") as f:
      f.write(json.dumps(line) + "\n")
    cache[_key(settings, *cell)] = line
    done += 1
    opt, kappa, method, lr = cell
    print(
        f"[{done:3d}/{len(cells)}] {opt:5s} kappa={kappa:<5g} {method:13s} lr={lr:<6g} "
        f"steps to {settings.threshold:g}: {_steps_text(line['steps_to_tol'])}  "
        f"({time.time() - start:.0f}s)",
        flush=True,
    )
  return records([cache[_key(settings, *c)] for c in cells])


def _rank(hits: list, finals: list) -> tuple[float, float]:
  hits = [np.inf if h is None else h for h in hits]
  finals = [np.inf if f is None else f for f in finals]
  return float(np.median(hits)), float(np.median(finals))


def records(lines: list) -> list:
  """One record per (optimizer, kappa, method, lr, seed) from cache lines, ``best_lr`` set."""
  best = {}
  for line in lines:
    cell = (line["optimizer"], line["kappa"], line["method"])
    rank = _rank(line["steps_to_tol"], line["final_loss"]) + (line["lr"],)
    if cell not in best or rank < best[cell]:
      best[cell] = rank
  out = []
  for line in lines:
    is_best = best[(line["optimizer"], line["kappa"], line["method"])][-1] == line["lr"]
    for seed, hit, final in zip(line["seeds"], line["steps_to_tol"], line["final_loss"]):
      out.append(dict(
          optimizer=line["optimizer"], kappa=line["kappa"], method=line["method"],
          lr=line["lr"], seed=seed, steps_to_tol=hit, final_loss=final, best_lr=is_best,
          steps=line["steps"], threshold=line["threshold"],
      ))
  return out


def _best(recs: list) -> dict:
  """``{(optimizer, kappa, method): [records of the best lr, one per seed]}``, in order."""
  cells = {}
  for r in recs:
    if r["best_lr"]:
      cells.setdefault((r["optimizer"], r["kappa"], r["method"]), []).append(r)
  return cells


def _steps_text(hits: list) -> str:
  reached = [h for h in hits if h is not None]
  if not reached:
    return f"{len(hits)}/{len(hits)} not reached"
  median = np.median([np.inf if h is None else h for h in hits])
  text = f"{median:g}" if np.isfinite(median) else "not reached"
  text += f" [{min(reached)}-{max(reached)}]"
  if len(reached) < len(hits):
    text += f", {len(hits) - len(reached)}/{len(hits)} not reached"
  return text


def table(recs: list) -> str:
  """Markdown table: rows (optimizer, kappa), a column per method, at each cell's best lr."""
  best = _best(recs)
  rows = {}
  for (opt, kappa, method), rs in best.items():
    finals = [np.inf if r["final_loss"] is None else r["final_loss"] for r in rs]
    rows.setdefault((opt, kappa), {})[method] = (
        f"{_steps_text([r['steps_to_tol'] for r in rs])} "
        f"({np.median(finals):.1e}, lr {rs[0]['lr']:g})"
    )
  methods = [m for m in teacher.METHODS if any(m in row for row in rows.values())]
  lines = [
      f"| optimizer | kappa | {' | '.join(LABELS[m] for m in methods)} |",
      "|---|---|" + "---|" * len(methods),
  ]
  for (opt, kappa), row in rows.items():
    lines.append(f"| {opt} | {kappa:g} | {' | '.join(row.get(m, '') for m in methods)} |")
  return "\n".join(lines)


def markdown(recs: list) -> str:
  """The .md file: a caption line and ``table``."""
  r = recs[0]
  n_seeds = len({x["seed"] for x in recs})
  caption = (
      f"Steps to relative loss < {r['threshold']:g} (budget {r['steps']}): median over "
      f"{n_seeds} seeds [min-max over the seeds that reach it] (median final relative loss, "
      "best lr)."
  )
  return f"{caption}\n\n{table(recs)}\n"


def plot(recs: list, path: pathlib.Path | str) -> None:
  """Steps to the threshold vs kappa, one panel per optimizer, each method at its best lr."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  best = _best(recs)
  opts = list(dict.fromkeys(o for o, _, _ in best))
  budget, threshold = recs[0]["steps"], recs[0]["threshold"]
  colors = {"lora": "tab:red", "sds": "tab:blue", "sds_no_warmup": "tab:cyan"}
  shift = {"lora": 0.9, "sds": 1.0, "sds_no_warmup": 1.1}
  fig, axes = plt.subplots(1, len(opts), figsize=(10, 4), sharey=True, squeeze=False)
  for ax, opt in zip(axes[0], opts):
    for m in teacher.METHODS:
      cells = [(k, rs) for (o, k, mm), rs in best.items() if o == opt and mm == m]
      if not cells:
        continue
      kappas = np.array([k for k, _ in cells], float)
      hits = [
          np.array([budget if r["steps_to_tol"] is None else r["steps_to_tol"] for r in rs])
          for _, rs in cells
      ]
      ls = "--" if m == "sds_no_warmup" else "-"
      ax.plot(kappas, [np.median(h) for h in hits], color=colors[m], ls=ls, lw=1.4,
              marker="o", ms=3, label=LABELS[m])
      ax.fill_between(kappas, [h.min() for h in hits], [h.max() for h in hits],
                      color=colors[m], alpha=0.15, lw=0)
      miss = [(k, sum(r["steps_to_tol"] is None for r in rs)) for k, rs in cells]
      miss = [(k, n) for k, n in miss if n]
      if miss:
        ax.scatter([k * shift[m] for k, _ in miss], [budget] * len(miss), color=colors[m],
                   marker="x", s=30, zorder=3)
        for k, n in miss:
          ax.annotate(str(n), (k * shift[m], budget), textcoords="offset points",
                      xytext=(0, 5), ha="center", fontsize=7, color=colors[m])
    ax.axhline(budget, color="gray", lw=0.6, ls=":")
    ax.scatter([], [], color="gray", marker="x",
               label=f"n above x: n seeds not reaching it in {budget} steps (plotted there)")
    ax.set(xscale="log", yscale="log", xlabel="kappa (condition number of the target)")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(OPT_LABELS.get(opt, opt), fontsize=10)
    ax.legend(fontsize=7, loc="best")
  axes[0, 0].set_ylabel(f"steps to relative loss {threshold:g}")
  n_seeds = len({r["seed"] for r in recs})
  fig.suptitle(
      f"Rank-8 teacher (64x64), best lr per method: median and min-max over {n_seeds} seeds; "
      f"seeds that do not reach {threshold:g} count at the budget",
      fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


def _outputs(out: pathlib.Path) -> list[pathlib.Path]:
  return [out / f"conditioning.{ext}" for ext in OUTPUTS]


def write(recs: list, out: pathlib.Path | str, *, overwrite: bool = False) -> None:
  """Writes conditioning.json, .md and .png; ``FileExistsError`` if one exists and not
  ``overwrite``."""
  out = pathlib.Path(out)
  existing = [str(p) for p in _outputs(out) if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace")
  out.mkdir(parents=True, exist_ok=True)
  (out / "conditioning.json").write_text(json.dumps(recs, indent=1) + "\n")
  regenerate(out / "conditioning.json", out)


def regenerate(json_path: pathlib.Path | str, out_dir: pathlib.Path | str) -> None:
  """Rebuilds conditioning.md and conditioning.png in ``out_dir`` from the JSON alone
  (replacing them)."""
  recs = json.loads(pathlib.Path(json_path).read_text())
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "conditioning.md").write_text(markdown(recs))
  plot(recs, out_dir / "conditioning.png")


FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", None, "Step budget (default 3000).", flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/conditioning", "Where the runs go.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Default experiments/results (<workdir>/quick with --quick).",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing result files.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Tiny sweep, for tests.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  args = cli.parse(FLAGS, argv)
  workdir = pathlib.Path(args.workdir)
  settings = QUICK if args.quick else FULL
  if args.steps is not None:
    settings = dataclasses.replace(settings, steps=args.steps)
  out = pathlib.Path(args.out) if args.out else (workdir / "quick" if args.quick else pathlib.Path("experiments/results"))
  existing = [str(p) for p in _outputs(out) if p.exists()]
  if existing and not args.overwrite:
    cli.error(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
  recs = run(settings, workdir)
  write(recs, out, overwrite=args.overwrite)
  print(f"\n{markdown(recs)}\nwrote {out}/conditioning.json, .md and .png")


if __name__ == "__main__":
  cli.run(main, FLAGS)
