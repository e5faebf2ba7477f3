"""Adapters over a whole parameter tree: initialise, apply per kernel, merge.

The adapter tree is a nested dict that mirrors the branches of the parameter
tree holding targeted kernels, with an ``Adapter`` where a targeted kernel is::

  {"encoder": {"layer_0": {"attention": {"query": {"kernel": Adapter(...)}}}}}

It lives apart from the frozen base parameters (nothing of the base is copied),
so it is what an optimizer sees. ``merge`` folds the updates into ordinary
parameters; it is differentiable and, because ``matrix_delta`` keeps the bases
constant, autodiff through it gives the SDS-LoRA gradients: it is the dense
reference of the rank-r forward paths below.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import quantized
from sdslora_jax.adapter import (
    Adapter,
    adapter_matmul,
    guard,
    init_adapter,
    is_adapter,
    kernel_delta,
    layer_view,
)
from sdslora_jax.ops import in_sds_phase
from sdslora_jax.targets import (
    KernelLayout,
    Rule,
    Target,
    einsum_in_axes,
    parse_einsum,
    path_keys,
    path_str,
    select_targets,
)

__all__ = ["merge"]


def _set(tree: dict, keys: Sequence[Any], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def adapters_from_targets(
    key: jax.Array, targets: Sequence[Target], *, sds_on: bool = False
) -> dict:
  """Builds the adapter tree for already selected targets (LoRA initialisation)."""
  tree: dict = {}
  for i, t in enumerate(targets):
    r = t.rule

    def init(k, t=t, r=r):
      return init_adapter(
          k, t.layout.d_in, t.layout.d_out, rank=r.rank, scale=r.scale, method=r.method,
          dtype=r.dtype, sds_on=sds_on,
      )

    k = jax.random.fold_in(key, i)
    layers = t.layout.layer_shape
    if layers:  # one adapter per layer (layer j uses fold_in(k, j), j in row-major order)
      keys = jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(math.prod(layers)))
      ad = jax.vmap(init)(keys)
      ad = jax.tree.map(lambda x: x.reshape(layers + x.shape[1:]), ad)
    else:
      ad = init(k)
    ad = dataclasses.replace(
        ad, kernel_shape=t.layout.shape, in_axes=t.layout.in_axes, kind=t.layout.kind,
        layer_axes=t.layout.layer_axes, fresh_bases=r.fresh_bases,
    )
    _set(tree, t.keys, ad)
  return tree


def init_adapters(
    key: jax.Array,
    params: Any,
    rules: Sequence[Rule | tuple],
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
    sds_on: bool = False,
) -> dict:
  """Creates adapters for the kernels the rules select.

  Args:
    key: PRNG key; adapter ``i`` (in tree order) uses ``fold_in(key, i)``.
    params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    rules: ordered target rules (see ``sdslora_jax.targets``).
    layouts: known kernel layouts by "/"-joined path (the frontends pass the
      module types here).
    sds_on: start SDS-LoRA adapters in the SDS phase instead of the warm-up.

  Returns:
    The adapter tree. Every update is exactly zero (``b = 0``).
  """
  return adapters_from_targets(key, select_targets(params, rules, layouts=layouts), sds_on=sds_on)


def adapter_items(adapters: Any) -> list[tuple[tuple[Any, ...], Adapter]]:
  """``[(plain key path, Adapter), ...]`` in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter)
  out = []
  for kp, leaf in flat:
    if not is_adapter(leaf):
      raise TypeError(f"adapter tree holds a non-Adapter leaf at {path_str(kp)!r}: {leaf!r}")
    out.append((path_keys(kp), leaf))
  return out


def merge(params: Any, adapters: Any) -> Any:
  """Base parameters with every adapter's update folded into its kernel.

  Same tree, shapes and dtypes as ``params`` (the sum is formed in float32 and
  cast back). A quantized kernel (qwix's ``QArray`` or ``WithAux``) becomes its
  dequantized float value, in its scale's dtype, with the update added; to
  quantize the result again, pass it to your quantizer (``qwix.quantize_params``).
  Differentiable: gradients w.r.t. the adapters follow the SDS-LoRA
  rule (LoRA during the warm-up), which makes this the dense reference.

  Raises:
    ValueError: an adapter has no kernel at its path, or the shapes differ.
  """
  items = {k: ad for k, ad in adapter_items(adapters)}
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda z: quantized.stored(z) is not None)
  found = set()
  leaves = []
  for kp, leaf in flat:
    keys = path_keys(kp)
    ad = items.get(keys)
    if ad is None:
      leaves.append(leaf)
      continue
    found.add(keys)
    if quantized.stored(leaf) is not None:  # a quantized frozen kernel: merged dequantized
      leaf = quantized.value(leaf)
    if tuple(leaf.shape) != ad.kernel_shape:
      raise ValueError(
          f"adapter at {path_str(keys)!r} is for a kernel of shape {ad.kernel_shape}, but the "
          f"parameter there has shape {tuple(leaf.shape)}"
      )
    leaves.append((leaf.astype(jnp.float32) + kernel_delta(ad)).astype(leaf.dtype))
  missing = [path_str(k) for k in items if k not in found]
  if missing:
    raise ValueError(f"adapters at {missing} have no parameter at their path in the base tree")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_input(name: str, adapter: Adapter, got: tuple[int, ...], want: tuple[int, ...]):
  if got != want:
    raise ValueError(
        f"{name}: input axes of size {got} do not match the adapter's input side {want} "
        f"(kernel shape {adapter.kernel_shape}, in_axes {adapter.in_axes})"
    )


def _ones(v) -> bool:
  return v is None or all(int(x) == 1 for x in (v if isinstance(v, (tuple, list)) else (v,)))


def is_pointwise_conv(adapter: Adapter, module: Any) -> bool:
  """Whether a convolution is a plain matmul over channels (a 1x1 ``Conv``, stride 1).

  True for an adapter of kind ``"conv"`` whose kernel's spatial sizes are all 1, on a
  module (Linen ``nn.Conv`` or ``nnx.Conv``) with unit strides and dilations, no
  mask, and string padding (for a 1x1 kernel at stride 1 every padding mode gives the
  input's spatial shape). Such a convolution's update reaches the output as
  ``(x @ a) @ b`` over the channel axis: the rank-r path, no per-call merge.
  """
  if adapter.kind != "conv" or any(n != 1 for n in adapter.kernel_shape[:-2]):
    return False
  padding = getattr(module, "padding", "SAME")
  return (_ones(getattr(module, "strides", 1)) and _ones(getattr(module, "input_dilation", 1))
          and _ones(getattr(module, "kernel_dilation", 1))
          and getattr(module, "mask", None) is None and isinstance(padding, str)
          and getattr(module, "feature_group_count", 1) == 1)


def apply_pointwise_conv(x: jax.Array, adapter: Adapter) -> jax.Array:
  """The update's contribution to a 1x1 convolution of ``x`` (``(..., c_in)``): rank-r."""
  adapter = layer_view(adapter)
  _check_input("apply_pointwise_conv", adapter, (x.shape[-1],), (adapter.shape[0],))
  return adapter_matmul(x, adapter)


def apply_dense_general(x: jax.Array, adapter: Adapter, axis: Sequence[int] = (-1,)) -> jax.Array:
  """The update's contribution to ``dot_general(x, K)`` contracting ``axis`` of ``x``.

  ``axis`` (in order) must pair with the kernel's input axes (in kernel order),
  as in ``Dense`` / ``DenseGeneral``. The input axes are moved to the end and
  flattened, the rank-r ``adapter_matmul`` runs, and its output is unflattened
  to the kernel's output axes: no kernel-sized value is formed.

  Returns:
    ``(x's other axes..., kernel output axes...)`` in ``x``'s dtype.
  """
  adapter = layer_view(adapter)
  shape = adapter.kernel_shape
  in_axes, out_axes = adapter.in_axes, adapter.output_axes
  axis = tuple(a % x.ndim for a in axis)
  want = tuple(shape[i] for i in in_axes)
  _check_input("apply_dense_general", adapter, tuple(x.shape[a] for a in axis), want)
  rest = tuple(a for a in range(x.ndim) if a not in axis)
  xt = jnp.transpose(x, rest + axis) if axis != tuple(range(x.ndim - len(axis), x.ndim)) else x
  batch = xt.shape[: len(rest)]
  x2 = xt.reshape(batch + (adapter.shape[0],))
  y = adapter_matmul(x2, adapter)
  return y.reshape(batch + tuple(shape[i] for i in out_axes))


def apply_einsum(x: jax.Array, adapter: Adapter, eq: str) -> jax.Array:
  """The update's contribution to ``einsum(eq, x, K)``, through the rank-r path.

  Requires a plain-matmul equation (see ``targets.einsum_in_axes``) whose
  contracted kernel axes are the adapter's input axes.
  """
  adapter = layer_view(adapter)
  shape = adapter.kernel_shape
  in_axes = einsum_in_axes(eq, len(shape))
  if in_axes != adapter.in_axes:
    raise ValueError(
        f"einsum {eq!r} contracts kernel axes {in_axes} but the adapter's input axes are "
        f"{adapter.in_axes} (kernel shape {shape})"
    )
  x_spec, k_spec, out = parse_einsum(eq, len(shape))
  in_letters = "".join(k_spec[i] for i in adapter.in_axes)
  out_letters = "".join(k_spec[i] for i in adapter.output_axes)
  batch = "".join(c for c in x_spec if c in out)
  xt = jnp.einsum(f"{x_spec}->{batch}{in_letters}", x)
  y = apply_dense_general(xt, adapter, tuple(range(len(batch), xt.ndim)))
  return jnp.einsum(f"{batch}{out_letters}->{out}", y)


def lookup_embedding(ids: jax.Array, adapter: Adapter) -> jax.Array:
  """The update's rows for token ids: ``delta[ids]`` without forming the table.

  ``s * a[ids] @ b`` for LoRA (and the SDS warm-up),
  ``s * (qa[ids] @ b + a[ids] @ qb.T)`` with constant bases for SDS-LoRA.
  Returns float32 ``(*ids.shape, features)``.
  """
  adapter = layer_view(adapter)
  adapter = guard(adapter)
  s = adapter.scale
  a_rows = jnp.take(adapter.a, ids, axis=0).astype(jnp.float32)
  b = adapter.b.astype(jnp.float32)
  lora = s * (a_rows @ b)
  if adapter.method == "lora":
    return lora
  qa = jax.lax.stop_gradient(adapter.qa.astype(jnp.float32))
  qb = jax.lax.stop_gradient(adapter.qb.astype(jnp.float32))
  sds = s * (jnp.take(qa, ids, axis=0) @ b + a_rows @ qb.T)
  return jnp.where(in_sds_phase(adapter.sds_on), sds, lora)


def attend_embedding(query: jax.Array, adapter: Adapter) -> jax.Array:
  """The update's contribution to ``query @ table.T`` (tied output), rank-r."""
  adapter = layer_view(adapter)
  adapter = guard(adapter)  # checked as stored; the transposed view carries no stamp
  transposed = dataclasses.replace(
      adapter,
      stamp=None,
      a=adapter.b.T,
      b=adapter.a.T,
      qa=adapter.qb,
      qb=adapter.qa,
      kernel_shape=None,
      in_axes=None,
  )
  return adapter_matmul(query, transposed)
