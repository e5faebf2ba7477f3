"""A/B of the SDS-LoRA op in one process: the rank-r op (fresh bases) vs the two-branch op.

An SDS adapter with ``fresh_bases=True`` (the default; ``sds_lora`` refreshes the bases
after every update) runs as one rank-r op; ``fresh_bases=False`` runs the exact
two-branch op, ``r`` wider each way. This script times the ``step_overhead`` train
steps of LoRA, SDS-LoRA with fresh bases and SDS-LoRA with the two-branch op
(``with_fresh_bases(trainable, False)``), interleaved, as ``step_overhead`` does.

Run::

  python -m experiments.sds_op_ab            # the README's table (a few minutes)
  python -m experiments.sds_op_ab --quick    # one small configuration

Writes one JSON record per variant and configuration to stdout and, without
``--quick``, to ``experiments/results/sds_op_ab.jsonl``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import optax
from absl import flags

from experiments import cli
from experiments import step_overhead as so
from sdslora_jax.optim import sds_lora
from sdslora_jax.adapter import with_fresh_bases


CONFIGS = [
    {"model": "dense_stack", "d": 1024, "rank": r, "tokens": 2048, "repeats": 20}
    for r in (8, 16, 32, 64)
] + [
    {"model": "dense_stack", "d": 4096, "rank": 64, "tokens": 512, "repeats": 8},
    {"model": "minilm", "batch": 32, "seq": 128, "rank": 8, "num_layers": None, "repeats": 10},
]
QUICK = [{"model": "dense_stack", "d": 1024, "rank": 64, "tokens": 512, "repeats": 5}]
OUT = pathlib.Path(__file__).parent / "results" / "sds_op_ab.jsonl"


def _variants(c: dict) -> dict[str, so.Variant]:
  if c["model"] == "minilm":
    variants = so.minilm_variants(c["batch"], c["seq"], c["rank"], c["num_layers"], False)
  else:
    variants = so._stack_variants(c["d"], c["rank"], c["tokens"], op_level=False)  # pylint: disable=protected-access
  return {v.name: v for v in variants}


def run(c: dict) -> list[dict]:
  lora, fresh = (_variants(c)[n] for n in ("lora", "sds"))
  two = _variants(c)["sds"]
  two.trainable = with_fresh_bases(two.trainable, False)
  two.opt_state = sds_lora(optax.adamw(so.LR), warmup_steps=0).init(two.trainable)  # as built
  fresh.name, two.name = "sds_rank_r", "sds_two_branch"
  rows = so.measure([lora, fresh, two], c["repeats"], lambda s: print(s, file=sys.stderr))
  meta = {k: c.get(k) for k in ("model", "d", "rank", "tokens", "batch", "num_layers")}
  return [{**meta, **r} for r in rows]


FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "One small configuration.", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  records = []
  for c in QUICK if args.quick else CONFIGS:
    for r in run(c):
      records.append(r)
      print(json.dumps(r), flush=True)
  if not args.quick:
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
  cli.run(main, FLAGS)
