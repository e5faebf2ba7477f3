"""Speed and memory of one adapted layer's forward+backward, as ratios to plain LoRA.

Compares, in one process and on the same inputs, the gradient w.r.t. (x, a, b) of
``sum(f(x) ** 2)`` for:

* ``lora``: ``lora_matmul`` (the baseline),
* ``sds``: ``sds_matmul`` with bases derived from the factors inside the step,
* ``sds_given_bases``: ``sds_matmul`` with precomputed bases (what training with a
  refresh schedule runs),
* ``sds_dense``: ``x @ sds_delta(...)``, the naive path that forms the kernel-sized
  update.

Memory is XLA's temporary-buffer size of the compiled step
(``compiled.memory_analysis()``), where the backend reports it.

Run: python -m experiments.bench_ops [--d 4096 --r 16 --tokens 2048 --repeats 20]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import sdslora_jax as sds
from sdslora_jax.basis import factor_bases
from experiments import cli


def _variants(scale):
  return {
      "lora": lambda x, a, b, qa, qb: sds.lora_matmul(x, a, b, scale=scale),
      "sds": lambda x, a, b, qa, qb: sds.sds_matmul(x, a, b, scale=scale),
      "sds_given_bases": lambda x, a, b, qa, qb: sds.sds_matmul(x, a, b, scale=scale, qa=qa, qb=qb),
      "sds_dense": lambda x, a, b, qa, qb: x @ sds.sds_delta(a, b, scale=scale, qa=qa, qb=qb),
  }


FLAGS = flags.FlagValues()
flags.DEFINE_integer("d", 4096, "Width.", flag_values=FLAGS)
flags.DEFINE_integer("r", 16, "Rank.", flag_values=FLAGS)
flags.DEFINE_integer("tokens", 2048, "Tokens.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 20, "Timed repeats.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.",
                  flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  dt = jnp.dtype(args.dtype)
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (args.tokens, args.d)).astype(dt)
  a = (jax.random.normal(k[1], (args.d, args.r)) / np.sqrt(args.d)).astype(dt)
  b = (jax.random.normal(k[2], (args.r, args.d)) * 0.01).astype(dt)
  qa, qb = factor_bases(a, b)
  print(f"device {jax.devices()[0].platform}, d={args.d}, r={args.r}, tokens={args.tokens}, {args.dtype}")

  rows = {}
  for name, f in _variants(2.0).items():
    step = jax.jit(
        jax.grad(lambda x, a, b: jnp.sum(f(x, a, b, qa, qb).astype(jnp.float32) ** 2), (0, 1, 2))
    )
    compiled = step.lower(x, a, b).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(x, a, b))
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(x, a, b))
      times.append(time.perf_counter() - t)
    rows[name] = (float(np.median(times)), temp)
    print(f"  {name:16s} {rows[name][0] * 1e3:8.2f} ms  temp {temp if temp is not None else 'n/a'} B", flush=True)

  base_t, base_m = rows["lora"]
  print("\n| variant | time / LoRA | temp memory / LoRA |\n|---|---|---|")
  for name, (t, m) in rows.items():
    mem = f"{m / base_m:.2f}" if m and base_m else "n/a"
    print(f"| {name} | {t / base_t:.2f} | {mem} |")


if __name__ == "__main__":
  cli.run(main, FLAGS)
