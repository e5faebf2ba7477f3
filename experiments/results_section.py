"""Regenerates the README's evidence tables and plots from the results JSON files.

``python -m experiments.results_section [--readme README.md]``

Rebuilds, from ``experiments/results/{conditioning,geometry,finetune}.json`` alone, each
experiment's Markdown table and PNG (through its module's own ``regenerate``), and
rewrites the README between ``<!-- results:begin -->`` and ``<!-- results:end -->``
with the tables and the plots. The readings and verdicts around that block are written
by hand from the numbers. A results file that does not exist yet is reported as such.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def section(results: pathlib.Path = RESULTS) -> str:
  from experiments import conditioning, geometry
  from experiments.finetune import grid

  parts = []
  cond = results / "conditioning.json"
  if cond.exists():
    conditioning.regenerate(cond, results)
    parts += ["#### Convergence against condition number (`python -m experiments.conditioning`)",
              "", (results / "conditioning.md").read_text().strip(), "",
              "![steps to 1e-6 against kappa](experiments/results/conditioning.png)", ""]
  else:
    parts += ["Convergence against condition number: not run yet.", ""]
  geo = results / "geometry.json"
  if geo.exists():
    records = json.loads(geo.read_text())
    flat = geometry._flat(records)
    geometry.plot(flat, results / "geometry.png")
    parts += ["#### Gradient geometry during fine-tuning (`python -m experiments.geometry`)", "",
              geometry.summary(flat), "",
              "![gradient geometry per adapted kernel](experiments/results/geometry.png)", ""]
  else:
    parts += ["Gradient geometry: not run yet.", ""]
  fine = results / "finetune.json"
  if fine.exists():
    records = json.loads(fine.read_text())
    (results / "finetune.md").write_text(grid.table(records) + "\n")
    grid.plot(records, results / "finetune.png")
    parts += ["#### Fine-tuning grid (`python -m experiments.finetune.grid`)", "",
              grid.table(records), "",
              "![test accuracy by method](experiments/results/finetune.png)", ""]
  else:
    parts += ["Fine-tuning grid: not finished yet (`python -m experiments.finetune.grid` "
              "resumes it).", ""]
  return "\n".join(parts).strip()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--readme", default=str(RESULTS.parent.parent / "README.md"))
  parser.add_argument("--results", default=str(RESULTS))
  args = parser.parse_args(argv)
  path = pathlib.Path(args.readme)
  text = path.read_text()
  if BEGIN not in text or END not in text:
    print(f"error: {path} has no {BEGIN} ... {END} block", file=sys.stderr)
    return 2
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  path.write_text(f"{head}{BEGIN}\n{section(pathlib.Path(args.results))}\n{END}{tail}")
  print(f"rewrote the results block of {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
