"""Flax Linen frontend: adapters on an unmodified Linen model.

The model code is not edited. ``apply`` runs ``model.apply`` under
``flax.linen.intercept_methods``: when a ``Dense``, ``DenseGeneral``, ``Einsum``,
``Conv`` (any ``nn.Conv``/``ConvTranspose``/``ConvLocal``) or ``Embed`` module
is called and the adapter tree holds an adapter at ``module.path + (kernel
name,)``, its output gets the adapter's contribution:

* ``Dense``, ``DenseGeneral`` (without ``batch_dims``) and plain-matmul
  ``Einsum``: the rank-r path (``tree.apply_dense_general``); no kernel-sized
  update or gradient is formed. Where the call has enough rows of
  activations (``T (d_in + d_out) >= d_in d_out``; float32, full precision, the plain
  module types, no other method interceptor), the module runs once on the
  merged kernel instead (``sdslora_jax.fused``): one matmul each way, no kernel
  gradient; ``sdslora_jax.merging("never")`` keeps the rank-r path.
* ``Embed``: the update's rows are gathered from the factors (``__call__``),
  and ``attend`` uses the rank-r path.
* ``Conv`` with a 1x1 kernel, unit strides and dilations: the rank-r path over the
  channel axis (``tree.is_pointwise_conv``).
* Other ``Conv`` and any other case: the kernel is merged *per call*
  (``K + delta`` formed once per call, and its gradient) and the module re-run
  on the merged parameters.

Kernels stacked by ``nn.scan`` (layer axes first, ``variable_axes={"params":
0}``; with or without ``nn.remat``) get one adapter per layer, stored stacked;
``apply`` places each stacked adapter's arrays beside its kernel in ``params``,
so the scan hands every layer its own adapter, applied through the rank-r path.

Example::

  adapters = sdslora_jax.linen.init_adapters(key, model, params, rules, x)
  y = sdslora_jax.linen.apply(model, {"params": params}, adapters, x)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.linen import module as _linen_module  # an internal: see _plain
import jax.numpy as jnp

from sdslora_jax import fused
from sdslora_jax.adapter import (
    Adapter, adapted_module_call, guard_tree, is_adapter, kernel_delta, layer_view)
from sdslora_jax.targets import KernelLayout, Rule, einsum_in_axes, path_str
from sdslora_jax.tree import (
    adapter_items,
    apply_dense_general,
    apply_einsum,
    apply_pointwise_conv,
    attend_embedding,
    init_adapters as _init_adapters,
    is_pointwise_conv,
    lookup_embedding,
)

__all__ = ["apply", "init_adapters"]

_CONV_TYPES = (nn.Conv, nn.ConvTranspose, nn.ConvLocal)
_state = threading.local()


def _inputs(args, kwargs, name="inputs"):
  return args[0] if args else kwargs[name]


def _einsum_str(module, args, kwargs):
  eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  eq = eq if eq is not None else module.einsum_str
  return eq.replace(" ", "")


def _shape(v) -> tuple[int, ...]:
  """A parameter's shape, through ``nn.Partitioned`` / ``LogicallyPartitioned`` boxes."""
  return tuple(nn.meta.unbox(v).shape)


def _dense_general_axis(module, ndim):
  """The input axes ``DenseGeneral`` contracts, sorted as Flax pairs them with the kernel."""
  axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
  return tuple(sorted(a % ndim for a in axis))


def _conv_kind(module) -> str:
  if isinstance(module, nn.ConvTranspose):
    return "conv_transpose"
  if isinstance(module, nn.ConvLocal):
    return "conv_local"
  return "conv_grouped" if module.feature_group_count > 1 else "conv"


def module_layouts(
    model: nn.Module, *args: Any, method: Any = None, **kwargs: Any
) -> dict[str, KernelLayout]:
  """Kernel layouts by "/"-joined path, read from the module types.

  Traces ``model.init`` abstractly (``jax.eval_shape``) on the example inputs
  and records every Dense / DenseGeneral / Einsum / Conv / Embed call. A layout's
  shape is the kernel as the module sees it per call (per layer under
  ``nn.scan``), so ``select_targets`` can refuse stacked kernels.
  """
  found: dict[str, KernelLayout] = {}

  def record(next_fun, a, kw, ctx):
    out = next_fun(*a, **kw)
    m = ctx.module
    if ctx.method_name != "__call__":
      return out
    base = "".join(f"{p}/" for p in m.path)  # "" for the root module
    if isinstance(m, nn.Dense):
      found[f"{base}kernel"] = KernelLayout(_shape(m.variables["params"]["kernel"]), (0,))
    elif isinstance(m, nn.DenseGeneral) and not m.batch_dims:
      k = m.variables["params"]["kernel"]
      n = len(_dense_general_axis(m, _inputs(a, kw).ndim))
      found[f"{base}kernel"] = KernelLayout(_shape(k), tuple(range(n)))
    elif isinstance(m, nn.Einsum):
      k = m.variables["params"]["kernel"]
      axes = einsum_in_axes(_einsum_str(m, a, kw), len(_shape(k)))
      if axes is not None:
        found[f"{base}kernel"] = KernelLayout(_shape(k), axes)
    elif isinstance(m, _CONV_TYPES):
      k = m.variables["params"]["kernel"]
      found[f"{base}kernel"] = KernelLayout(
          _shape(k), tuple(range(len(_shape(k)) - 1)), _conv_kind(m)
      )
    elif isinstance(m, nn.Embed):
      k = m.variables["params"]["embedding"]
      found[f"{base}embedding"] = KernelLayout(_shape(k), (0,), "embed")
    return out

  def init(*a, **kw):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
      return model.init(rngs, *a, method=method, **kw)

  jax.eval_shape(init, *args, **kwargs)
  return found


def init_adapters(
    key: jax.Array,
    model: nn.Module,
    params: Any,
    rules: Sequence[Rule | tuple],
    *example_args: Any,
    sds_on: bool = False,
    **example_kwargs: Any,
) -> dict:
  """Adapters for a Linen model's parameters, layouts taken from the module types.

  Args:
    key: PRNG key.
    model: the Linen module.
    params: its ``params`` collection (not the whole variables dict).
    rules: ordered target rules (``sdslora_jax.targets.rule``).
    *example_args: example inputs for an abstract trace that finds each
      kernel's module type (``jax.eval_shape``; nothing is computed). With no
      example inputs, layouts come from the kernel shapes alone.
    sds_on: start SDS-LoRA adapters in the SDS phase.
    **example_kwargs: example keyword inputs.

  Returns:
    The adapter tree (zero update), mirroring ``params``.
  """
  if isinstance(params, Mapping) and isinstance(params.get("params"), Mapping):
    params = params["params"]  # a whole variables dict was passed
  params = nn.meta.unbox(params)  # nn.with_logical_partitioning / nn.with_partitioning boxes
  layouts = module_layouts(model, *example_args, **example_kwargs) if (
      example_args or example_kwargs
  ) else None
  return _init_adapters(key, params, rules, layouts=layouts, sds_on=sds_on)


def _lookup(adapters, path, name):
  node = adapters
  for p in (*path, name):
    if not isinstance(node, Mapping) or p not in node:
      return None
    node = node[p]
  return node if is_adapter(node) else None


def _merged_call(module, ad: Adapter, name, next_args, kwargs, method_name):
  params = dict(module.variables["params"])
  k = params[name]
  params[name] = (k.astype("float32") + kernel_delta(ad)).astype(k.dtype)
  variables = {c: v for c, v in module.variables.items() if c != "params"}
  variables["params"] = params
  _state.bypass = getattr(_state, "bypass", 0) + 1
  try:
    return module.clone(parent=None).apply(variables, *next_args, method=method_name, **kwargs)
  finally:
    _state.bypass -= 1


def _adapted_call(module, ad: Adapter, next_fun, args, kwargs, adapter_output):
  """The module's call plus ``adapter_output(x, ad)`` (``adapter.adapted_module_call``)."""
  parts = fused.split_input(args, kwargs)

  def merged_op():
    _, rebuild = parts
    unbound = module.clone(parent=None)
    variables = {c: v for c, v in module.variables.items()}
    rest = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "kernel"}}

    def op(x, k, rest):
      v = {**rest, "params": {**rest["params"], "kernel": k}}
      a, kw = rebuild(x)
      _state.bypass = getattr(_state, "bypass", 0) + 1
      try:
        return unbound.apply(v, *a, **kw)
      finally:
        _state.bypass -= 1

    return op, rest

  return adapted_module_call(
      _inputs(args, kwargs), module.variables.get("params", {}).get("kernel"), ad,
      mergeable=parts is not None and _plain(module),
      precision=getattr(module, "precision", None), merged_op=merged_op,
      base_call=lambda: next_fun(*args, **kwargs), adapter_output=adapter_output)


def _plain(module) -> bool:
  """Whether calling ``module`` again with a merged kernel computes what the adapter adds to.

  Not for a subclass, a custom ``dot_general`` or a float32-rounding ``dtype``, nor under
  another method interceptor than this frontend's (qwix's quantization providers are
  interceptors: they would quantize the merged kernel, update included). Reads Flax's
  interceptor stack, an internal (``tests/test_outside_internals.py``).
  """
  return (type(module) in (nn.Dense, nn.DenseGeneral, nn.Einsum)
          and getattr(module, "dot_general", None) is None
          and getattr(module, "dot_general_cls", None) is None
          and getattr(module, "dtype", None) in (None, jnp.float32)
          and len(_linen_module._global_interceptor_stack) == 1)


def _check_kernel(module, ad: Adapter, name: str) -> None:
  """Raises if the module's kernel, as it sees it in this call, is not the adapter's."""
  params = module.variables.get("params", {})
  if name not in params:
    return
  shape = _shape(params[name])
  if shape != ad.kernel_shape:
    raise ValueError(
        f"the adapter at {path_str((*module.path, name))!r} is for a kernel of shape "
        f"{ad.kernel_shape} (in_axes {ad.in_axes}), but the {type(module).__name__} there "
        f"uses a kernel of shape {shape} per call: a kernel stored with extra leading axes "
        "(layers stacked by nn.scan / nn.vmap) cannot be adapted as one matrix; build the "
        "adapters with example inputs (init_adapters(key, model, params, rules, *inputs)) "
        "so the module types decide the layout"
    )


_FIELDS = ("a", "b", "qa", "qb", "sds_on", "stamp")


def _slot(name: str) -> str:
  """The params key, beside a stacked kernel, that carries its adapter's arrays."""
  return f"__sdslora_{name}"


def with_stacked_adapters(variables: Mapping[str, Any], adapters: Any) -> dict:
  """``variables`` with every stacked adapter's arrays beside its kernel in ``params``.

  A scan over layers (``nn.scan(..., variable_axes={"params": 0})``) slices
  every array of ``params`` along the layer axis, so arrays placed at
  ``<module path>/__sdslora_kernel`` reach each layer's call as that layer's
  adapter. ``apply`` does this itself; call it when running ``model.apply``
  inside ``intercept`` yourself. Unstacked adapters are not copied.
  """
  stacked = [(k, ad) for k, ad in adapter_items(adapters) if ad.layer_axes]
  if not stacked:
    return variables
  out = dict(variables)
  params = out["params"] = _copy_dicts(variables["params"])
  for keys, ad in stacked:
    node = params
    for k in keys[:-1]:
      if not isinstance(node, Mapping) or k not in node:
        raise ValueError(f"the stacked adapter at {path_str(keys)!r} has no module at that path")
      node = node[k]
    node[_slot(keys[-1])] = {f: getattr(ad, f) for f in _FIELDS if getattr(ad, f) is not None}
  return out


def _copy_dicts(tree):
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _resolve(m, ad: Adapter, name: str) -> Adapter:
  """The adapter for this call: a stacked one's layer comes from the module's variables."""
  if not ad.layer_axes:
    return ad
  slot = m.variables.get("params", {}).get(_slot(name))
  if slot is None:
    raise ValueError(
        f"the stacked adapter at {path_str((*m.path, name))!r} did not reach its layer: run the "
        "model with sdslora_jax.linen.apply, or pass with_stacked_adapters(variables, adapters) "
        "to model.apply inside intercept()"
    )
  return layer_view(dataclasses.replace(ad, **slot))


def _make_interceptor(adapters, used: set):
  def interceptor(next_fun, args, kwargs, ctx):
    if getattr(_state, "bypass", 0):
      return next_fun(*args, **kwargs)
    m = ctx.module
    if isinstance(m, nn.Embed):
      ad = _lookup(adapters, m.path, "embedding")
      if ad is None or ctx.method_name not in ("__call__", "attend"):
        return next_fun(*args, **kwargs)
      ad = _resolve(m, ad, "embedding")
      _check_kernel(m, ad, "embedding")
      used.add((*m.path, "embedding"))
      y = next_fun(*args, **kwargs)
      if ctx.method_name == "__call__":
        return y + lookup_embedding(_inputs(args, kwargs), ad).astype(y.dtype)
      q = _inputs(args, kwargs, "query")
      return y + attend_embedding(q.astype(y.dtype), ad)
    if ctx.method_name != "__call__":
      return next_fun(*args, **kwargs)
    ad = _lookup(adapters, m.path, "kernel")
    if ad is None:
      return next_fun(*args, **kwargs)
    ad = _resolve(m, ad, "kernel")
    _check_kernel(m, ad, "kernel")
    used.add((*m.path, "kernel"))
    if isinstance(m, nn.Dense):
      return _adapted_call(m, ad, next_fun, args, kwargs,
                           lambda x, ad: apply_dense_general(x, ad, (-1,)))
    if isinstance(m, nn.DenseGeneral) and not m.batch_dims:
      axis = _dense_general_axis(m, _inputs(args, kwargs).ndim)
      if ad.in_axes == tuple(range(len(axis))):
        return _adapted_call(m, ad, next_fun, args, kwargs,
                             lambda x, ad: apply_dense_general(x, ad, axis))
    if isinstance(m, nn.Einsum):
      eq = _einsum_str(m, args, kwargs)
      if einsum_in_axes(eq, len(ad.kernel_shape)) == ad.in_axes:
        return _adapted_call(m, ad, next_fun, args, kwargs,
                             lambda x, ad: apply_einsum(x, ad, eq))
    if isinstance(m, nn.Conv) and is_pointwise_conv(ad, m):
      y = next_fun(*args, **kwargs)
      return y + apply_pointwise_conv(_inputs(args, kwargs).astype(y.dtype), ad)
    # Other Conv, DenseGeneral with batch_dims, non-matmul Einsum: merge per call.
    return _merged_call(m, ad, "kernel", args, kwargs, "__call__")

  return interceptor


@contextlib.contextmanager
def intercept(adapters: Any, *, used: set | None = None):
  """Context manager: Linen modules called inside get their adapters.

  ``with intercept(adapters): y = model.apply(variables, x)``. Paths are
  ``module.path`` plus ``"kernel"`` (``"embedding"`` for ``Embed``).
  ``used`` (optional) collects the plain key paths of the adapters applied.
  """
  used = set() if used is None else used
  with nn.intercept_methods(_make_interceptor(guard_tree(adapters), used)):
    yield used


def apply(
    model: nn.Module,
    variables: Mapping[str, Any],
    adapters: Any,
    *args: Any,
    check_unused: bool = True,
    **kwargs: Any,
) -> Any:
  """``model.apply(variables, *args, **kwargs)`` with the adapters applied.

  Args:
    model: the unmodified Linen module.
    variables: ``{"params": base_params, ...}`` as for ``model.apply``.
    adapters: the adapter tree (mirrors ``variables["params"]``).
    *args: positional arguments of ``model.apply``.
    check_unused: raise if an adapter's module was never called (a path typo
      would otherwise silently leave the model unadapted).
    **kwargs: keyword arguments of ``model.apply`` (``method``, ``rngs``,
      ``mutable``, model inputs).

  Raises:
    ValueError: with ``check_unused``, when adapters were not reached.
  """
  adapters = guard_tree(adapters)  # one batched stamp check for the whole tree
  with intercept(adapters) as used:
    out = model.apply(with_stacked_adapters(variables, adapters), *args, **kwargs)
  if check_unused:
    unused = [path_str(k) for k, _ in adapter_items(adapters) if k not in used]
    if unused:
      raise ValueError(
          f"adapters at {unused} were not applied: no Dense/DenseGeneral/Einsum/Conv/Embed "
          "module with that path was called"
      )
  return out
