"""Flax NNX frontend: adapters by model surgery.

NNX has no method interceptor, so targeted submodules (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``/``ConvTranspose``,
``nnx.Embed``) are replaced in place by an ``Adapted`` wrapper that holds the
original module (``.base``, unchanged) and the ``Adapter`` in an
``AdapterVariable``. The model's own code is not edited. Consequences:

* ``nnx.state(model, AdapterVariable)`` is the adapter tree (train this);
  ``nnx.Param`` stays the frozen base, now at ``<module path>/base/kernel``.
* Linear / LinearGeneral (without ``batch_axis``) / plain-matmul Einsum use the
  rank-r path, or one merged op where that is cheaper (``sdslora_jax.fused``); Embed
  gathers the update's rows; a 1x1 Conv (unit strides and dilations) uses the
  rank-r path over channels; other Conv (and any other case) merges the kernel per
  call.
* Kernels of layers stacked by ``nnx.vmap`` (layer axes first) get one
  adapter per layer, stored stacked in one ``AdapterVariable``; an
  ``nnx.scan`` over the layers slices it with the kernels, so each layer runs
  with its own adapter.
* ``adapters(model)`` gives the adapters keyed by the original kernel paths
  (for ``tree.merge`` and PEFT export); ``unwrap`` restores the original
  modules in place; ``merged`` returns a copy with the updates folded in.

Example::

  model = sdslora_jax.nnx.adapt(model, rules, key=jax.random.key(0))
  graphdef, lora, rest = nnx.split(model, sdslora_jax.nnx.AdapterVariable, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdslora_jax import fused
from sdslora_jax.adapter import Adapter, adapted_module_call, kernel_delta, layer_view
from sdslora_jax.targets import KernelLayout, Rule, einsum_in_axes, path_str, select_targets
from sdslora_jax.tree import (
    adapter_items,
    adapters_from_targets,
    apply_dense_general,
    apply_einsum,
    apply_pointwise_conv,
    attend_embedding,
    is_pointwise_conv,
    lookup_embedding,
)

__all__ = [
    "AdapterVariable",
    "adapt",
    "adapt_ops",
    "adapters",
    "attach",
    "merged",
    "unwrap",
    "as_function",
]

_CONV_TYPES = (nnx.Conv, nnx.ConvTranspose)
SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, *_CONV_TYPES)


class AdapterVariable(nnx.Variable):
  """An ``nnx.Variable`` whose value is one ``Adapter`` (the trainable state)."""


def _kernel_name(module: nnx.Module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _call_shape(module: nnx.Module) -> tuple[int, ...]:
  """The kernel shape a module uses per call, from its settings.

  It differs from the stored kernel's shape when the module was created under
  ``nnx.vmap`` (stacked layers); ``select_targets`` then raises.
  """
  if isinstance(module, nnx.Embed):
    return (module.num_embeddings, module.features)
  if isinstance(module, nnx.Linear):
    return (module.in_features, module.out_features)
  if isinstance(module, nnx.LinearGeneral):
    return (*module.batch_axis.values(), *module.in_features, *module.out_features)
  return tuple(module.kernel_shape)  # Einsum, Conv, ConvTranspose


def _conv_kind(module: nnx.Module) -> str:
  if isinstance(module, nnx.ConvTranspose):
    return "conv_transpose"
  return "conv_grouped" if module.feature_group_count > 1 else "conv"


def _layout(module: nnx.Module) -> KernelLayout | None:
  """The kernel layout implied by a module's type and settings."""
  shape = _call_shape(module)
  if isinstance(module, nnx.Embed):
    return KernelLayout(shape, (0,), "embed")
  if isinstance(module, nnx.Linear):
    return KernelLayout(shape, (0,))
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      return None
    return KernelLayout(shape, tuple(range(len(module.axis))))
  if isinstance(module, nnx.Einsum):
    axes = einsum_in_axes(module.einsum_str, len(shape)) if module.einsum_str else None
    return None if axes is None else KernelLayout(shape, axes)
  if isinstance(module, _CONV_TYPES):
    return KernelLayout(shape, tuple(range(len(shape) - 1)), _conv_kind(module))
  return None


class Adapted(nnx.Module):
  """A targeted module plus its adapter; calls the module with the update added.

  Attributes:
    base: the original module (its ``nnx.Param`` kernel stays frozen).
    adapter: ``AdapterVariable`` holding the ``Adapter``.
  """

  def __init__(self, base: nnx.Module, adapter: Adapter):
    if not isinstance(base, SUPPORTED):
      raise TypeError(f"cannot adapt a {type(base).__name__}; supported: "
                      f"{[t.__name__ for t in SUPPORTED]}")
    shape = tuple(getattr(base, _kernel_name(base)).shape)
    call = _call_shape(base)
    n = len(adapter.layer_axes)
    if shape[n:] != call or (n and shape[:n] != adapter.layer_shape):
      raise ValueError(
          f"cannot adapt a {type(base).__name__} whose kernel has shape {shape} but which uses "
          f"a kernel of shape {call} per call with an adapter for layer axes "
          f"{adapter.layer_axes} (kernel shape {adapter.kernel_shape})"
      )
    if adapter.kernel_shape != shape:
      raise ValueError(
          f"adapter for a kernel of shape {adapter.kernel_shape} cannot wrap a "
          f"{type(base).__name__} whose kernel has shape {shape}"
      )
    self.base = base
    self.adapter = AdapterVariable(adapter)

  def _adapter(self) -> Adapter:
    """This call's adapter: one layer's inside a scan over stacked layers."""
    return layer_view(self.adapter.get_value())

  def _merged_call(self, *args, **kwargs):
    """Runs a copy of the base module with ``K + delta`` as its kernel (per call).

    The copy is made by ``nnx.split`` / ``nnx.merge`` with fresh variables, so
    no variable of the model is mutated (safe under any JAX transform).
    """
    ad = self._adapter()
    name = _kernel_name(self.base)
    graphdef, state = nnx.split(self.base)
    state = jax.tree.map(lambda v: v, state)  # fresh Variable objects at this trace level
    var = state[name]
    old = var.get_value()
    var.set_value((old.astype("float32") + kernel_delta(ad)).astype(old.dtype))
    return nnx.merge(graphdef, state)(*args, **kwargs)

  def _adapted_call(self, ad: Adapter, args, kwargs, adapter_output):
    """The base module's call plus ``adapter_output(x, ad)`` (``adapter.adapted_module_call``).

    Merged only for the plain module types with Flax's own ``dot_general`` and a float32
    (or unset) ``dtype``: a module that rounds or quantizes its kernel would round the
    merged update with it.
    """
    base = self.base
    parts = fused.split_input(args, kwargs)
    kernel = getattr(base, "kernel", None)
    kernel = kernel.get_value() if isinstance(kernel, nnx.Variable) else None
    mergeable = (parts is not None and type(base) in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
                 and getattr(base, "dot_general", jax.lax.dot_general) is jax.lax.dot_general
                 and getattr(base, "dtype", None) in (None, jnp.float32))

    def merged_op():
      _, rebuild = parts
      graphdef, state = nnx.split(base)
      rest = {k: v for k, v in nnx.to_pure_dict(state).items() if k != "kernel"}

      def op(x, k, rest):
        a, kw = rebuild(x)
        return nnx.merge(graphdef, {**rest, "kernel": k})(*a, **kw)

      return op, rest

    x = parts[0] if parts is not None else (args[0] if args else kwargs["inputs"])
    return adapted_module_call(
        x, kernel, ad, mergeable=mergeable, precision=getattr(base, "precision", None),
        merged_op=merged_op, base_call=lambda: base(*args, **kwargs),
        adapter_output=adapter_output)

  def __call__(self, *args, **kwargs):
    ad = self._adapter()
    base = self.base
    x = args[0] if args else kwargs["inputs"]
    if isinstance(base, nnx.Embed):
      y = base(*args, **kwargs)
      return y + lookup_embedding(x, ad).astype(y.dtype)
    if isinstance(base, nnx.Linear):
      return self._adapted_call(ad, args, kwargs, lambda x, ad: apply_dense_general(x, ad, (-1,)))
    if isinstance(base, nnx.LinearGeneral) and not base.batch_axis:
      axis = tuple(sorted(a % x.ndim for a in base.axis))  # Flax pairs sorted axes with the kernel
      if ad.in_axes == tuple(range(len(axis))):
        return self._adapted_call(ad, args, kwargs,
                                  lambda x, ad: apply_dense_general(x, ad, axis))
    if isinstance(base, nnx.Einsum):
      eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
      eq = (eq if eq is not None else base.einsum_str).replace(" ", "")
      if einsum_in_axes(eq, len(ad.kernel_shape)) == ad.in_axes:
        return self._adapted_call(ad, args, kwargs, lambda x, ad: apply_einsum(x, ad, eq))
    if isinstance(base, nnx.Conv) and is_pointwise_conv(ad, base):
      y = base(*args, **kwargs)
      return y + apply_pointwise_conv(x.astype(y.dtype), ad)
    return self._merged_call(*args, **kwargs)

  def attend(self, query, *args, **kwargs):
    """``Embed.attend`` with the update (rank-r path)."""
    if not isinstance(self.base, nnx.Embed):
      raise AttributeError(f"{type(self.base).__name__} has no attend")
    y = self.base.attend(query, *args, **kwargs)
    return y + attend_embedding(query.astype(y.dtype), self._adapter())


def _get(node, key):
  if isinstance(key, str) and not isinstance(node, Mapping):
    return getattr(node, key)
  return node[key]


def _replace(model: nnx.Module, path: tuple, new: Any) -> None:
  parent = model
  for k in path[:-1]:
    parent = _get(parent, k)
  k = path[-1]
  if isinstance(k, str) and not isinstance(parent, Mapping):
    setattr(parent, k, new)
  else:
    parent[k] = new


def _modules(model: nnx.Module):
  """``[(path, module)]`` of the supported and the wrapper modules, outside wrappers."""
  found, wrapped = [], []
  for path, node in nnx.iter_graph(model):
    if any(path[: len(w)] == w for w in wrapped):
      continue
    if isinstance(node, Adapted):
      wrapped.append(tuple(path))
      found.append((tuple(path), node))
    elif isinstance(node, SUPPORTED):
      found.append((tuple(path), node))
  return found


def attach(model: nnx.Module, adapter_tree: Any) -> nnx.Module:
  """Wraps the modules whose kernels have adapters in ``adapter_tree`` (in place).

  Args:
    model: an NNX model (not yet adapted at those paths).
    adapter_tree: adapters keyed by the original kernel paths (as made by
      ``tree.init_adapters`` on ``nnx.state(model, nnx.Param)``, by
      ``adapters(model)`` or by ``peft.import_peft``).

  Returns:
    ``model`` itself, modified.
  """
  mods = {path: m for path, m in _modules(model)}
  for keys, ad in adapter_items(adapter_tree):
    mod_path = tuple(keys[:-1])
    m = mods.get(mod_path)
    if m is None or isinstance(m, Adapted) or keys[-1] != _kernel_name(m):
      what = "is already adapted" if isinstance(m, Adapted) else "is not a supported module"
      raise ValueError(
          f"cannot attach the adapter at {path_str(keys)!r}: {path_str(mod_path) or '<root>'} "
          f"{what} (supported: {[t.__name__ for t in SUPPORTED]})"
      )
    if not mod_path:
      raise ValueError("cannot adapt the root module itself; wrap it in a parent module")
    _replace(model, mod_path, Adapted(m, ad))
  return model


def adapt(
    model: nnx.Module,
    rules: Sequence[Rule | tuple],
    *,
    key: jax.Array,
    sds_on: bool = False,
) -> nnx.Module:
  """Selects kernels by the rules and attaches freshly initialised adapters (in place).

  Rules see the original "/"-joined ``nnx.Param`` paths (e.g.
  ``"encoder/layers/0/attention/query/kernel"``); layouts come from the module
  types. The update is exactly zero after this call.

  Raises:
    ValueError: rule errors (see ``targets.select_targets``), a rule selects
      a kernel of an unsupported module type, or the model is already adapted.
  """
  adapted = [path_str(p) or "<root>" for p, m in _modules(model) if isinstance(m, Adapted)]
  if adapted:
    raise ValueError(
        f"the model is already adapted ({len(adapted)} adapted layers, e.g. {adapted[:3]}): "
        "adapt a model once, with all its rules; to start over, call "
        "sdslora_jax.nnx.unwrap(model) first (attach() adds adapters to layers that have none)"
    )
  mods = list(_modules(model))
  layouts = {}
  unsupported = []
  for p, m in mods:
    lay = _layout(m)
    kpath = path_str((*p, _kernel_name(m)))
    if lay is None:
      unsupported.append(kpath)
    else:
      layouts[kpath] = lay
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  targets = select_targets(params, rules, layouts=layouts)
  for t in targets:
    if t.path not in layouts:
      raise ValueError(
          f"rule {t.rule.label} selects {t.path!r}, which does not belong to a supported module "
          f"(Linear, LinearGeneral without batch_axis, plain-matmul Einsum, Conv, Embed)"
      )
  return attach(model, adapters_from_targets(key, targets, sds_on=sds_on))


def adapter_state(model: nnx.Module) -> nnx.State:
  """``nnx.state(model, AdapterVariable)``: the trainable adapter state."""
  return nnx.state(model, AdapterVariable)


def adapters(model: nnx.Module) -> dict:
  """The adapters as a plain tree keyed by the original kernel paths."""
  tree: dict = {}
  for path, m in _modules(model):
    if isinstance(m, Adapted):
      node = tree
      for k in path:
        node = node.setdefault(k, {})
      node[_kernel_name(m.base)] = m.adapter.get_value()
  return tree


def unwrap(model: nnx.Module) -> nnx.Module:
  """Puts the original modules back (in place); returns the unadapted model."""
  for path, m in _modules(model):
    if isinstance(m, Adapted):
      _replace(model, path, m.base)
  return model


def merged(model: nnx.Module) -> nnx.Module:
  """A copy of the model with every update folded into its kernel, no wrappers."""
  out = nnx.clone(model)
  for path, m in _modules(out):
    if isinstance(m, Adapted):
      var = getattr(m.base, _kernel_name(m.base))
      old = var.get_value()
      var.set_value((old.astype("float32") + kernel_delta(m.adapter.get_value())).astype(old.dtype))
      _replace(out, path, m.base)
  return out


def is_adapted(model: nnx.Module) -> bool:
  """Whether any submodule is an ``Adapted`` wrapper."""
  return any(isinstance(m, Adapted) for _, m in _modules(model))



# --- the op-level path: any NNX model, whatever its layers -------------------


class OpAdapted(nnx.Module):
  """Any NNX model with adapters applied where its weights meet activations.

  Built by ``adapt_ops``. ``model`` is the original model, untouched (its
  ``nnx.Param`` weights are the frozen base); ``adapters`` holds one
  ``AdapterVariable`` per adapted weight, keyed by its "/"-joined ``nnx.Param``
  path (``"layers/0/attn/q_proj/w"``); ``adapter_tree()`` gives them as a nested
  tree for ``tree.merge``, checkpoints and PEFT export. Calling it runs the model through
  ``sdslora_jax.intercept.apply``: layers of any class (``nnx.Linear``, a
  codebase's own ``Einsum`` or ``Linear``, weights stacked by ``nnx.vmap`` and run
  by ``nnx.scan``) get the rank-r op at their ``dot_general`` / lookup. Non-parameter
  state the model changes while running (batch statistics, RNG counters) is
  written back. ``nnx.Optimizer(adapted, sds_lora(...), wrt=AdapterVariable)``
  trains only the adapters.
  """

  def __init__(self, model: nnx.Module, adapter_tree: Any):
    self.model = model
    # One AdapterVariable per adapter (as nnx.Optimizer expects), keyed by the weight's path.
    self._keys = tuple(keys for keys, _ in adapter_items(adapter_tree))
    self.adapters = nnx.Dict({path_str(keys): AdapterVariable(ad)
                              for keys, ad in adapter_items(adapter_tree)})

  def adapter_tree(self) -> dict:
    """The adapters as a plain tree keyed by the weights' paths (for merge, export)."""
    tree: dict = {}
    for keys in self._keys:
      node = tree
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = self.adapters[path_str(keys)].get_value()
    return tree

  def __call__(self, *args, **kwargs):
    from sdslora_jax import intercept
    fn, pure, rest = as_function(self.model, with_state=True)
    out, new_rest = intercept.apply(fn, pure, self.adapter_tree(), *args, **kwargs)
    nnx.replace_by_pure_dict(rest, new_rest)
    nnx.update(self.model, rest)
    return out

  def merged(self) -> nnx.Module:
    """A copy of the model with every update folded into its weight."""
    from sdslora_jax.tree import merge as merge_tree
    graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
    return nnx.merge(graphdef, _with_values(params, merge_tree(nnx.to_pure_dict(params),
                                                               self.adapter_tree())), rest)


def _with_values(params: nnx.State, pure: Any) -> nnx.State:
  """A copy of ``params`` (fresh Variables at this trace level) holding ``pure``'s arrays."""
  state = jax.tree.map(lambda v: v, params)
  nnx.replace_by_pure_dict(state, pure)
  return state


def as_function(model: nnx.Module, *, with_state: bool = False):
  """``(fn, params, rest)``: the model as ``fn(params, *inputs)`` of its pure ``nnx.Param`` dict.

  ``rest`` is the model's other state. With ``with_state``, ``fn`` returns
  ``(output, the pure dict of the other state after the call)``, for models that
  update batch statistics or RNG counters while running.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fn(p, *args, **kwargs):
    m = nnx.merge(graphdef, _with_values(params, p), rest)
    out = m(*args, **kwargs)
    return (out, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))) if with_state else out

  return fn, nnx.to_pure_dict(params), rest


def adapt_ops(
    model: nnx.Module,
    rules: Sequence[Rule | tuple],
    *example_args: Any,
    key: jax.Array,
    sds_on: bool = False,
    **example_kwargs: Any,
) -> OpAdapted:
  """Wraps any NNX model with adapters on the op-level path (the model is not changed).

  ``rules`` select ``nnx.Param`` weights by their "/"-joined paths, whatever the
  weights are called; the example inputs are traced abstractly to read how each
  selected weight is used (see ``sdslora_jax.intercept``). The update is exactly
  zero after this call.
  """
  from sdslora_jax import intercept
  if isinstance(model, OpAdapted):
    raise ValueError("the model is already wrapped by adapt_ops; adapt a model once")
  fn, pure, _ = as_function(model)
  ads = intercept.init_adapters(key, fn, pure, rules, *example_args, sds_on=sds_on,
                                **example_kwargs)
  return OpAdapted(model, ads)
