"""The switch from plain-LoRA warm-up to SDS-LoRA.

With the usual LoRA initialisation (``b = 0``) the basis of ``b`` is undefined,
so training starts as plain LoRA for a few steps and then re-expresses the same
update in SDS-LoRA form (the paper's "Equation 8" as this project reads it; the
coefficient ``1/(2s)`` below is the one for which the identity holds):

1. ``qa0 = orth(a)``, ``qb0 = orth(b.T)`` (any orthonormal bases of ``a``'s
   columns and ``b``'s rows: the thin-QR factors the refresh computes); SVD of
   the ``r x r`` core ``s (qa0.T a) (b qb0) = U S V.T``.
2. ``qa = qa0 U``, ``qb = qb0 V``.
3. ``a' = qa diag(S / 2s)``, ``b' = diag(S / 2s) qb.T``.

Then ``s (qa b' + a' qb.T) = qa S qb.T = s a b``: the adapted function is
unchanged, and ``qa = orth(a')``, ``qb = orth(b'.T)`` wherever ``S > 0``. Step 1
is the only factorisation of a tall matrix, so ``sds_lora`` shares it with the
refresh that runs in the same update: one QR per factor shape in its program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import _batching, _checks, _linalg
from sdslora_jax.basis import BASIS_METHODS, orthonormal_basis
from sdslora_jax.gram_basis import gram_qr

_HI = jax.lax.Precision.HIGHEST

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
    the bases are float32, orthonormal, and equal ``orthonormal_basis`` of
    the float32 factors before that rounding wherever ``S > 0`` (see
    ``activated_from_bases`` for a direction the warm-up left at zero).
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
  adapter). One batched QR (``a`` and ``b.T`` together when alike in shape), SVD
  and basis computation for the whole batch, so the program does not grow with
  the number of adapters. Not validated: the optimizer calls it on adapters it
  has checked.
  """
  a32 = jnp.asarray(a, jnp.float32)
  b32 = jnp.asarray(b, jnp.float32)
  bases = _batching.map_groups(lambda m: (orthonormal_basis(m, method=method),),
                               {"a": (a32,), "b": (jnp.swapaxes(b32, -1, -2),)}, tails=(2,))
  a_new, b_new, qa, qb = activated_from_bases(a32, b32, bases["a"][0], bases["b"][0], scale)
  # Everything is float32 up to here; low-precision factors are rounded once.
  return a_new.astype(jnp.asarray(a).dtype), b_new.astype(jnp.asarray(b).dtype), qa, qb


def activated_from_bases(
    a: jax.Array, b: jax.Array, qa0: jax.Array, qb0: jax.Array, scale: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Steps 2-3 of the switch for a batch: ``(a', b', qa, qb)``, float32.

  ``a: (..., d_in, r)``, ``b: (..., r, d_out)`` (float32), ``qa0: (..., d_in, r)``
  and ``qb0: (..., d_out, r)`` orthonormal with ``a = qa0 qa0.T a`` and
  ``b.T = qb0 qb0.T b.T`` (step 1), ``scale`` broadcastable to the batch axes.
  The tall matrices meet only ``r x r`` matrices (an ``r x r`` contraction over
  their rows, right-multiplications), so a row-sharded factor is not gathered.
  Where ``S > 0``, ``qa = orth(a')`` and ``qb = orth(b'.T)``; a direction the
  warm-up left at zero (``S = 0``) keeps the column of ``qa0 U`` as its basis
  vector (any orthonormal completion preserves the update).
  """
  scale = jnp.asarray(scale, jnp.float32)[..., None, None]
  t = lambda x: jnp.swapaxes(x, -1, -2)
  core = scale * jnp.matmul(jnp.matmul(t(qa0), a, precision=_HI),
                            jnp.matmul(b, qb0, precision=_HI), precision=_HI)
  u, s, vt = _linalg.map_matrices(lambda x: jnp.linalg.svd(x, full_matrices=False), core)
  qa = jnp.matmul(qa0, u, precision=_HI)
  qb = jnp.matmul(qb0, t(vt), precision=_HI)
  half = s / (2.0 * scale[..., 0])
  return qa * half[..., None, :], half[..., :, None] * t(qb), qa, qb


def thin_qr(m: jax.Array, method: str = "gram") -> tuple[jax.Array, jax.Array]:
  """Float32 thin QR ``(q, r)`` of ``(..., n, r)`` matrices by ``method`` (the retraction's)."""
  m32 = jnp.asarray(m, jnp.float32)
  if method == "gram":  # r x r communication only when a factor is sharded
    return gram_qr(m32)
  return _linalg.reduced_qr(m32)
