"""LoRA and SDS-LoRA as pure functions (Flax kernel orientation).

A Flax ``Dense`` computes ``y = x @ K`` with ``K`` of shape ``(d_in, d_out)``.
Adapter factors are ``a: (d_in, r)`` and ``b: (r, d_out)`` with scale ``s``.

* LoRA: ``dK = s * a @ b``. Its gradients, ``dL/da = s G b.T`` and
  ``dL/db = s a.T G`` (``G = dL/dK``), are scaled by the singular values of the
  other factor.
* SDS-LoRA (Oh, Baik & Lee, arXiv 2606.16454; the two-branch form is this
  project's reading of the paper): ``dK = s * (qa @ b + a @ qb.T)`` with
  ``qa = orth(a)``, ``qb = orth(b.T)`` treated as constants, so that
  ``dL/db = s qa.T G`` and ``dL/da = s G qb``: no singular value of either factor
  enters the backward pass.

``*_delta`` functions form the dense update (reference, merge and export path);
``*_matmul`` functions apply the update to activations through rank-r
projections and never form a ``(d_in, d_out)`` array. ``sds_matmul`` has a
``jax.custom_vjp`` whose residuals are ``x``, the rank-r projection ``x @ qa``,
the factors and the bases. ``warmup_sds_matmul`` switches between the two by a
data flag, so one compiled step serves the warm-up and the SDS phase.

Fresh bases. Right after the bases are computed from the factors (the default:
``sds_lora`` refreshes them after every update), ``a = qa R`` with ``R = qa.T a``
(``r x r``), so the update is ``s qa M`` with ``M = b + R qb.T``: rank r, one
``r``-wide projection of ``x`` (as LoRA), and the SDS gradients ``s qa.T G`` and
``s G qb`` come from the same residuals. The SDS ops check this as data, in
every call (``a - qa R`` against ``FRESH_TOL``, ``O(d r^2)``), and take that path
(``lax.cond``); with stale bases (between refreshes of a sparser schedule, or
bases given by hand) they run the exact two-branch op. The check and its
``lax.cond`` pay off from rank ``FAST_MIN_RANK`` on; below it the two-branch op
runs directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.basis import factor_bases

_F32 = jnp.float32

# ``a`` counts as lying in the span of ``qa`` when ``|a - qa qa.T a| <= FRESH_TOL |a|``
# (Frobenius norms, float32). Bases computed from the factors leave a float32 rounding
# residual (about 1e-6); one optimizer step moves a factor by far more than 1e-4 of its
# size. The fast path then differs from the two-branch op by at most this fraction of
# the adapter's output.
FRESH_TOL = 1e-4
# The rank-r path costs a ``lax.cond`` per call (the check decides at run time). Measured
# on a 2-core CPU (4-layer Dense stack, d = 1024, 2,048 tokens, SDS step / LoRA step):
# with the cond 1.155 / 1.131 at r = 8 / 16, against 1.100 / 1.077 for the two-branch op
# alone; at r = 32 / 64 the cond wins: 1.047 / 1.119 against 1.108 / 1.193. Below this
# rank the SDS ops run the two-branch op without the check.
FAST_MIN_RANK = 32


def lora_delta(a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
  """Dense LoRA update ``scale * a @ b`` of shape ``(d_in, d_out)``."""
  _checks.check_factors(jnp.shape(a), jnp.shape(b))
  _checks.check_float_arrays(a=a, b=b)
  scale = _checks.check_scale(scale)
  return scale * (a @ b)


def lora_matmul(x: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
  """``x @ lora_delta(a, b, scale=scale)`` computed as ``scale * (x @ a) @ b``.

  ``x`` may have any leading batch axes; the result has ``x``'s dtype. ``x``
  and the factors must have floating dtypes (``ValueError`` otherwise).

  The backward pass is written out (``jax.custom_vjp``; the same values as
  autodiff): residuals are ``x`` and ``x @ a`` only, and the factor gradients
  contract the flattened batch axes in one 2-D matmul each. Autodiff of the
  product over several batch axes gives dot-generals that XLA:CPU runs several
  times slower.
  """
  _checks.check_factors(jnp.shape(a), jnp.shape(b), x=jnp.shape(x))
  _checks.check_float_arrays(x=x, a=a, b=b)
  scale = _checks.check_scale(scale)
  return _lora_matmul(x, a, b, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_matmul(x, a, b, scale):
  y, _ = _lora_fwd(x, a, b, scale)
  return y


def _lora_fwd(x, a, b, scale):
  dt = x.dtype
  xa = _mm(x, a, dt).astype(dt)  # (..., r), in the compute dtype as autodiff would keep it
  y = (scale * _mm(xa, b, dt)).astype(dt)
  return y, (x, xa, a, b)


def _lora_bwd(scale, residuals, g):
  x, xa, a, b = residuals
  dt = x.dtype
  g_a = _mm(g, b.T, dt)  # (..., r) = g @ b.T
  d_b = scale * _contract_batch(xa, g, dt)  # (r, d_out) = s (x a).T g
  d_a = scale * _contract_batch(x, g_a, dt)  # (d_in, r) = s x.T g b.T
  d_x = scale * _mm(g_a, a.T, dt)
  return _cotangents(x, a, b, d_x, d_a, d_b)


_lora_matmul.defvjp(_lora_fwd, _lora_bwd)


def _bases_or_derive(a, b, qa, qb):
  """Returns float32 constant bases: the given ones, or derived from the factors."""
  if qa is None or qb is None:
    derived_qa, derived_qb = factor_bases(a, b)
    qa = derived_qa if qa is None else qa
    qb = derived_qb if qb is None else qb
  return (
      jax.lax.stop_gradient(jnp.asarray(qa, _F32)),
      jax.lax.stop_gradient(jnp.asarray(qb, _F32)),
  )


def sds_delta(
    a: jax.Array,
    b: jax.Array,
    *,
    scale: float,
    qa: jax.Array | None = None,
    qb: jax.Array | None = None,
) -> jax.Array:
  """Dense SDS-LoRA update ``scale * (qa @ b + a @ qb.T)``, shape ``(d_in, d_out)``.

  Bases default to ``orth(a)`` and ``orth(b.T)``; given or derived, they are
  constants (``stop_gradient``), so autodiff of this function gives the SDS
  gradients. Computed in float32.
  """
  _checks.check_factors(
      jnp.shape(a),
      jnp.shape(b),
      qa=None if qa is None else jnp.shape(qa),
      qb=None if qb is None else jnp.shape(qb),
  )
  _checks.check_float_arrays(a=a, b=b, qa=qa, qb=qb)
  scale = _checks.check_scale(scale)
  qa, qb = _bases_or_derive(a, b, qa, qb)
  return scale * (qa @ b.astype(_F32) + a.astype(_F32) @ qb.T)


def sds_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    scale: float,
    qa: jax.Array | None = None,
    qb: jax.Array | None = None,
) -> jax.Array:
  """``x @ sds_delta(a, b, ...)`` through rank-r projections, with SDS gradients.

  ``y = scale * ((x @ qa) @ b + (x @ a) @ qb.T)``. The backward pass gives
  ``dL/db = scale * (x @ qa).T g`` (= ``scale * qa.T G``),
  ``dL/da = scale * x.T (g @ qb)`` (= ``scale * G qb``) and no cotangent to the
  bases, without ever forming a ``(d_in, d_out)`` array.

  Args:
    x: activations ``(..., d_in)``, any float dtype.
    a: ``(d_in, r)`` down factor.
    b: ``(r, d_out)`` up factor.
    scale: the adapter scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)``).
    qa: optional ``(d_in, r)`` basis of ``a``'s columns; derived if ``None``.
    qb: optional ``(d_out, r)`` basis of ``b``'s rows; derived if ``None``.

  Returns:
    ``(..., d_out)`` in ``x``'s dtype. Matmuls run in ``x``'s dtype with float32
    accumulation; bases are kept in float32 and cast for the matmul.

  Raises:
    ValueError: mismatched shapes, or a non-floating dtype (integer, bool,
      complex) of ``x``, a factor or a basis.

  Warning:
    Without bases, ``b = 0`` (the usual LoRA initialisation) has no basis:
    ``orth(b.T)`` is an arbitrary completion, so ``(x @ a) @ qb.T`` is *not*
    zero and the update is not the zero update one might expect. Start from
    ``init_adapter(..., sds_on=True)`` (zero factors, random orthonormal bases)
    or from a plain-LoRA warm-up followed by ``activate_sds`` instead.
  """
  _checks.check_factors(
      jnp.shape(a),
      jnp.shape(b),
      qa=None if qa is None else jnp.shape(qa),
      qb=None if qb is None else jnp.shape(qb),
      x=jnp.shape(x),
  )
  _checks.check_float_arrays(x=x, a=a, b=b, qa=qa, qb=qb)
  scale = _checks.check_scale(scale)
  qa, qb = _bases_or_derive(a, b, qa, qb)
  return _sds_or_warmup(x, a, b, qa, qb, jnp.ones((), _F32), scale)


def warmup_sds_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    qa: jax.Array,
    qb: jax.Array,
    sds_on: jax.Array,
    *,
    scale: float,
) -> jax.Array:
  """Plain LoRA while ``sds_on == 0``, SDS-LoRA once ``sds_on == 1``: one function.

  The phase is data, so a single compiled training step serves the plain-LoRA
  warm-up and the SDS-LoRA phase. Both are one rank-r two-branch op: with
  ``(left, right) = (qa, qb)`` it is ``sds_matmul``; with ``(left, right) =
  (a, b.T)`` and the forward halved it is ``lora_matmul`` with LoRA's gradients.
  ``sds_on`` is a float32 scalar (0. or 1.) and receives no gradient; the bases
  must be given (during warm-up their values are ignored).
  """
  _checks.check_factors(
      jnp.shape(a), jnp.shape(b), qa=jnp.shape(qa), qb=jnp.shape(qb), x=jnp.shape(x)
  )
  if jnp.ndim(sds_on) != 0:
    raise ValueError(f"sds_on must be a scalar, got shape {jnp.shape(sds_on)}")
  _checks.check_float_arrays(x=x, a=a, b=b, qa=qa, qb=qb)
  scale = _checks.check_scale(scale)
  return _sds_or_warmup(x, a, b, qa, qb, sds_on, scale)


def fresh_bases(a: jax.Array, b: jax.Array, qa: jax.Array, qb: jax.Array):
  """``(fresh, m)``: whether ``a`` lies in the span of ``qa`` (up to ``FRESH_TOL``), and
  ``m = b + (qa.T a) qb.T`` in float32, so that ``qa @ m == qa @ b + a @ qb.T`` when
  fresh. Constants for differentiation."""
  qa, qb, a, b = (jax.lax.stop_gradient(jnp.asarray(v, _F32)) for v in (qa, qb, a, b))
  r_mat = qa.T @ a  # (r, r); a contraction over d_in: a sharded d_in gathers nothing
  resid = a - qa @ r_mat
  fresh = jnp.sum(resid * resid) <= FRESH_TOL**2 * jnp.sum(a * a)
  return fresh, b + r_mat @ qb.T


def _sds_or_warmup(x, a, b, qa, qb, sds_on, scale):
  """The SDS-LoRA op for data ``sds_on``: rank r with fresh bases, else two branches."""
  on = jax.lax.stop_gradient(jnp.asarray(sds_on, _F32)) > 0.5
  qa, qb = (jax.lax.stop_gradient(jnp.asarray(v, _F32)) for v in (qa, qb))

  def two_branch(x, a, b):
    left = jnp.where(on, qa, a.astype(_F32))
    right = jnp.where(on, qb, b.T.astype(_F32))
    coef = jnp.where(on, 1.0, 0.5).astype(_F32)
    return _two_branch_matmul(
        x, a, b, jax.lax.stop_gradient(left), jax.lax.stop_gradient(right), coef, scale
    )

  if a.shape[-1] < FAST_MIN_RANK:
    return two_branch(x, a, b)
  fresh, m = fresh_bases(a, b, qa, qb)

  def rank_r(x, a, b):
    return _fresh_sds_matmul(x, a, b, qa, qb, m, scale)

  return jax.lax.cond(on & fresh, rank_r, two_branch, x, a, b)


def _mm(lhs, rhs, dtype):
  """Matmul in ``dtype`` with float32 accumulation."""
  return jnp.matmul(lhs.astype(dtype), rhs.astype(dtype), preferred_element_type=_F32)


def _cotangents(x, a, b, d_x, d_a, d_b, *constants):
  """The cotangents of ``(x, a, b, *constants)`` in the primals' dtypes, zero for constants."""
  return (d_x.astype(x.dtype), d_a.astype(a.dtype), d_b.astype(b.dtype),
          *(jnp.zeros_like(c) for c in constants))


def _contract_batch(u, v, dtype):
  """``sum over leading axes of u[..., i] v[..., j]`` -> ``(i, j)``, f32 accumulation."""
  u2 = u.reshape(-1, u.shape[-1]).astype(dtype)
  v2 = v.reshape(-1, v.shape[-1]).astype(dtype)
  return jax.lax.dot_general(
      u2, v2, (((0,), (0,)), ((), ())), preferred_element_type=_F32
  )


# The two-branch op. Forward: ``y = coef * s * ((x @ left) @ b + (x @ a) @ right.T)``.
# Backward: ``dL/db = s * left.T G``, ``dL/da = s * G right`` (no ``coef``), the
# exact input cotangent of the forward, and zero for left, right and coef.
# SDS-LoRA is ``(left, right, coef) = (qa, qb, 1)``; LoRA is ``(a, b.T, 1/2)``.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _two_branch_matmul(x, a, b, left, right, coef, scale):
  y, _ = _two_branch_fwd(x, a, b, left, right, coef, scale)
  return y


def _two_branch_fwd(x, a, b, left, right, coef, scale):
  # Both branches as one matmul each way: x @ [left, a] -> [x_left, x_a], then
  # [x_left, x_a] @ [b; right.T]. One dot per side keeps XLA from materialising
  # an activation-sized temporary for the sum of two dots.
  dt = x.dtype
  r = a.shape[1]
  x_proj = _mm(x, jnp.concatenate([left.astype(dt), a.astype(dt)], axis=1), dt)  # (..., 2r)
  y = _mm(x_proj, jnp.concatenate([b.astype(dt), right.T.astype(dt)], axis=0), dt)
  y = (coef * scale * y).astype(dt)
  return y, (x, x_proj[..., :r], a, b, left, right, coef)


def _two_branch_bwd(scale, residuals, g):
  x, x_left, a, b, left, right, coef = residuals
  dt = x.dtype
  r = a.shape[1]
  # g_proj = [g @ b.T, g @ right]: (..., 2r)
  g_proj = _mm(g, jnp.concatenate([b.T.astype(dt), right.astype(dt)], axis=1), dt)
  g_right = g_proj[..., r:]
  d_b = scale * _contract_batch(x_left, g, dt)  # (r, d_out) = s left.T G
  d_a = scale * _contract_batch(x, g_right, dt)  # (d_in, r) = s G right
  d_x = _mm(g_proj, jnp.concatenate([left.T.astype(dt), a.T.astype(dt)], axis=0), dt)
  d_x = coef * scale * d_x
  return _cotangents(x, a, b, d_x, d_a, d_b, left, right, coef)


_two_branch_matmul.defvjp(_two_branch_fwd, _two_branch_bwd)


# SDS-LoRA with fresh bases (``a = qa R``): ``y = s (x @ qa) @ m``, ``m = b + R qb.T``.
# Backward: ``dL/db = s (x qa).T g``, ``dL/da = s x.T (g qb)``, ``dL/dx = s (g m.T) qa.T``,
# zero for the constants qa, qb and m. Residuals: x and the rank-r ``x @ qa``.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fresh_sds_matmul(x, a, b, qa, qb, m, scale):
  y, _ = _fresh_sds_fwd(x, a, b, qa, qb, m, scale)
  return y


def _fresh_sds_fwd(x, a, b, qa, qb, m, scale):
  dt = x.dtype
  x_qa = _mm(x, qa, dt).astype(dt)  # (..., r)
  y = (scale * _mm(x_qa, m, dt)).astype(dt)
  return y, (x, x_qa, a, b, qa, qb, m)


def _fresh_sds_bwd(scale, residuals, g):
  x, x_qa, a, b, qa, qb, m = residuals
  dt = x.dtype
  r = qa.shape[1]
  g_proj = _mm(g, jnp.concatenate([m.T.astype(dt), qb.astype(dt)], axis=1), dt)  # (..., 2r)
  d_b = scale * _contract_batch(x_qa, g, dt)  # (r, d_out) = s qa.T G
  d_a = scale * _contract_batch(x, g_proj[..., r:], dt)  # (d_in, r) = s G qb
  d_x = scale * _mm(g_proj[..., :r], qa.T, dt)
  return _cotangents(x, a, b, d_x, d_a, d_b, qa, qb, m)


_fresh_sds_matmul.defvjp(_fresh_sds_fwd, _fresh_sds_bwd)
