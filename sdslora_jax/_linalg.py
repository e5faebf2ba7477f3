"""Per-matrix decompositions over a batch, one LAPACK call per matrix on CPU.

jaxlib's CPU LAPACK kernels (QR, SVD, Cholesky, triangular solve; jaxlib
0.10.2) split a batch of matrices over XLA's intra-op thread pool and block
until every piece is done. When a compiled program runs two such batched calls
at once and their waits hold every thread of the pool, no piece can start and
the program hangs for ever at 0% CPU. On a 2-core machine it takes only two
independent batched calls: two ``jnp.linalg.cholesky`` calls on ``(200, 32,
32)`` batches in one ``jax.jit`` hang; here it was the SDS switch of rank-32
adapters in two shape groups. A call on a single matrix runs inline and cannot
wait on the pool, so on CPU ``map_matrices`` loops over the batch
(``lax.map``); on other platforms it keeps the batched call (``jax.vmap``).

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def map_matrices(fn: Callable[..., Any], *args: jax.Array, ndim: int = 2) -> Any:
  """``fn`` applied to each matrix of a batch: ``jax.vmap(fn)``, but a loop on CPU.

  Args:
    fn: a function of single matrices (each argument's trailing ``ndim`` axes)
      returning a pytree of arrays; it may contain LAPACK-backed operations.
    *args: arrays with the same leading (batch) axes, any number of them.
    ndim: how many trailing axes of each argument form one item (default 2).

  Returns:
    ``fn``'s outputs with the batch axes in front, as ``jax.vmap`` would give.
  """
  lead = tuple(args[0].shape[: args[0].ndim - ndim])
  for x in args:
    if tuple(x.shape[: x.ndim - ndim]) != lead:
      raise ValueError(f"map_matrices: batch axes differ: {lead} vs {x.shape[: x.ndim - ndim]}")
  if not lead:
    return fn(*args)
  n = int(np.prod(lead, dtype=np.int64))
  flat = tuple(x.reshape((n, *x.shape[x.ndim - ndim:])) for x in args)

  def looped(*xs):
    return lax.map(lambda item: fn(*item), xs)

  def batched(*xs):
    return jax.vmap(fn)(*xs)

  out = batched(*flat) if n == 1 else lax.platform_dependent(*flat, cpu=looped, default=batched)
  return jax.tree.map(lambda y: y.reshape((*lead, *y.shape[1:])), out)


def reduced_qr(m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``jnp.linalg.qr(m, mode="reduced")`` of ``(..., n, r)`` matrices, per matrix on CPU."""
  return map_matrices(lambda x: jnp.linalg.qr(x, mode="reduced"), m)
