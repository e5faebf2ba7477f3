"""Spectral diagnostics of adapter factors and gradients, to probe the SDS-LoRA claims.

SDS-LoRA (Oh, Baik & Lee, arXiv 2606.16454) claims that LoRA's factor gradients,
``g_a = s G b.T`` and ``g_b = s a.T G`` (``G = dL/dK``, the full fine-tuning
gradient of the kernel), are anisotropically scaled by the singular values of
the other factor, which lowers their effective rank and their alignment with
``G``; SDS-LoRA's gradients, ``g_a = s G qb`` and ``g_b = s qa.T G``, go through
orthonormal bases and remove this. The metrics here measure both effects:

* ``effective_rank(m)``: ``exp`` of the Shannon entropy of the normalised
  singular values (Roy & Vetterli 2007); ``k`` for ``k`` equal singular values,
  close to 1 when one dominates. A lower effective rank of ``g_a``, ``g_b``
  under LoRA than under SDS-LoRA is the anisotropy the paper describes.
* ``condition_number(m)``: ``s_max / s_min``. For the factors it is how
  unevenly LoRA rescales the other factor's gradient (``g_b = s a.T G`` has the
  singular values of ``a`` folded in); for the gradients, how uneven the result is.
* ``stable_rank(m)``: ``||m||_F^2 / ||m||_2^2``, a smooth lower bound of the rank.
* ``update_alignment`` / ``update_alignment_from_activations``: the cosine
  between ``G`` and the kernel update direction that one gradient step on the
  factors induces to first order, ``D_lora = G b.T b + a a.T G`` (LoRA, and
  SDS adapters in their warm-up, ``sds_on == 0``) or ``D_sds = qa qa.T G + G qb
  qb.T`` (SDS-LoRA). Full fine-tuning has cosine 1; the paper's claim is that
  LoRA's is lowered by the factors' singular values and SDS-LoRA's is not.

Costs: ``factor_diagnostics`` runs four thin SVDs (``jnp.linalg.svd`` with
``compute_uv=False``, on the ``(d_in, r)`` and ``(r, d_out)`` factors and
gradients, in float32), ``O((d_in + d_out) r^2)``: cheap enough for every step.
``update_alignment`` is the opt-in kernel-sized path: it needs the dense ``G``
(``(d_in, d_out)`` memory) and costs ``O(d_in d_out r)``, though it never forms
``D``. ``update_alignment_from_activations`` never forms ``G`` either: from ``T``
rows of layer inputs and output cotangents it costs ``O(T^2 (d_in + d_out) + T r
(d_in + d_out))`` with two ``T x T`` Gram matrices in memory, so it is the
cheaper path when ``T^2 < d_in d_out``.

All functions are pure and jit-able; shapes and static metadata are checked in
Python (``ValueError``) before anything is computed. Matmuls run in float32 at
``Precision.HIGHEST`` (no TF32 on GPUs) and every result is a float32 scalar.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.adapter import Adapter, is_adapter, layer_view
from sdslora_jax.basis import orthonormal_basis
from sdslora_jax.ops import in_sds_phase
from sdslora_jax.targets import path_str

__all__ = [
    "tree_diagnostics",
    "tree_step_metrics",
    "update_alignment",
    "update_alignment_from_activations",
]

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST

FACTOR_METRICS = (
    "grad_a_effective_rank",
    "grad_b_effective_rank",
    "grad_a_condition",
    "grad_b_condition",
    "a_condition",
    "b_condition",
    "a_stable_rank",
    "b_stable_rank",
)


def _mm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return jnp.matmul(lhs, rhs, precision=_HIGHEST)


def _singular_values(m: jax.Array, name: str = "m") -> jax.Array:
  """Singular values of a 2-D matrix (thin SVD in float32, descending)."""
  shape = tuple(jnp.shape(m))
  if len(shape) != 2:
    raise ValueError(f"{name} must be a 2-D matrix, got shape {shape}")
  if 0 in shape:
    raise ValueError(f"{name} must be non-empty, got shape {shape}")
  _checks.check_float_arrays(**{name: m})
  return jnp.linalg.svd(jnp.asarray(m, _F32), compute_uv=False)


def _effective_rank(s: jax.Array) -> jax.Array:
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return jnp.where(total > 0, jnp.exp(-jnp.sum(plogp)), 0.0).astype(_F32)


def _condition(s: jax.Array) -> jax.Array:
  s_max, s_min = s[0], s[-1]
  return jnp.where(s_min > 0, s_max / jnp.where(s_min > 0, s_min, 1.0), jnp.inf).astype(_F32)


def _stable_rank(s: jax.Array) -> jax.Array:
  top = s[0] ** 2
  return jnp.where(top > 0, jnp.sum(s**2) / jnp.where(top > 0, top, 1.0), 0.0).astype(_F32)


def effective_rank(m: jax.Array) -> jax.Array:
  """Effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j`` (Roy & Vetterli 2007).

  Args:
    m: a non-empty 2-D matrix, any float dtype.

  Returns:
    A float32 scalar in ``[1, min(m.shape)]``; 0 for an all-zero matrix.
  """
  return _effective_rank(_singular_values(m))


def condition_number(m: jax.Array) -> jax.Array:
  """``s_max / s_min`` over the ``min(m.shape)`` singular values of the thin SVD.

  Returns:
    A float32 scalar; ``inf`` when ``s_min == 0`` (an all-zero matrix included).
  """
  return _condition(_singular_values(m))


def stable_rank(m: jax.Array) -> jax.Array:
  """Stable rank ``||m||_F^2 / ||m||_2^2`` as a float32 scalar (0 for an all-zero matrix)."""
  return _stable_rank(_singular_values(m))


def _check_adapter(adapter: Any, name: str = "adapter") -> Adapter:
  """Validates one unstacked adapter; returns its per-layer view."""
  if not is_adapter(adapter):
    raise ValueError(f"{name} must be a sdslora_jax.Adapter, got {type(adapter).__name__}")
  if jnp.ndim(adapter.a) != 2 or jnp.ndim(adapter.b) != 2:
    raise ValueError(
        f"{name} is stacked (factors a {tuple(jnp.shape(adapter.a))}, b "
        f"{tuple(jnp.shape(adapter.b))}); diagnostics take one layer's 2-D adapter: slice "
        "stacked adapters with sdslora_jax.adapter.take_layer(adapter, index) first"
    )
  _checks.check_factors(
      jnp.shape(adapter.a),
      jnp.shape(adapter.b),
      qa=None if adapter.qa is None else jnp.shape(adapter.qa),
      qb=None if adapter.qb is None else jnp.shape(adapter.qb),
  )
  if adapter.method == "sds":
    if adapter.qa is None or adapter.qb is None or adapter.sds_on is None:
      raise ValueError(f"{name} has method 'sds' but lacks qa, qb or sds_on")
    if jnp.ndim(adapter.sds_on) != 0:
      raise ValueError(f"{name}.sds_on must be a scalar, got shape {jnp.shape(adapter.sds_on)}")
  return layer_view(adapter)


def factor_diagnostics(adapter: Adapter, grads: Adapter) -> dict[str, jax.Array]:
  """Spectral metrics of one adapter's factors and of their gradients.

  Args:
    adapter: a 2-D (unstacked) ``Adapter``.
    grads: its gradient, as ``jax.grad`` returns it (an ``Adapter`` whose ``a``
      and ``b`` hold ``dL/da`` and ``dL/db``; other fields are ignored).

  Returns:
    Float32 scalars keyed by ``FACTOR_METRICS``: effective rank and condition
    number of ``grads.a`` and ``grads.b``, condition number and stable rank of
    ``a`` and ``b``. Singular values come from ``jnp.linalg.svd(...,
    compute_uv=False)`` of the thin matrices (not from their Gram matrices, which
    would square the condition number), ``O((d_in + d_out) r^2)``.

  Raises:
    ValueError: a stacked adapter, or gradients whose shapes differ from the factors'.
  """
  adapter = _check_adapter(adapter)
  g_a, g_b = getattr(grads, "a", None), getattr(grads, "b", None)
  if g_a is None or g_b is None:
    raise ValueError(
        f"grads must have the adapter's structure (fields a and b), got {type(grads).__name__}")
  for field, g, f in (("a", g_a, adapter.a), ("b", g_b, adapter.b)):
    if tuple(jnp.shape(g)) != tuple(jnp.shape(f)):
      raise ValueError(
          f"grads.{field} has shape {tuple(jnp.shape(g))}, but the adapter's {field} has shape "
          f"{tuple(jnp.shape(f))}; stacked gradients must be sliced with sdslora_jax.adapter.take_layer "
          "like their adapter"
      )
  s_ga = _singular_values(g_a, "grads.a")
  s_gb = _singular_values(g_b, "grads.b")
  s_a = _singular_values(adapter.a, "a")
  s_b = _singular_values(adapter.b, "b")
  return {
      "grad_a_effective_rank": _effective_rank(s_ga),
      "grad_b_effective_rank": _effective_rank(s_gb),
      "grad_a_condition": _condition(s_ga),
      "grad_b_condition": _condition(s_gb),
      "a_condition": _condition(s_a),
      "b_condition": _condition(s_b),
      "a_stable_rank": _stable_rank(s_a),
      "b_stable_rank": _stable_rank(s_b),
  }


def _direction_factors(adapter: Adapter) -> tuple[jax.Array, jax.Array]:
  """``(left, right)`` with ``D = left left.T G + G right right.T``, both ``(d, r)`` float32.

  LoRA: ``(a, b.T)``; SDS-LoRA: ``(qa, qb)``, chosen by ``sds_on`` as data.
  """
  a = jnp.asarray(adapter.a, _F32)
  bt = jnp.asarray(adapter.b, _F32).T
  if adapter.method == "lora":
    return a, bt
  on = in_sds_phase(adapter.sds_on)
  return (jnp.where(on, jnp.asarray(adapter.qa, _F32), a),
          jnp.where(on, jnp.asarray(adapter.qb, _F32), bt))


def _cosine(g_norm2, left, right, p, q, m):
  """cos(G, D) for ``D = left left.T G + G right right.T`` from rank-r pieces.

  ``p = G right`` ``(d_in, r)``, ``q = left.T G`` ``(r, d_out)``, ``m = left.T G
  right`` ``(r, r)``. Then ``<G, D> = ||p||^2 + ||q||^2`` and ``||D||^2 =
  tr((p.T p)(right.T right)) + tr((left.T left)(q q.T)) + 2 ||m||^2``.
  """
  inner = jnp.sum(p * p) + jnp.sum(q * q)
  d_norm2 = (jnp.sum(_mm(p.T, p) * _mm(right.T, right))
             + jnp.sum(_mm(left.T, left) * _mm(q, q.T))
             + 2.0 * jnp.sum(m * m))
  denom = jnp.sqrt(jnp.maximum(g_norm2, 0.0)) * jnp.sqrt(jnp.maximum(d_norm2, 0.0))
  return jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1.0), 0.0).astype(_F32)


def _flat_kernel_grad(adapter: Adapter, kernel_grad: jax.Array) -> jax.Array:
  shape = tuple(jnp.shape(kernel_grad))
  if shape == adapter.shape:
    return kernel_grad
  if shape == adapter.kernel_shape:
    perm = adapter.in_axes + adapter.output_axes
    return jnp.reshape(jnp.transpose(kernel_grad, perm), adapter.shape)
  expected = f"{adapter.shape}"
  if adapter.kernel_shape != adapter.shape:
    expected += f" (or the kernel's own shape {adapter.kernel_shape})"
  raise ValueError(
      f"kernel_grad has shape {shape}, but the adapter (a {tuple(jnp.shape(adapter.a))}, b "
      f"{tuple(jnp.shape(adapter.b))}) needs a kernel gradient of shape {expected}"
  )


def update_alignment(adapter: Adapter, kernel_grad: jax.Array) -> jax.Array:
  """Cosine between ``G`` and the kernel update direction the adapter's gradient step induces.

  The opt-in kernel-sized path: ``G`` is given densely. The direction is
  ``D_lora = G b.T b + a a.T G`` (LoRA, or an SDS adapter with ``sds_on == 0``)
  or ``D_sds = qa qa.T G + G qb qb.T`` (``sds_on == 1``, chosen with
  ``jnp.where``, so one compiled function serves both phases). ``D`` is never
  formed: ``<G, D>`` and ``||D||_F`` come from ``G right`` ``(d_in, r)``,
  ``left.T G`` ``(r, d_out)`` and ``r x r`` products; cost ``O(d_in d_out r)``.

  Args:
    adapter: a 2-D (unstacked) ``Adapter``.
    kernel_grad: ``G = dL/dK``, ``(d_in, d_out)`` (or, for a kernel with more
      than two axes, the kernel's own shape, flattened like the adapter's update).

  Returns:
    A float32 scalar in ``[-1, 1]`` (in fact ``>= 0``, since ``<G, D> >= 0``); 0
    when ``G`` or ``D`` is zero.

  Raises:
    ValueError: a stacked adapter, or a ``kernel_grad`` of the wrong shape.
  """
  adapter = _check_adapter(adapter)
  _checks.check_float_arrays(kernel_grad=kernel_grad)
  g = jnp.asarray(_flat_kernel_grad(adapter, kernel_grad), _F32)
  left, right = _direction_factors(adapter)
  p = _mm(g, right)
  q = _mm(left.T, g)
  return _cosine(jnp.sum(g * g), left, right, p, q, _mm(left.T, p))


def update_alignment_from_activations(
    adapter: Adapter, x: jax.Array, g: jax.Array
) -> jax.Array:
  """``update_alignment(adapter, x.T @ g)`` without forming the kernel gradient.

  ``G = x.T g`` over the ``T`` flattened rows of the layer's inputs and output
  cotangents. ``||G||_F^2 = sum((x x.T) * (g g.T))`` uses two ``T x T`` Gram
  matrices; ``G right = x.T (g right)``, ``left.T G = (x left).T g`` and
  ``left.T G right`` use rank-r projections. Cost ``O(T^2 (d_in + d_out) + T r
  (d_in + d_out))``, memory ``O(T^2 + T r + (d_in + d_out) r)``.

  Args:
    adapter: a 2-D (unstacked) ``Adapter``.
    x: the layer's inputs ``(..., d_in)``.
    g: the cotangents of its outputs ``(..., d_out)``, same leading axes as ``x``.

  Returns:
    A float32 scalar, as ``update_alignment``.

  Raises:
    ValueError: a stacked adapter, or ``x``, ``g`` whose shapes do not match the
      adapter or each other.
  """
  adapter = _check_adapter(adapter)
  d_in, d_out = adapter.shape
  x_shape, g_shape = tuple(jnp.shape(x)), tuple(jnp.shape(g))
  if len(x_shape) < 2 or x_shape[-1] != d_in:
    raise ValueError(
        f"x has shape {x_shape}; it must be (..., d_in) with at least one leading axis and "
        f"d_in={d_in}")
  if len(g_shape) < 2 or g_shape[-1] != d_out:
    raise ValueError(
        f"g has shape {g_shape}; it must be (..., d_out) with at least one leading axis and "
        f"d_out={d_out}")
  if x_shape[:-1] != g_shape[:-1]:
    raise ValueError(f"x {x_shape} and g {g_shape} must have the same leading axes")
  _checks.check_float_arrays(x=x, g=g)
  x2 = jnp.reshape(jnp.asarray(x, _F32), (-1, d_in))
  g2 = jnp.reshape(jnp.asarray(g, _F32), (-1, d_out))
  left, right = _direction_factors(adapter)
  g_norm2 = jnp.sum(_mm(x2, x2.T) * _mm(g2, g2.T))
  g_right = _mm(g2, right)  # (T, r)
  x_left = _mm(x2, left)  # (T, r)
  p = _mm(x2.T, g_right)  # (d_in, r) = G right
  q = _mm(x_left.T, g2)  # (r, d_out) = left.T G
  m = _mm(x_left.T, g_right)  # (r, r) = left.T G right
  return _cosine(g_norm2, left, right, p, q, m)


def tree_diagnostics(adapters: Any, grads: Any) -> dict[str, jax.Array]:
  """``factor_diagnostics`` of every 2-D adapter of a tree, as one flat dict of metrics.

  Keys are ``"<path>/<metric>"`` with the "/"-joined key path of the adapter
  (just ``"<metric>"`` for an adapter at the root), static strings, so the dict
  can be returned as metrics from a jitted training step. Stacked adapters
  (``a.ndim > 2``) are skipped: slice them with ``sdslora_jax.adapter.take_layer`` and
  call ``factor_diagnostics``.

  Args:
    adapters: a pytree holding ``Adapter`` nodes (other leaves are ignored).
    grads: its gradient (``jax.grad`` with respect to ``adapters``), with an
      ``Adapter`` at every adapter's path.

  Raises:
    ValueError: an adapter without a gradient ``Adapter`` at the same path.
  """
  return _per_adapter(factor_diagnostics, adapters, grads, "grads", "adapters",
                      "; pass the gradient of the adapter tree itself (jax.grad with respect to it)")


def _per_adapter(fn, tree: Any, other: Any, other_name: str, tree_name: str,
                 hint: str = "") -> dict[str, jax.Array]:
  """``fn(adapter, its counterpart in other)`` for every 2-D adapter of ``tree``, flat."""
  found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)
  counterparts, _ = jax.tree_util.tree_flatten_with_path(other, is_leaf=is_adapter)
  by_path = {path_str(p): leaf for p, leaf in counterparts if is_adapter(leaf)}
  out: dict[str, jax.Array] = {}
  for key_path, leaf in found:
    if not is_adapter(leaf) or jnp.ndim(leaf.a) != 2:
      continue
    path = path_str(key_path)
    if path not in by_path:
      raise ValueError(f"{other_name} has no Adapter at {path!r}, where {tree_name} has one{hint}")
    prefix = f"{path}/" if path else ""
    for name, value in fn(leaf, by_path[path]).items():
      out[prefix + name] = value
  return out


# ------------------------------------------------------------------------------------------
# What one optimizer step did to an adapter: the factors' move, the subspaces' rotation,
# and, for SDS-LoRA, how much of the change of the layer's update came from the basis
# refresh rather than from the step itself.


def _factored_norm(u: jax.Array, v: jax.Array) -> jax.Array:
  """``||u @ v.T||_F`` from ``k x k`` Gram matrices (never the ``d_in x d_out`` product)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(_mm(u.T, u) * _mm(v.T, v)), 0.0))


def _largest_angle(x: jax.Array, y: jax.Array) -> jax.Array:
  """The largest principal angle (radians) between the column spans of ``x`` and ``y``."""
  qx = orthonormal_basis(x, method="householder")
  qy = orthonormal_basis(y, method="householder")
  cosines = jnp.linalg.svd(_mm(qx.T, qy), compute_uv=False)
  return jnp.arccos(jnp.clip(jnp.min(cosines), -1.0, 1.0))


def step_metrics(before: Adapter, after: Adapter) -> dict[str, jax.Array]:
  """How one optimizer update moved one adapter (``before`` -> ``after``).

  Metrics (float32 scalars):

  * ``a_norm``, ``b_norm``: Frobenius norms of the factors before the update;
    ``a_step``, ``b_step``: norms of the factors' changes. Adam moves each entry
    by about the learning rate, so ``a_step / a_norm`` is large for small factors.
  * ``a_angle``, ``b_angle``: the largest principal angle (radians) between the
    column spans of ``a`` and ``a'`` (rows of ``b`` and ``b'``): how far the
    subspaces, hence SDS-LoRA's bases, turned in this update.
  * ``step_change``: ``||dW_step||_F``, the change of the layer's update ``W``
    that the factor update makes with the bases held fixed (LoRA:
    ``s (a' b' - a b)``; SDS-LoRA: ``s (qa db + da qb.T)``).
  * ``refresh_change``: ``||dW_refresh||_F``, the change the basis refresh
    adds after it (``s ((qa' - qa) b' + a' (qb' - qb).T)``; 0 for LoRA and
    during the warm-up). The SDS gradient does not see this part: the bases are
    constants of the backward pass.
  * ``refresh_to_step``: their ratio.
  * ``switched``: 1 at the update that switches the adapter to SDS-LoRA, where
    ``step_change`` and ``refresh_change`` are NaN (the switch re-expresses the
    factors; the function is unchanged by it).

  Everything is computed from factor-sized arrays and ``r x r`` (``2r x 2r``)
  Gram matrices; no kernel-sized array is formed.
  """
  b4, af = _check_adapter(before, "before"), _check_adapter(after, "after")
  if (b4.method, b4.scale, b4.shape, b4.rank) != (af.method, af.scale, af.shape, af.rank):
    raise ValueError(
        f"before and after must be the same adapter at two steps, got method/scale/shape/rank "
        f"{(b4.method, b4.scale, b4.shape, b4.rank)} and {(af.method, af.scale, af.shape, af.rank)}")
  s = jnp.float32(b4.scale)
  a, b = jnp.asarray(b4.a, _F32), jnp.asarray(b4.b, _F32)
  a1, b1 = jnp.asarray(af.a, _F32), jnp.asarray(af.b, _F32)
  da, db = a1 - a, b1 - b
  out = {
      "a_norm": jnp.linalg.norm(a), "b_norm": jnp.linalg.norm(b),
      "a_step": jnp.linalg.norm(da), "b_step": jnp.linalg.norm(db),
      "a_angle": _largest_angle(a, a1), "b_angle": _largest_angle(b.T, b1.T),
  }
  # s (a' b' - a b) = s (da b' + a db)
  lora_change = _factored_norm(jnp.concatenate([da, a], 1), s * jnp.concatenate([b1.T, db.T], 1))
  if b4.method == "lora":
    step, refresh, switched = lora_change, jnp.float32(0.0), jnp.float32(0.0)
  else:
    qa, qb = jnp.asarray(b4.qa, _F32), jnp.asarray(b4.qb, _F32)
    qa1, qb1 = jnp.asarray(af.qa, _F32), jnp.asarray(af.qb, _F32)
    on0, on1 = in_sds_phase(b4.sds_on), in_sds_phase(af.sds_on)
    sds_step = _factored_norm(jnp.concatenate([qa, da], 1), s * jnp.concatenate([db.T, qb], 1))
    sds_refresh = _factored_norm(jnp.concatenate([qa1 - qa, a1], 1),
                                 s * jnp.concatenate([b1.T, qb1 - qb], 1))
    same = on0 == on1
    step = jnp.where(same, jnp.where(on0, sds_step, lora_change), jnp.nan)
    refresh = jnp.where(same, jnp.where(on0, sds_refresh, 0.0), jnp.nan)
    switched = (on1 & ~on0).astype(_F32)
  out.update(step_change=step, refresh_change=refresh, switched=switched,
             refresh_to_step=refresh / jnp.where(step > 0, step, jnp.nan))
  return {k: jnp.asarray(v, _F32) for k, v in out.items()}


def tree_step_metrics(before: Any, after: Any) -> dict[str, jax.Array]:
  """``step_metrics`` of every 2-D adapter of a tree, as one flat dict (keys as
  ``tree_diagnostics``). ``before`` is the tree an optimizer update started from,
  ``after`` the tree ``optax.apply_updates`` returned (copy ``before`` first when
  the step donates its arguments).
  """
  return _per_adapter(step_metrics, before, after, "after", "before")
