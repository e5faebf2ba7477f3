"""A refresh that keeps the adapted function: the rank-r retraction of an SDS-LoRA step.

The default refresh recomputes the bases from the updated factors,
``qa = orth(a)``, ``qb = orth(b.T)``, and keeps the factors. It changes the
adapted function: ``s (qa b + a qb.T)`` depends on which orthonormal basis
``qa`` is, not only on its span, and the gradient never saw that change. The
project measured it at about the size of the optimizer step itself (README,
"What the switch does to the adapters").

``retract`` moves to the rank-r update closest to the one the step produced,
with the least change to bases and factors:

1. After a step the update is ``U = s (qa b + a qb.T) = s [qa, a] [b; qb.T]``
   (rank <= 2r). Thin QRs ``[qa, a] = Qa Ka`` and ``[qb, b.T] = Qb Kb`` and an
   SVD of the ``2r x 2r`` core give its best rank-r approximation
   ``s Na diag(S) Nb.T`` (Eckart-Young), without forming a ``d_in x d_out``
   matrix.
2. New bases: the orthonormal bases of ``span(Na)``, ``span(Nb)`` closest to
   the previous ones (orthogonal Procrustes): ``qa' = Na polar(Na.T qa)``,
   likewise ``qb'``. The update in these bases is ``s qa' C qb'.T`` with
   ``C = Oa.T diag(S) Ob``.
3. New factors ``a' = qa' X``, ``b' = Y qb'.T`` with ``X + Y = C`` (so the
   update is exactly the rank-r approximation), ``X, Y`` the split closest to
   the factors the optimizer left (least squares): ``X = (C + qa'.T a -
   b qb') / 2``, ``Y = C - X``.

When the step leaves the update at rank r inside the old subspaces, steps 1-3
give back the factors and bases unchanged; in general the function changes only
by the discarded singular values, second order in the step (the step lies in
the tangent space of the rank-r matrices at the previous update). The factors
span the bases (``a' = qa' qa'.T a'``), which is what the rank-r op of an
adapter with fresh bases needs; unlike the default they need not satisfy
``qa' = orth(a')``: the bases come from the update, not from the factors.

The tall matrices are touched only by the QRs and by right-multiplications
with ``2r x r`` or ``r x r`` matrices, so with ``method="gram"`` a sharded
factor is never gathered. No Flax import here: this is part of the functional
core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdslora_jax import _linalg
from sdslora_jax.reparam import thin_qr

__all__: list[str] = []  # internal: used by sds_lora(refresh_rule="retract")

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def _mm(x, y):
  return jnp.matmul(x, y, precision=_HI)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def _polar(z: jax.Array) -> jax.Array:
  """The orthogonal factor of ``z`` (``r x r``): the ``O`` minimising ``||O - z||``."""
  u, _, vt = _linalg.map_matrices(lambda m: jnp.linalg.svd(m, full_matrices=False), z)
  return _mm(u, vt)


def retract(
    a: jax.Array, b: jax.Array, qa: jax.Array, qb: jax.Array, *, method: str = "gram"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Steps 1-3 of the module docstring, batched over leading axes, in float32.

  Args:
    a: ``(..., d_in, r)`` factor after the optimizer step.
    b: ``(..., r, d_out)`` factor after the optimizer step.
    qa: ``(..., d_in, r)`` the bases the step was taken with.
    qb: ``(..., d_out, r)``.
    method: the thin QR, ``"gram"`` (no gather of a sharded factor) or
      ``"householder"``.

  Returns:
    ``(a', b', qa', qb')``, float32: ``qa' b' + a' qb'.T`` is the best rank-r
    approximation of ``qa b + a qb.T`` (the adapter scale cancels).
  """
  a, b, qa, qb = (jnp.asarray(x, _F32) for x in (a, b, qa, qb))
  r = a.shape[-1]
  qa_big, ka = thin_qr(jnp.concatenate([qa, a], axis=-1), method)  # [qa, a] = Qa Ka
  qb_big, kb = thin_qr(jnp.concatenate([qb, _t(b)], axis=-1), method)  # [qb, b.T] = Qb Kb
  # qa b + a qb.T = Qa (Ka[:, :r] Kb[:, r:].T + Ka[:, r:] Kb[:, :r].T) Qb.T
  core = _mm(ka[..., :r], _t(kb[..., r:])) + _mm(ka[..., r:], _t(kb[..., :r]))
  u, s, vt = _linalg.map_matrices(lambda m: jnp.linalg.svd(m, full_matrices=False), core)
  ur, vr = u[..., :r], _t(vt)[..., :r]
  # Procrustes: Na.T qa = Ur.T Qa.T qa = Ur.T Ka[:, :r] (qa is the first block of [qa, a]).
  oa = _polar(_mm(_t(ur), ka[..., :r]))
  ob = _polar(_mm(_t(vr), kb[..., :r]))
  wa, wb = _mm(ur, oa), _mm(vr, ob)  # qa' = Qa wa, qb' = Qb wb
  c = _mm(_t(oa) * s[..., None, :r], ob)  # Oa.T diag(S) Ob
  xa = _mm(_t(wa), ka[..., r:])  # qa'.T a
  yb = _t(_mm(_t(wb), kb[..., r:]))  # b qb'
  x = 0.5 * (c + xa - yb)
  y = c - x
  qa_new, qb_new = _mm(qa_big, wa), _mm(qb_big, wb)
  return _mm(qa_new, x), _mm(y, _t(qb_new)), qa_new, qb_new
