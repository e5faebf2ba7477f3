"""A/B of the SDS-LoRA op in one process: the rank-r op (fresh bases) vs the two-branch op.

``ops.FAST_MIN_RANK`` decides, at trace time, from which rank the SDS op checks its
bases and takes the rank-r op behind a ``lax.cond``. This script compiles the
``step_overhead`` train steps three times per configuration, LoRA, SDS-LoRA with the
rank-r op forced (``FAST_MIN_RANK = 1``) and SDS-LoRA with the two-branch op forced
(``FAST_MIN_RANK`` above the rank), and times them interleaved, as ``step_overhead`` does.

Run::

  python -m experiments.sds_op_ab            # the README's table (a few minutes)
  python -m experiments.sds_op_ab --quick    # one small configuration

Writes one JSON record per variant and configuration to stdout and, without
``--quick``, to ``experiments/results/sds_op_ab.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments import step_overhead as so
from sdslora_jax import ops

CONFIGS = [
    {"model": "dense_stack", "d": 1024, "rank": r, "tokens": 2048, "repeats": 20}
    for r in (8, 16, 32, 64)
] + [
    {"model": "dense_stack", "d": 4096, "rank": 64, "tokens": 512, "repeats": 8},
    {"model": "minilm", "batch": 32, "seq": 128, "rank": 8, "num_layers": None, "repeats": 10},
]
QUICK = [{"model": "dense_stack", "d": 1024, "rank": 64, "tokens": 512, "repeats": 5}]
OUT = pathlib.Path(__file__).parent / "results" / "sds_op_ab.jsonl"


def _compiled(c: dict, fast_min_rank: int, names: tuple[str, ...]) -> list[so.Variant]:
  """The configuration's variants in ``names``, compiled with ``FAST_MIN_RANK`` set."""
  saved, ops.FAST_MIN_RANK = ops.FAST_MIN_RANK, fast_min_rank
  try:
    if c["model"] == "minilm":
      variants = so.minilm_variants(c["batch"], c["seq"], c["rank"], c["num_layers"], False)
    else:
      variants = so._stack_variants(c["d"], c["rank"], c["tokens"], op_level=False)  # pylint: disable=protected-access
    variants = [v for v in variants if v.name in names]
    for v in variants:
      v.compile()
      v.compile = lambda: None  # measure() must not retrace with another FAST_MIN_RANK
  finally:
    ops.FAST_MIN_RANK = saved
  return variants


def run(c: dict) -> list[dict]:
  rank_r = _compiled(c, 1, ("lora", "sds"))
  two = _compiled(c, c["rank"] + 1, ("sds",))
  rank_r[1].name, two[0].name = "sds_rank_r", "sds_two_branch"
  rows = so.measure(rank_r + two, c["repeats"], lambda s: print(s, file=sys.stderr))
  meta = {k: c.get(k) for k in ("model", "d", "rank", "tokens", "batch", "num_layers")}
  return [{**meta, "default_fast_min_rank": ops.FAST_MIN_RANK, **r} for r in rows]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one small configuration")
  args = parser.parse_args(argv)
  records = []
  for c in QUICK if args.quick else CONFIGS:
    for r in run(c):
      records.append(r)
      print(json.dumps(r), flush=True)
  if not args.quick:
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
  main()
