"""Regenerates the README's evidence tables and plots from the results JSON files.

``python -m experiments.results_section [--readme README.md]``

Rebuilds, from ``experiments/results/{conditioning,geometry,finetune,ablations,
stability}.json`` alone, each experiment's Markdown table and PNG (through its module's
own ``regenerate``), and rewrites the README between ``<!-- results:begin -->`` and
``<!-- results:end -->`` with the tables and the plots. The readings and verdicts around
that block are written by hand from the numbers. A results file that does not exist yet
is reported as such.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from experiments import cli


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _conditioning(path: pathlib.Path, results: pathlib.Path) -> str:
  from experiments import conditioning

  conditioning.regenerate(path, results)
  return (results / "conditioning.md").read_text().strip()


def _geometry(path: pathlib.Path, results: pathlib.Path) -> str:
  from experiments import geometry

  flat = geometry._flat(json.loads(path.read_text()))
  geometry.plot(flat, results / "geometry.png")
  return geometry.summary(flat)


def _table_and_plot(module: str, stem: str):
  def render(path: pathlib.Path, results: pathlib.Path) -> str:
    import importlib

    mod = importlib.import_module(module)
    records = json.loads(path.read_text())
    md = mod.table(records)
    (results / f"{stem}.md").write_text(md + "\n")
    mod.plot(records, results / f"{stem}.png")
    return md
  return render


# (results file stem, heading, command, renderer, plot's alt text)
BLOCKS = (
  ("conditioning", "Convergence against condition number", "python -m experiments.conditioning",
   _conditioning, "steps to 1e-6 against kappa"),
  ("geometry", "Gradient geometry during fine-tuning", "python -m experiments.geometry",
   _geometry, "gradient geometry per adapted kernel"),
  ("finetune", "Fine-tuning grid", "python -m experiments.finetune.grid",
   _table_and_plot("experiments.finetune.grid", "finetune"), "test accuracy by method"),
  ("ablations", "SDS-LoRA ablations (MiniLM, lr 2e-3)",
   "python -m experiments.ablations --seeds 0,1,2",
   _table_and_plot("experiments.ablations", "ablations"), "training loss per ablation"),
  ("stability", "SDS-LoRA at twice LoRA's best learning rate, 5 seeds",
   "python -m experiments.stability",
   _table_and_plot("experiments.stability", "stability"), "training loss per seed and method"),
)


def section(results: pathlib.Path = RESULTS) -> str:
  parts = []
  for stem, heading, command, render, alt in BLOCKS:
    path = results / f"{stem}.json"
    if not path.exists():
      parts += [f"{heading}: not run yet (`{command}`).", ""]
      continue
    parts += [f"#### {heading} (`{command}`)", "", render(path, results), "",
              f"![{alt}](experiments/results/{stem}.png)", ""]
  return "\n".join(parts).strip()


FLAGS = flags.FlagValues()
flags.DEFINE_string("readme", str(RESULTS.parent.parent / "README.md"), "The README to update.",
                    flag_values=FLAGS)
flags.DEFINE_string("results", str(RESULTS), "Where the results are.", flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
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
  cli.run(main, FLAGS)
