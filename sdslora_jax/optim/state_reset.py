"""The inner optimizer's state across the SDS-LoRA switch: which entries restart.

Moment reset rule (structural). A subtree of the inner state "mirrors" the
parameters when it has the containers of the tree the inner optimizer sees,
with an ``Adapter`` wherever that tree has one (``optax.MaskedNode`` may stand
for any subtree): Adam's ``mu`` and ``nu``, the masked copies inside
``optax.partition``, factored second moments, stored parameter copies, ... In
such a subtree, the ``a`` and ``b`` entries of every adapter that switches are
replaced by their values in a freshly initialised inner state, ``inner.init``
of the switched parameters, with one exception below. The state of every other
leaf carries on unchanged.

Step counts. A state node whose direct children include both mirroring
subtrees and an integer scalar (``ScaleByAdamState(count, mu, nu)``, Lion,
AMSGrad, Novograd, ...) keeps that scalar as its per-parameter statistics'
step count (Adam's bias correction). Such a count is restarted (set to its
fresh value) together with the moments iff every trainable leaf its mirroring
subtrees cover (``MaskedNode`` entries excluded) is a factor of an SDS adapter
that switches at this update: the factors then restart exactly like a fresh
optimizer, with no post-switch step-size spike. Otherwise (the node also
covers, e.g., a head, a LoRA adapter, or an SDS adapter that is not switching
now) the count continues for the other leaves and, for the switching factors,
only the non-second-moment entries are reset: the second moments (fields
``nu``, ``nu_max``) are kept, so that bias correction at the continued count
is not applied to freshly zeroed second moments (which would scale the first
post-switch updates up to ``~5 x`` the learning rate after a 1000-step warm-up;
kept second moments only enlarge Adam's denominator, so the steps are never
larger than with zeroed ones for the same gradients).
Counts that do not sit next to mirroring subtrees (``ScaleByScheduleState``,
``inject_hyperparams``' count, ``sds_lora``'s own count, ...) always continue,
so learning-rate schedules run on across the switch. An optimizer that stores
per-parameter state in another layout (e.g. a flat list) is not reset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sdslora_jax import _trees
from sdslora_jax.adapter import is_adapter


def _bcast(flag: jax.Array, x: jax.Array) -> jax.Array:
  """A per-layer flag (shape ``L``) broadcast against a per-layer array (``(*L, ...)``)."""
  flag = jnp.asarray(flag)
  return flag.reshape(flag.shape + (1,) * (jnp.ndim(x) - flag.ndim))


# Per-parameter fields kept (not zeroed) for switching factors when the step
# count next to them cannot be restarted: second-moment estimates.
_SECOND_MOMENTS = frozenset({"nu", "nu_max"})


def _reset_mirror(ref: Any, old: Any, fresh: Any, flags: dict[int, jax.Array]) -> Any:
  """Resets the factors of flagged adapters inside a per-parameter subtree."""
  if isinstance(old, optax.MaskedNode):
    return old
  if is_adapter(ref):
    flag = flags.get(id(ref))
    if flag is None:
      return old

    def select(f, o):
      return jax.tree.map(lambda fl, ol: jnp.where(_bcast(flag, ol), fl, ol).astype(ol.dtype),
                          f, o)

    return dataclasses.replace(old, a=select(fresh.a, old.a), b=select(fresh.b, old.b))
  ref_children, ref_def = _trees.children(ref)
  if _trees.is_leaf_def(ref_def):
    return old
  old_children, old_def = _trees.children(old)
  fresh_children, _ = _trees.children(fresh)
  return old_def.unflatten(
      [_reset_mirror(r, o, f, flags) for r, o, f in zip(ref_children, old_children, fresh_children)]
  )


def _coverage(ref: Any, node: Any, flags: dict[int, jax.Array], sw: list[jax.Array]) -> bool:
  """Appends the switch flags of covered SDS factors; whether other leaves are covered."""
  if isinstance(node, optax.MaskedNode):
    return False
  if is_adapter(ref):
    covered = [not isinstance(x, optax.MaskedNode) for x in (node.a, node.b)]
    if id(ref) not in flags:
      return any(covered)
    sw.extend(flags[id(ref)] for c in covered if c)
    return False
  ref_children, ref_def = _trees.children(ref)
  if _trees.is_leaf_def(ref_def):
    return True
  node_children, _ = _trees.children(node)
  other = [_coverage(r, n, flags, sw) for r, n in zip(ref_children, node_children)]
  return any(other)


def _is_count(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.ndim(x) == 0 and jnp.issubdtype(dtype, jnp.integer)


def _key_name(path: tuple[Any, ...]) -> Any:
  key = path[-1]
  return getattr(key, "name", getattr(key, "key", None))


def reset_switched(ref: Any, old: Any, fresh: Any, flags: dict[int, jax.Array]) -> Any:
  """The inner state ``old`` with the switching factors' entries reset (module docs).

  ``ref`` is the tree the inner optimizer sees, ``fresh`` its freshly initialised
  state for the switched parameters, ``flags`` maps ``id`` of an adapter in ``ref``
  to its (traced) switch flag; other adapters and leaves carry on unchanged.
  """
  if _trees.mirrors(ref, old):
    return _reset_mirror(ref, old, fresh, flags)
  with_path, old_def = jax.tree_util.tree_flatten_with_path(old, is_leaf=lambda y: y is not old)
  if not with_path or _trees.is_leaf_def(old_def):
    return old
  names = [_key_name(path) for path, _ in with_path]
  old_children = [c for _, c in with_path]
  fresh_children, _ = _trees.children(fresh)
  mirror = [not isinstance(c, optax.MaskedNode) and _trees.mirrors(ref, c) for c in old_children]
  count = [_is_count(c) for c in old_children]
  restart = None  # None: no count next to mirrors; else a bool (array): restart it
  if any(mirror) and any(count):
    sw = []  # every covered leaf visited (no short-circuit): it collects all flags
    other = [_coverage(ref, c, flags, sw) for c, m in zip(old_children, mirror) if m]
    restart = False if any(other) or not sw else jnp.all(jnp.stack([jnp.all(f) for f in sw]))
  kept_flags = flags
  if restart is not None:
    kept_flags = {} if restart is False else {k: v & restart for k, v in flags.items()}
  out = []
  for name, o, f, m, c in zip(names, old_children, fresh_children, mirror, count):
    if m:
      out.append(_reset_mirror(ref, o, f, kept_flags if name in _SECOND_MOMENTS else flags))
    elif c and restart is not None and restart is not False:  # a traced restart flag
      out.append(jnp.where(restart, f, o).astype(o.dtype))
    else:
      out.append(reset_switched(ref, o, f, flags))
  return old_def.unflatten(out)
