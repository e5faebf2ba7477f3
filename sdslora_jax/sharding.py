"""Shardings for adapter trees and their optimizer state, derived from the base kernels.

``adapter_shardings`` lays every adapter out like the kernel it adapts: the down
factor ``a`` is sharded along ``d_in`` as the kernel's input side is, the up
factor ``b`` along ``d_out`` as its output side is, and the rank axis is never
sharded (it is small, and the bases' QR and ``r x r`` Gram matrices need it
whole). ``opt_state_shardings`` gives the optimizer state the shardings of the
parameters it mirrors.

Layout (``L``: the layer axes of a stacked adapter, absent otherwise; ``IN`` /
``OUT``: the spec of the kernel's flattened input / output side, see below;
``-``: not sharded)::

  field           shape              spec
  a               (*L, d_in, r)      (*L, IN, -)
  b               (*L, r, d_out)     (*L, -, OUT)
  qa              (*L, d_in, r)      (*L, IN, -)      as a
  qb              (*L, d_out, r)     (*L, OUT, -)     as b.T
  sds_on, stamp   L                  (*L)             replicated when unstacked

Each layer axis keeps the kernel's spec for that axis.

Flattened sides. The input side is the kernel's ``in_axes`` (``(0,)`` by
default), flattened row-major in that order into ``d_in``; the output side is
the remaining non-layer axes, in kernel order, flattened into ``d_out``. A
side of one kernel axis takes that axis's spec unchanged. A side of several
axes ``k_1, ..., k_n`` (sizes ``n_j``, each sharded over mesh axes of total
size ``m_j``, ``m_j = 1`` when unsharded) takes the concatenation of their
mesh axes, in that order, exactly when that is the same block layout, i.e.
every device holds the same elements of the flattened side as of the kernel:
when every axis before the last sharded one, ``k_t``, is *fully split*
(``m_j == n_j``, which includes axes of size 1); the axes after ``k_t`` are
unsharded. Otherwise the whole side is left unsharded (replicated). Examples on
a mesh ``{"data": 2, "fsdp": 2, "tensor": 2}``: sizes ``(4, 8)`` with specs
``("tensor", None)`` flatten to ``"tensor"``, ``(2, 8)`` with ``("tensor",
"data")`` to ``("tensor", "data")``, ``(1, 8)`` with ``(None, "tensor")`` to
``"tensor"``; ``(4, 8)`` with ``(None, "tensor")`` or ``("tensor", "data")``
has no equal block layout and is replicated. Without a mesh the axis sizes
are unknown and only axes of size 1 count as fully split. So a conv kernel
``(*spatial, c_in, c_out)`` with ``c_in`` sharded has a replicated input side
unless its spatial axes are of size 1.

Where a kernel's sharding is read from (``base``): a tree mirroring the base
parameters whose entries are ``PartitionSpec`` or ``NamedSharding`` (mesh axis
names), ``None`` (replicated), sharded arrays or ``jax.ShapeDtypeStruct``
with a ``sharding``; Flax Linen ``nn.Partitioned`` boxes (mesh axis names) and
``nn.LogicallyPartitioned`` boxes (logical names, as left by
``nn.with_logical_partitioning`` in ``model.init`` / ``jax.eval_shape``); or an
NNX ``State`` (or a module) whose ``Variable`` metadata carries
``out_sharding`` (``nnx.with_partitioning``; flax >= 0.12.4, before which Flax
called it ``sharding_names``), else a sharded value. No mesh axis may appear twice in a
kernel's spec, and, where the mesh is known, every one must be an axis of it.

No Flax import at module level: Flax is imported only when Flax metadata is met.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from sdslora_jax import _trees, quantized
from sdslora_jax.adapter import Adapter, is_adapter
from sdslora_jax.targets import path_keys, path_str

__all__ = ["adapter_shardings", "opt_state_shardings"]

_FIELDS = ("a", "b", "qa", "qb", "sds_on", "stamp")

Rules = Sequence[tuple[str, Any]]


def _is_flax_partitioned(x: Any) -> bool:
  """A Linen ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` box (no Flax import)."""
  meta = sys.modules.get("flax.core.meta")
  return meta is not None and isinstance(x, meta.Partitioned)


def _is_spec_leaf(x: Any) -> bool:
  return (x is None or isinstance(x, (PartitionSpec, Sharding)) or _is_flax_partitioned(x)
          or _trees.is_nnx_variable(x))


def _axis_names(entry: Any) -> tuple[str, ...]:
  """Mesh axis names of one spec entry (``None`` and ``UNCONSTRAINED``: none)."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _entry(names: Sequence[str]) -> Any:
  """A spec entry for mesh axis names: ``None``, a name, or a tuple of names."""
  names = tuple(names)
  return None if not names else names[0] if len(names) == 1 else names


def _mesh_sizes(mesh: Any) -> Mapping[str, int] | None:
  return None if mesh is None else dict(mesh.shape)


def _side(names: list[tuple[str, ...]], sizes: list[int], sizes_of: Mapping[str, int] | None):
  """Mesh axes of one flattened side (see the module docstring), ``()`` if unsharded."""
  sharded = [j for j, n in enumerate(names) if n]
  if not sharded:
    return ()
  last = sharded[-1]
  for j in range(last):
    if sizes[j] == 1:
      continue
    if names[j] and sizes_of is not None and math.prod(sizes_of[n] for n in names[j]) == sizes[j]:
      continue
    return ()
  return tuple(n for j in range(last + 1) for n in names[j])


def _check_shapes(adapter: Adapter, where: str) -> None:
  shape = adapter.kernel_shape
  lead = tuple(shape[i] for i in adapter.layer_axes)
  d_in = math.prod(shape[i] for i in adapter.in_axes)
  d_out = math.prod(shape[i] for i in adapter.output_axes)
  r = adapter.a.shape[-1]
  want = {"a": lead + (d_in, r), "b": lead + (r, d_out), "qa": lead + (d_in, r),
          "qb": lead + (d_out, r), "sds_on": lead, "stamp": lead}
  for f in _FIELDS:
    x = getattr(adapter, f)
    if x is not None and tuple(np.shape(x)) != want[f]:
      raise ValueError(
          f"{where}: adapter field {f} has shape {tuple(np.shape(x))}, but a kernel of shape "
          f"{shape} (in_axes {adapter.in_axes}, layer_axes {adapter.layer_axes}) needs "
          f"{want[f]}"
      )


def adapter_spec(adapter: Adapter, kernel_spec: Any, *, mesh: Any = None) -> Adapter:
  """The ``PartitionSpec`` of every field of one adapter, from its kernel's spec.

  Args:
    adapter: the adapter (arrays or ``jax.ShapeDtypeStruct``); its static
      ``kernel_shape``, ``in_axes`` and ``layer_axes`` give the layout.
    kernel_spec: the kernel's ``PartitionSpec`` (or a tuple of entries) in mesh
      axis names; shorter than the kernel's rank means the rest unsharded.
    mesh: a ``Mesh`` or ``AbstractMesh``, only read for its axis sizes (the
      multi-axis flattening rule); ``None``: sizes unknown (see the module
      docstring).

  Returns:
    An ``Adapter`` with the same static fields whose data fields hold
    ``PartitionSpec`` (``None`` fields stay ``None``), laid out as the module
    docstring's table says.

  Raises:
    ValueError: the spec has more entries than the kernel has axes, uses a
      mesh axis twice or one the mesh lacks, or the adapter's arrays do not fit
      its kernel shape.
  """
  shape = adapter.kernel_shape
  where = f"adapter for kernel shape {shape}"
  _check_shapes(adapter, where)
  entries = tuple(kernel_spec)
  if len(entries) > len(shape):
    raise ValueError(f"{where}: spec {PartitionSpec(*entries)} has more entries than axes")
  names = [_axis_names(e) for e in entries] + [()] * (len(shape) - len(entries))
  flat = [n for ns in names for n in ns]
  dup = sorted({n for n in flat if flat.count(n) > 1})
  if dup:
    raise ValueError(f"{where}: spec {PartitionSpec(*entries)} uses mesh axes {dup} twice")
  sizes_of = _mesh_sizes(mesh)
  if sizes_of is not None:
    unknown = [n for n in flat if n not in sizes_of]
    if unknown:
      raise ValueError(
          f"{where}: spec {PartitionSpec(*entries)} names mesh axes {unknown} that the mesh "
          f"{tuple(sizes_of)} lacks (logical names need logical-axis rules)"
      )

  def side(axes):
    return _entry(_side([names[i] for i in axes], [shape[i] for i in axes], sizes_of))

  lead = tuple(_entry(names[i]) for i in adapter.layer_axes)
  d_in, d_out = side(adapter.in_axes), side(adapter.output_axes)
  specs = {
      "a": PartitionSpec(*lead, d_in, None),
      "b": PartitionSpec(*lead, None, d_out),
      "qa": PartitionSpec(*lead, d_in, None),
      "qb": PartitionSpec(*lead, d_out, None),
      "sds_on": PartitionSpec(*lead),
      "stamp": PartitionSpec(*lead),
  }
  return dataclasses.replace(
      adapter, **{f: None if getattr(adapter, f) is None else specs[f] for f in _FIELDS}
  )


def _logical_box_spec(box: Any, rules: Rules | None, where: str) -> PartitionSpec:
  import flax.linen as nn  # noqa: PLC0415 (Flax is optional)

  if not isinstance(box, nn.LogicallyPartitioned):
    return box.get_partition_spec()
  box_rules = box.rules if box.rules is not None else rules
  if box_rules is None:
    box_rules = nn.get_logical_axis_rules()
  if not box_rules and any(isinstance(n, str) for n in box.names):
    raise ValueError(
        f"{where}: the kernel has logical axis names {tuple(box.names)} but no logical-axis rules "
        "are given: pass rules=... or call inside nn.logical_axis_rules(...)"
    )
  return nn.logical_to_mesh_axes(box.names, box_rules)


def _variable_spec(var: Any, rules: Rules | None) -> tuple[PartitionSpec, Any] | None:
  meta = var.get_metadata()
  out = meta.get("out_sharding")
  if not out:
    return None
  if isinstance(out, NamedSharding):
    return out.spec, out.mesh
  from flax.core import spmd as core_spmd  # noqa: PLC0415 (Flax is optional)
  from flax.nnx import spmd as nnx_spmd  # noqa: PLC0415

  ctx = core_spmd.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext()
  with ctx:
    spec = nnx_spmd.get_var_pspec(var)
  return spec, meta.get("mesh")


def _single_device(x: Any) -> bool:
  """A sharding onto one device, not a ``NamedSharding`` (read as replicated).

  Duck-typed: jax 0.12.1 deprecates the ``SingleDeviceSharding`` class name."""
  return (isinstance(x, Sharding) and not isinstance(x, NamedSharding)
          and len(x.device_set) == 1)


def _read(leaf: Any, rules: Rules | None, where: str) -> tuple[PartitionSpec, Any, Any]:
  """``(spec in mesh axes, mesh or None, kernel shape or None)`` of one base entry."""
  if leaf is None or _single_device(leaf):
    return PartitionSpec(), None, None
  if isinstance(leaf, PartitionSpec):
    return leaf, None, None
  if isinstance(leaf, NamedSharding):
    return leaf.spec, leaf.mesh, None
  if isinstance(leaf, Sharding):
    raise TypeError(f"{where}: cannot read a PartitionSpec from a {type(leaf).__name__}")
  if _is_flax_partitioned(leaf):
    return _logical_box_spec(leaf, rules, where), leaf.mesh, np.shape(leaf.value)
  if _trees.is_nnx_variable(leaf):
    value = leaf.get_value()
    found = _variable_spec(leaf, rules)
    if found is None:
      return _read(value, rules, where)
    spec, mesh = found
    if mesh is None:
      mesh = getattr(getattr(value, "sharding", None), "mesh", None)
    return spec, mesh, np.shape(value)
  shape = tuple(leaf.shape) if hasattr(leaf, "shape") else None
  sharding = getattr(leaf, "sharding", None)
  if sharding is None or _single_device(sharding):
    return PartitionSpec(), None, shape
  if isinstance(sharding, NamedSharding):
    return sharding.spec, sharding.mesh, shape
  raise TypeError(f"{where}: cannot read a PartitionSpec from a {type(sharding).__name__}")


def _base_entries(base: Any) -> dict[tuple[Any, ...], Any]:
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(base, nnx.Module):
    base = nnx.state(base)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      base, is_leaf=lambda x: is_adapter(x) or _is_spec_leaf(x) or quantized.stored(x) is not None
  )
  return {  # adapters in the base tree (an adapted NNX model's state) are not kernels
      path_keys(kp): quantized.stored(leaf).qvalue if quantized.stored(leaf) is not None else leaf
      for kp, leaf in flat  # a quantized kernel is laid out as its codes
      if not (is_adapter(leaf) or (_trees.is_nnx_variable(leaf) and is_adapter(leaf.get_value())))
  }


def _candidates(keys: tuple[Any, ...], adapter: Adapter) -> list[tuple[Any, ...]]:
  """Paths where an adapter's kernel may sit in ``base`` (see ``adapter_shardings``)."""
  out = [keys, ("params", *keys)]
  if keys:
    out.append((*keys[:-1], "base", keys[-1]))
    if keys[-1] == "adapter":
      name = "embedding" if adapter.kind == "embed" else "kernel"
      out += [(*keys[:-1], "base", name), (*keys[:-1], name)]
  return out


def adapter_shardings(
    adapters: Any,
    base: Any,
    *,
    mesh: Any = None,
    rules: Rules | None = None,
) -> Any:
  """Shardings for an adapter tree, laid out like the kernels it adapts.

  Args:
    adapters: the adapter tree (arrays or ``jax.ShapeDtypeStruct``), keyed by
      kernel paths that mirror the base parameters; NNX ``Variable`` nodes
      holding adapters (``nnx.state(model, AdapterVariable)``) are accepted.
    base: the base parameters' shardings, mirroring the base parameters (see
      the module docstring for the accepted entries). An adapter at path
      ``p`` reads the entry at ``p``, else at ``("params", *p)`` (a Linen
      variables dict), else the NNX frontend's layouts: ``<module>/base/<kernel>``
      for an adapter keyed by its kernel path, and ``<module>/base/<kernel>`` or
      ``<module>/<kernel>`` for an ``AdapterVariable`` at ``<module>/adapter``.
    mesh: the device ``Mesh``. Given, the result holds ``NamedSharding`` on it;
      else ``NamedSharding`` on the mesh found with a kernel's entry (a
      ``NamedSharding``, a sharded array, a box's or Variable's ``mesh``), and
      ``PartitionSpec`` where none is found. An ``AbstractMesh`` found there
      only gives axis sizes.
    rules: logical-axis rules, ``((logical_name, mesh_axes), ...)``, for Linen
      ``LogicallyPartitioned`` boxes (used when a box has no rules of its own,
      in place of Flax's context rules) and NNX ``out_sharding`` names (in
      place of the context rules, combined with a Variable's
      ``sharding_rules``), translated as Flax does for each
      (``nn.logical_to_mesh_axes``; NNX's renaming). ``PartitionSpec`` and
      ``NamedSharding`` entries are mesh axes and are never translated
      (translate logical spec trees first, e.g. with ``nn.logical_to_mesh``).

  Returns:
    A tree with the structure of ``adapters`` in which every ``Adapter``'s data
    fields hold its shardings (``None`` fields stay ``None``), laid out as the
    module docstring's table says; ready for ``jax.device_put`` and the
    ``in_shardings`` / ``out_shardings`` of ``jax.jit``.

  Raises:
    ValueError: no base entry for an adapter, a kernel shape that differs from
      the adapter's, an invalid spec (see ``adapter_spec``), or logical names
      without rules.
    TypeError: a non-adapter leaf in ``adapters`` or an unreadable sharding.
  """
  entries = _base_entries(base)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      adapters, is_leaf=lambda x: is_adapter(x) or _trees.is_nnx_variable(x)
  )
  out = []
  for kp, leaf in flat:
    keys = path_keys(kp)
    where = f"adapter at {path_str(keys)!r}"
    var = leaf if _trees.is_nnx_variable(leaf) else None
    ad = var.get_value() if var is not None else leaf
    if not is_adapter(ad):
      raise TypeError(f"the adapter tree holds a non-Adapter leaf at {path_str(keys)!r}: {ad!r}")
    found = next((k for k in _candidates(keys, ad) if k in entries), None)
    if found is None:
      raise ValueError(f"{where}: no entry for its kernel in the base shardings")
    where = f"{where} (kernel {path_str(found)!r})"
    spec, kmesh, shape = _read(entries[found], rules, where)
    if shape is not None and tuple(shape) != ad.kernel_shape:
      raise ValueError(f"{where}: the kernel has shape {tuple(shape)}, the adapter is for "
                       f"{ad.kernel_shape}")
    sizes_mesh = mesh if mesh is not None else kmesh
    try:
      specs = adapter_spec(ad, spec, mesh=sizes_mesh)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    out_mesh = mesh if mesh is not None else (
        kmesh if isinstance(kmesh, jax.sharding.Mesh) else None)
    if out_mesh is not None:
      specs = dataclasses.replace(specs, **{
          f: None if getattr(specs, f) is None else NamedSharding(out_mesh, getattr(specs, f))
          for f in _FIELDS
      })
    out.append(var.replace(specs) if var is not None else specs)
  return treedef.unflatten(out)


# Optimizer state.




@dataclasses.dataclass(frozen=True)
class _Ctx:
  mesh: Any

  @property
  def replicated(self) -> Any:
    return PartitionSpec() if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  def sharding(self, s: Any) -> Any:
    if s is None:
      return self.replicated
    if self.mesh is not None and isinstance(s, PartitionSpec):
      return NamedSharding(self.mesh, s)
    return s


def _same_shape(x: Any, ref: Any) -> bool:
  return tuple(np.shape(x)) == tuple(np.shape(ref))


def _map_mirror(node: Any, ref: Any, sh: Any, ctx: _Ctx) -> Any:
  """Shardings for a per-parameter copy ``node`` of ``ref``, whose shardings are ``sh``."""
  if isinstance(node, optax.MaskedNode):
    return node
  if is_adapter(ref):
    fields = {}
    for f in _FIELDS:
      x = getattr(node, f)
      s = getattr(sh, f) if is_adapter(sh) else sh
      if x is None or isinstance(x, optax.MaskedNode):
        fields[f] = x
      else:
        r = getattr(ref, f)
        fields[f] = ctx.sharding(s) if r is not None and _same_shape(x, r) else ctx.replicated
    return dataclasses.replace(node, **fields)
  ref_children, ref_def = _trees.children(ref)
  if _trees.is_leaf_def(ref_def):
    return ctx.sharding(sh) if _same_shape(node, ref) else ctx.replicated
  node_children, node_def = _trees.children(node)
  if _is_spec_leaf(sh):  # one sharding for the whole subtree
    sh_children = [sh] * len(ref_children)
  else:
    sh_children = ref_def.flatten_up_to(sh)
  return node_def.unflatten(
      [_map_mirror(n, r, s, ctx) for n, r, s in zip(node_children, ref_children, sh_children)]
  )


def _walk(node: Any, ref: Any, sh: Any, ctx: _Ctx) -> Any:
  if _trees.mirrors(ref, node):
    return _map_mirror(node, ref, sh, ctx)
  children, treedef = _trees.children(node)
  if _trees.is_leaf_def(treedef):
    return ctx.replicated
  return treedef.unflatten([_walk(c, ref, sh, ctx) for c in children])


def opt_state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    shardings: Any,
    *,
    mesh: Any = None,
) -> Any:
  """Shardings for ``tx.init(params)``: per-parameter state sharded like its parameter.

  The state's structure comes from ``jax.eval_shape(tx.init, params)``. Every
  subtree of it that mirrors ``params`` (its containers, with an ``Adapter``
  wherever ``params`` has one; ``optax.MaskedNode`` may stand for any subtree)
  is a per-parameter copy: Adam's ``mu`` / ``nu``, ``optax.MultiSteps``'
  accumulated gradients, the masked copies of ``optax.masked`` /
  ``optax.partition``, and the inner state of ``sds_lora``, whose adapters lack
  ``qa``, ``qb``, ``sds_on`` and ``stamp`` (``trainable_params``). Its entries
  get the sharding of the parameter entry they copy when their shape is that
  entry's; everything else (step counts, schedule state, factored moments of
  another shape, ...) is replicated.

  Args:
    tx: the optimizer (e.g. ``sds_lora(optax.adamw(...))``).
    params: the parameters it is initialised on (arrays or
      ``jax.ShapeDtypeStruct``), e.g. the adapter tree.
    shardings: their shardings, the structure of ``params`` (e.g. from
      ``adapter_shardings``; a ``PartitionSpec`` / ``Sharding`` may stand for
      a whole subtree).
    mesh: turns ``PartitionSpec`` into ``NamedSharding``; ``None``: the mesh
      of the first ``NamedSharding`` in ``shardings``, else ``PartitionSpec``
      results.

  Returns:
    A tree with the structure of the optimizer state (``None`` where the state
    has ``None``), usable as ``out_shardings`` of a jitted ``tx.init`` and
    ``in_shardings`` of a jitted update step.
  """
  params, shardings = _trees.unwrap_variables(params), _trees.unwrap_variables(shardings)
  state = jax.eval_shape(tx.init, params)
  ref = jax.eval_shape(lambda p: p, params)
  if mesh is None:
    named = [s for s in jax.tree.leaves(shardings, is_leaf=_is_spec_leaf)
             if isinstance(s, NamedSharding)]
    mesh = named[0].mesh if named else None
  return _walk(state, ref, shardings, _Ctx(mesh))
