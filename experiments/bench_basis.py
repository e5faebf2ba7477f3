"""Speed of the Householder basis vs the Gram (Cholesky-QR) basis, one device.

Times, jitted and on the same float32 factor ``(d, r)`` (a random Gaussian,
condition number ~1.3):

* ``householder``: ``basis.orthonormal_basis`` (the package's Householder QR),
* ``gram``: ``gram_basis.gram_orthonormal_basis`` with the default ``passes=3``
  (shifted CholeskyQR3, the fast path),
* ``gram_p2``: the same with ``passes=2`` (CholeskyQR2),
* ``gram_safe``: the safe path alone (what a rank-deficient factor costs).

Each round calls every variant once, in an order that rotates between rounds
(interleaved, so that load from other processes hits all of them alike), after
warm-up; the table reports the median and the minimum over rounds and the ratio
of medians to Householder.

Run: python -m experiments.bench_basis [--quick] [--repeats 50]
"""

from __future__ import annotations

import os

# jaxlib runs the Householder QR through LAPACK on OpenBLAS threads, which
# compete with XLA's own thread pool: on a small shared machine that made
# Householder 10-100x slower in interleaved runs. One BLAS thread by default;
# set OPENBLAS_NUM_THREADS to override. (Must precede importing numpy / JAX.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402
from sdslora_jax import gram_basis  # noqa: E402
from sdslora_jax.basis import orthonormal_basis  # noqa: E402

SHAPES = ((1024, 16), (4096, 16), (4096, 64))


def _variants():
  return {
      "householder": orthonormal_basis,
      "gram": gram_basis.gram_orthonormal_basis,
      "gram_p2": lambda m: gram_basis.gram_orthonormal_basis(m, passes=2),
      "gram_safe": lambda m: gram_basis._safe_path(gram_basis._prepare(m, None)[0], None),
  }


def bench(d: int, r: int, repeats: int, warmup: int = 3) -> dict[str, np.ndarray]:
  m = jax.random.normal(jax.random.key(d + r), (d, r), jnp.float32)
  fns = {name: jax.jit(f).lower(m).compile() for name, f in _variants().items()}
  for f in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(f(m))
  names = list(fns)
  times = {name: [] for name in names}
  for i in range(repeats):
    for name in names[i % len(names):] + names[: i % len(names)]:
      t = time.perf_counter()
      jax.block_until_ready(fns[name](m))
      times[name].append(time.perf_counter() - t)
  return {name: np.asarray(t) for name, t in times.items()}


FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "15 rounds instead of --repeats.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 50, "Rounds.", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  repeats = 15 if args.quick else args.repeats
  dev = jax.devices()[0]
  print(
      f"device {dev.platform} ({dev.device_kind}), float32, {repeats} interleaved rounds, "
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
  )
  print("\n| d | r | variant | median ms | min ms | median / householder |\n|---|---|---|---|---|---|")
  for d, r in SHAPES:
    times = bench(d, r, repeats)
    base = np.median(times["householder"])
    for name, t in times.items():
      print(
          f"| {d} | {r} | {name} | {np.median(t) * 1e3:.3f} | {t.min() * 1e3:.3f} | "
          f"{np.median(t) / base:.2f} |",
          flush=True,
      )


if __name__ == "__main__":
  cli.run(main, FLAGS)
