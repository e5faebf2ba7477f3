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
``s G qb`` come from the same residuals. Whether the bases are fresh is static:
``warmup_sds_matmul(..., fresh=True)`` (what an adapter with ``fresh_bases`` uses)
and ``sds_matmul`` without bases run this rank-r op; given bases that may lag the
factors (a sparser refresh schedule, bases set by hand) run the exact two-branch op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.basis import factor_bases

__all__ = ["lora_delta", "lora_matmul", "sds_delta", "sds_matmul", "warmup_sds_matmul"]

_F32 = jnp.float32

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
  y = (scale * _up_projection(xa, b, dt)).astype(dt)
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

  ``y = scale * ((x @ qa) @ b + (x @ a) @ qb.T)``; with ``qa`` derived from
  ``a`` this is ``scale * (x @ qa) @ (b + (qa.T a) qb.T)``, computed so (rank
  r). The backward pass gives
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
  derived = qa is None  # qa = orth(a): a = qa (qa.T a), the rank-r op is exact
  qa, qb = _bases_or_derive(a, b, qa, qb)
  return _sds_or_warmup(x, a, b, qa, qb, jnp.ones((), _F32), scale, derived)


def warmup_sds_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    qa: jax.Array,
    qb: jax.Array,
    sds_on: jax.Array,
    *,
    scale: float,
    fresh: bool = False,
) -> jax.Array:
  """Plain LoRA while ``sds_on == 0``, SDS-LoRA once ``sds_on == 1``: one function.

  The phase is data, so a single compiled training step serves the plain-LoRA
  warm-up and the SDS-LoRA phase. ``sds_on`` is a float32 scalar (0. or 1.)
  and receives no gradient; the bases must be given (during warm-up their
  values are ignored).

  ``fresh`` (static) promises that whenever ``sds_on == 1`` the bases span the
  factors (``a == qa qa.T a``), as they do when ``sds_lora`` refreshes them
  after every update (its default). Both phases then run as one rank-r op
  (``y = s (x @ left) @ m``): LoRA is ``(left, m) = (a, b)``, SDS-LoRA is
  ``(qa, b + (qa.T a) qb.T)``. With ``fresh=False`` (bases that may lag the
  factors) both phases run the exact two-branch op, ``r`` wider each way.
  With ``fresh=True`` and bases that do not span ``a``, the result is that of
  ``a`` projected onto the bases: the promise is the caller's.
  """
  _checks.check_factors(
      jnp.shape(a), jnp.shape(b), qa=jnp.shape(qa), qb=jnp.shape(qb), x=jnp.shape(x)
  )
  if jnp.ndim(sds_on) != 0:
    raise ValueError(f"sds_on must be a scalar, got shape {jnp.shape(sds_on)}")
  _checks.check_float_arrays(x=x, a=a, b=b, qa=qa, qb=qb)
  scale = _checks.check_scale(scale)
  return _sds_or_warmup(x, a, b, qa, qb, sds_on, scale, bool(fresh))


def warmup_sds_delta(
    a: jax.Array,
    b: jax.Array,
    qa: jax.Array,
    qb: jax.Array,
    sds_on: jax.Array,
    *,
    scale: float,
    fresh: bool = False,
) -> jax.Array:
  """The dense ``(d_in, d_out)`` update that ``warmup_sds_matmul`` applies, in float32.

  One product of the op's own operands: ``s left @ m`` for ``fresh=True`` (so the
  bases are taken to span ``a`` in the SDS phase, as the op takes them), else the
  two-branch ``s coef [left, a] @ [b; right.T]``. For the forward value of a merged
  layer (``sdslora_jax.fused``), whose gradients come from the op's custom VJP: this
  function's own autodiff is not SDS-LoRA's gradient (``sds_delta`` is).
  """
  hi = jax.lax.Precision.HIGHEST
  operands = _phase_operands(a, b, qa, qb, sds_on, fresh)
  if fresh:
    left, m, _ = operands
    return scale * jnp.matmul(left, m, precision=hi)
  left, right, coef = operands
  a32, b32 = jnp.asarray(a, _F32), jnp.asarray(b, _F32)
  both = jnp.matmul(jnp.concatenate([left, a32], axis=1),
                    jnp.concatenate([b32, right.T], axis=0), precision=hi)
  return (coef * scale) * both


def in_sds_phase(sds_on: jax.Array) -> jax.Array:
  """The phase switch, written once: ``True`` where ``sds_on`` marks the SDS-LoRA phase.

  ``sds_on`` is 0. during the plain-LoRA warm-up and 1. after the switch (any
  shape: a stacked adapter has one flag per layer). No gradient flows into it.
  """
  return jax.lax.stop_gradient(jnp.asarray(sds_on, _F32)) > 0.5


def _sds_or_warmup(x, a, b, qa, qb, sds_on, scale, fresh):
  """The SDS-LoRA op for data ``sds_on``: LoRA during the warm-up, SDS-LoRA after.

  ``fresh`` (static) promises that the bases span the factors whenever ``sds_on``:
  one rank-r op then serves both phases. Otherwise the exact two-branch op runs.
  """
  if fresh:
    return _rank_r_matmul(x, a, b, *_phase_operands(a, b, qa, qb, sds_on, True), scale)
  return _two_branch_matmul(x, a, b, *_phase_operands(a, b, qa, qb, sds_on, False), scale)


def _phase_operands(a, b, qa, qb, sds_on, fresh):
  """The phase switch's operands, written once (constants of the ops' custom VJPs).

  ``fresh``: ``(left, m, right)`` of the rank-r op, LoRA ``(a, b, b.T)``, fresh SDS-LoRA
  ``(qa, b + (qa.T a) qb.T, qb)``. Otherwise ``(left, right, coef)`` of the two-branch
  op, LoRA ``(a, b.T, 1/2)``, SDS-LoRA ``(qa, qb, 1)``. Float32, no gradient.
  """
  on = in_sds_phase(sds_on)
  qa, qb = (jax.lax.stop_gradient(jnp.asarray(v, _F32)) for v in (qa, qb))
  a32, b32 = (jax.lax.stop_gradient(jnp.asarray(v, _F32)) for v in (a, b))
  left, right = jnp.where(on, qa, a32), jnp.where(on, qb, b32.T)
  if not fresh:
    return left, right, jnp.where(on, 1.0, 0.5).astype(_F32)
  # O(d r^2) work at full float32 precision (TPUs would otherwise round the products to
  # bfloat16 passes): m is part of the exact reparameterisation.
  hi = jax.lax.Precision.HIGHEST
  m = jnp.where(on, b32 + jnp.matmul(jnp.matmul(qa.T, a32, precision=hi), qb.T, precision=hi),
                b32)
  return left, m, right


def _mm(lhs, rhs, dtype):
  """Matmul in ``dtype`` with float32 accumulation."""
  return jnp.matmul(lhs.astype(dtype), rhs.astype(dtype), preferred_element_type=_F32)


def _up_projection(x_proj, m, dtype):
  """``x_proj @ m`` (``(..., k) @ (k, d_out)``, ``k`` = r or 2r): the adapter's output.

  Written as a ``dot_general`` with a batch axis of size 1, which XLA removes (the same
  kernel runs). Remat policies that save weight matmuls,
  ``dots_with_no_batch_dims_saveable`` (JAX's "useful heuristic for transformers"), then
  keep the rank-r ``x_proj`` and recompute this activation-sized output from it
  (``2 T k d_out`` flops) instead of saving one more activation per adapted layer.
  """
  lhs = x_proj.astype(dtype)[None]
  rhs = m.astype(dtype)[None]
  y = jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (1,)), ((0,), (0,))),
                          preferred_element_type=_F32)
  return y[0]


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
  y = _up_projection(x_proj, jnp.concatenate([b.astype(dt), right.T.astype(dt)], axis=0), dt)
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


# The rank-r op: ``y = s (x @ left) @ m``. Backward: ``dL/db = s (x left).T g``,
# ``dL/da = s x.T (g right)``, ``dL/dx = s (g m.T) left.T``, zero for the constants left, m
# and right. Residuals: x and the rank-r ``x @ left``. Fresh SDS-LoRA (``a = qa R``) is
# ``(left, m, right) = (qa, b + R qb.T, qb)``; LoRA is ``(a, b, b.T)``.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _rank_r_matmul(x, a, b, left, m, right, scale):
  y, _ = _rank_r_fwd(x, a, b, left, m, right, scale)
  return y


def _rank_r_fwd(x, a, b, left, m, right, scale):
  dt = x.dtype
  x_left = _mm(x, left, dt).astype(dt)  # (..., r)
  y = (scale * _up_projection(x_left, m, dt)).astype(dt)
  return y, (x, x_left, a, b, left, m, right)


def _rank_r_bwd(scale, residuals, g):
  x, x_left, a, b, left, m, right = residuals
  dt = x.dtype
  r = left.shape[1]
  g_proj = _mm(g, jnp.concatenate([m.T.astype(dt), right.astype(dt)], axis=1), dt)  # (..., 2r)
  d_b = scale * _contract_batch(x_left, g, dt)  # (r, d_out) = s left.T G
  d_a = scale * _contract_batch(x, g_proj[..., r:], dt)  # (d_in, r) = s G right
  d_x = scale * _mm(g_proj[..., :r], left.T, dt)
  return _cotangents(x, a, b, d_x, d_a, d_b, left, m, right)


_rank_r_matmul.defvjp(_rank_r_fwd, _rank_r_bwd)
