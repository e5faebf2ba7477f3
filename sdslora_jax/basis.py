"""Orthonormal bases of the adapter factors' subspaces.

SDS-LoRA routes the full fine-tuning gradient through orthonormal bases of the
factors' column / row spaces instead of through the factors themselves
(Oh, Baik & Lee, "SDS-LoRA", arXiv 2606.16454). This module computes those bases
deterministically: thin QR in float32 with a non-negative diagonal of R, so that a
basis is a continuous function of a full-rank factor and identical on every host.
By default through Gram matrices (``gram_basis.py``), which needs only ``r x r``
communication when a factor is sharded.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdslora_jax import _checks, _linalg

__all__ = ["orthonormal_basis", "refresh_bases"]


BASIS_METHODS = ("gram", "householder")


def orthonormal_basis(m: jax.Array, *, method: str = "householder") -> jax.Array:
  """Orthonormal columns spanning the columns of ``m``.

  Args:
    m: a ``(n, r)`` matrix with ``n >= r``, any float dtype (or a batch
      ``(..., n, r)`` of them).
    method: ``"householder"`` (default; LAPACK / XLA QR) or ``"gram"``
      (``gram_basis.gram_orthonormal_basis``: shifted Cholesky-QR on ``r x r``
      Gram matrices, so a factor sharded along its long axis is never gathered,
      an ``r x r`` all-reduce per pass instead, and no LAPACK QR runs on the
      host's BLAS threads; the default of ``sds_lora`` and ``refresh_bases``).
      Both give the thin-QR factor below, equal up to rounding for full-rank
      ``m``; they complete rank-deficient inputs differently.

  Returns:
    ``q`` of shape ``(n, r)`` in float32 with ``q.T @ q = I`` and ``m = q @ R``
    for an upper-triangular ``R`` with non-negative diagonal. Rank-deficient and
    all-zero inputs give finite, orthonormal columns (the columns that ``m`` does
    not determine are completed by the Householder QR).

  Raises:
    ValueError: if ``m`` is not 2-D, has more columns than rows, has a
      non-floating dtype, or ``method`` is unknown.
  """
  if method == "gram":
    from sdslora_jax.gram_basis import gram_orthonormal_basis

    return gram_orthonormal_basis(m)
  if method != "householder":
    raise ValueError(f"unknown basis method {method!r}; choose from {BASIS_METHODS}")
  shape = jnp.shape(m)
  _checks.check_tall_matrix("m", shape[-2:] if len(shape) > 2 else shape)
  _checks.check_float_arrays(m=m)
  m32 = jnp.asarray(m, jnp.float32)
  q, r = _linalg.reduced_qr(m32)
  signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(jnp.float32)
  return q * signs[..., None, :]


def align_signs(new: jax.Array, previous: jax.Array) -> jax.Array:
  """Flips columns of ``new`` whose inner product with ``previous`` is negative.

  Keeps a refreshed basis on the same side as the basis it replaces, so that a
  refresh perturbs the adapted function as little as possible.
  """
  if jnp.shape(new) != jnp.shape(previous):
    raise ValueError(
        f"cannot align bases of different shapes: {jnp.shape(new)} vs "
        f"{jnp.shape(previous)}"
    )
  dots = jnp.sum(new * jnp.asarray(previous, new.dtype), axis=-2)
  return new * jnp.where(dots < 0, -1.0, 1.0).astype(new.dtype)[..., None, :]


def factor_bases(
    a: jax.Array, b: jax.Array, *, method: str = "gram"
) -> tuple[jax.Array, jax.Array]:
  """Returns ``(qa, qb)``: ``qa = orth(a)`` ``(d_in, r)``, ``qb = orth(b.T)`` ``(d_out, r)``."""
  _checks.check_factors(jnp.shape(a), jnp.shape(b))
  return (orthonormal_basis(a, method=method),
          orthonormal_basis(jnp.swapaxes(b, 0, 1), method=method))


def refresh_bases(
    a: jax.Array, b: jax.Array, qa: jax.Array, qb: jax.Array, *, method: str = "gram"
) -> tuple[jax.Array, jax.Array]:
  """Recomputes the bases from the current factors, signs aligned to the old ones.

  Args:
    a: ``(d_in, r)`` down factor.
    b: ``(r, d_out)`` up factor.
    qa: previous ``(d_in, r)`` basis of ``a``.
    qb: previous ``(d_out, r)`` basis of ``b.T``.

  Returns:
    ``(qa_new, qb_new)``, float32, orthonormal, spanning ``a``'s columns and
    ``b``'s rows, each column flipped if needed to have a non-negative inner
    product with the corresponding column of the previous basis.
  """
  _checks.check_factors(jnp.shape(a), jnp.shape(b), qa=jnp.shape(qa), qb=jnp.shape(qb))
  new_qa, new_qb = factor_bases(a, b, method=method)
  return align_signs(new_qa, qa), align_signs(new_qb, qb)
