"""The switch from plain-LoRA warm-up to SDS-LoRA.

With the usual LoRA initialisation (``b = 0``) the basis of ``b`` is undefined,
so training starts as plain LoRA for a few steps and then re-expresses the same
update in SDS-LoRA form (the paper's "Equation 8" as this project reads it; the
coefficient ``1/(2s)`` below is the one for which the identity holds):

1. ``a = Qa Ra``, ``b.T = Qb Rb`` (thin QR); SVD ``s Ra Rb.T = U S V.T``.
2. ``qa = Qa U``, ``qb = Qb V``.
3. ``a' = qa diag(S / 2s)``, ``b' = diag(S / 2s) qb.T``.

Then ``s (qa b' + a' qb.T) = qa S qb.T = s a b``: the adapted function is
unchanged, and ``qa = orth(a')``, ``qb = orth(b'.T)`` wherever ``S > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import _batching, _checks, _linalg
from sdslora_jax.basis import BASIS_METHODS, orthonormal_basis
from sdslora_jax.gram_basis import gram_qr

__all__ = ["activate_sds"]


def activate_sds(
    a: jax.Array, b: jax.Array, *, scale: float, method: str = "gram"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Re-expresses a LoRA adapter exactly as an SDS-LoRA adapter.

  Args:
    a: ``(d_in, r)`` LoRA down factor after warm-up.
    b: ``(r, d_out)`` LoRA up factor after warm-up.
    scale: the adapter scale ``s``.
    method: how the QRs and bases are computed, ``"gram"`` (default; see
      ``orthonormal_basis``) or ``"householder"``.

  Returns:
    ``(a_new, b_new, qa, qb)`` with ``sds_delta(a_new, b_new, scale=scale,
    qa=qa, qb=qb) == lora_delta(a, b, scale=scale)`` up to float rounding.
    Factors keep their input dtypes (computed in float32 and rounded once);
    the bases are float32 and equal ``orthonormal_basis`` of the float32
    factors before that rounding.
  """
  _checks.check_factors(jnp.shape(a), jnp.shape(b))
  _checks.check_float_arrays(a=a, b=b)
  scale = _checks.check_scale(scale)
  if method not in BASIS_METHODS:
    raise ValueError(f"unknown basis method {method!r}; choose from {BASIS_METHODS}")
  return activate_sds_batch(a, b, jnp.float32(scale), method=method)


def activate_sds_batch(
    a: jax.Array, b: jax.Array, scale: jax.Array, *, method: str = "gram"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``activate_sds`` of a batch: ``a: (..., d_in, r)``, ``b: (..., r, d_out)``.

  ``scale`` is an array broadcastable to the batch axes (one scale per
  adapter). One batched QR, SVD and basis computation for the whole batch, so
  the program does not grow with the number of adapters. Not validated: the
  optimizer calls it on adapters it has checked.
  """
  a_new, b_new = activated_factors(a, b, scale, method=method)
  # Where S > 0, orth(a_new) = qa (the QR of qa diag(c) with c > 0 is unique), so
  # these bases equal qa, qb up to rounding. Where the warm-up left a direction at
  # zero, the column of a_new / row of b_new is zero and any orthonormal completion
  # preserves the update; taking the package's basis makes the bases exactly what
  # a refresh would compute. Everything stays in float32 up to here; low-precision
  # factors are rounded once, below, and the bases are those of the unrounded
  # float32 factors.
  qa = orthonormal_basis(a_new, method=method)
  qb = orthonormal_basis(jnp.swapaxes(b_new, -1, -2), method=method)
  return a_new.astype(jnp.asarray(a).dtype), b_new.astype(jnp.asarray(b).dtype), qa, qb


def activated_factors(
    a: jax.Array, b: jax.Array, scale: jax.Array, *, method: str = "gram"
) -> tuple[jax.Array, jax.Array]:
  """Steps 1-3 of the switch for a batch: the new float32 factors ``(a', b')``.

  ``a: (..., d_in, r)``, ``b: (..., r, d_out)``, ``scale`` broadcastable to the
  batch axes. The bases are ``orth(a')`` and ``orth(b'.T)`` (see
  ``activate_sds_batch``).
  """
  return activated_factors_of_groups([(a, b, scale)], method=method)[0]


def activated_factors_of_groups(
    groups: Sequence[tuple[jax.Array, jax.Array, Any]], *, method: str = "gram"
) -> list[tuple[jax.Array, jax.Array]]:
  """``activated_factors`` of several batches ``(a, b, scale)`` at once.

  The QRs of all factors alike in shape (``a`` of one batch and ``b.T`` of
  another included) run as one batched QR: the switch of a whole model holds
  one QR per factor shape, whatever its number of adapters.
  """
  mats = {}
  for k, (a, b, _) in enumerate(groups):
    mats[k, "a"] = (jnp.asarray(a, jnp.float32),)
    mats[k, "b"] = (jnp.swapaxes(jnp.asarray(b, jnp.float32), -1, -2),)
  qrs = _batching.map_groups(lambda m: thin_qr(m, method), mats, tails=(2,))
  return [factors_from_qr(*qrs[k, "a"], *qrs[k, "b"], jnp.asarray(scale, jnp.float32))
          for k, (_, _, scale) in enumerate(groups)]


def thin_qr(m: jax.Array, method: str = "gram") -> tuple[jax.Array, jax.Array]:
  """Float32 thin QR of ``(..., n, r)`` matrices by ``method`` (step 1 of the switch)."""
  m32 = jnp.asarray(m, jnp.float32)
  if method == "gram":  # r x r communication only when a factor is sharded
    return gram_qr(m32)
  return _linalg.reduced_qr(m32)


def factors_from_qr(q_a, r_a, q_b, r_b, scale) -> tuple[jax.Array, jax.Array]:
  """Steps 2-3 of the switch from ``a = q_a r_a`` and ``b.T = q_b r_b`` (batched)."""
  scale = jnp.asarray(scale, jnp.float32)[..., None, None]
  core = scale * (r_a @ jnp.swapaxes(r_b, -1, -2))
  u, s, vt = _linalg.map_matrices(lambda x: jnp.linalg.svd(x, full_matrices=False), core)
  qa = q_a @ u
  qb = q_b @ jnp.swapaxes(vt, -1, -2)
  half = s / (2.0 * scale[..., 0])
  return qa * half[..., None, :], half[..., :, None] * jnp.swapaxes(qb, -1, -2)
