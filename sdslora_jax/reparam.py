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

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.basis import factor_bases
from sdslora_jax.gram_basis import gram_qr


def activate_sds(
    a: jax.Array, b: jax.Array, *, scale: float, method: str = "gram"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Re-expresses a LoRA adapter exactly as an SDS-LoRA adapter.

  Args:
    a: ``(d_in, r)`` LoRA down factor after warm-up.
    b: ``(r, d_out)`` LoRA up factor after warm-up.
    scale: the adapter scale ``s``.
    method: how the QRs and bases are computed, ``"gram"`` (default; see
      ``basis.basis``) or ``"householder"``.

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
  a32 = jnp.asarray(a, jnp.float32)
  b32 = jnp.asarray(b, jnp.float32)
  if method == "gram":  # r x r communication only when a factor is sharded
    q_a, r_a = gram_qr(a32)
    q_b, r_b = gram_qr(b32.T)
  elif method == "householder":
    q_a, r_a = jnp.linalg.qr(a32, mode="reduced")
    q_b, r_b = jnp.linalg.qr(b32.T, mode="reduced")
  else:
    raise ValueError(f"unknown basis method {method!r}; choose 'gram' or 'householder'")
  u, s, vt = jnp.linalg.svd(scale * (r_a @ r_b.T), full_matrices=False)
  qa = q_a @ u
  qb = q_b @ vt.T
  half = s / (2.0 * scale)
  a_new = qa * half[None, :]
  b_new = half[:, None] * qb.T
  # Where S > 0, orth(a_new) = qa (the QR of qa diag(c) with c > 0 is unique), so
  # the bases below equal qa, qb up to rounding. Where the warm-up left a
  # direction at zero, the column of a_new / row of b_new is zero and any
  # orthonormal completion preserves the update; taking the package's
  # orthonormal_basis makes the bases exactly what a refresh would compute.
  # Everything stays in float32 up to here; low-precision factors are rounded
  # once, below, and the bases are those of the unrounded float32 factors.
  qa, qb = factor_bases(a_new, b_new, method=method)
  return a_new.astype(jnp.asarray(a).dtype), b_new.astype(jnp.asarray(b).dtype), qa, qb
