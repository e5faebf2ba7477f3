"""Structural helpers for trees that mirror an adapter tree (optimizer states).

An optimizer state "mirrors" the parameters where it has the parameters'
containers with an ``Adapter`` wherever they have one (``optax.MaskedNode`` may
stand for any subtree): Adam's ``mu`` and ``nu``, masked copies inside
``optax.partition``, ... ``sds_lora`` resets such subtrees at the switch and
``sharding`` gives them the parameters' shardings. Both also meet Flax NNX
``Variable`` nodes around adapters (``nnx.state(model)``), recognised here
without importing Flax.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from sdslora_jax.adapter import is_adapter


def children(x: Any) -> tuple[list[Any], Any]:
  """Flattens one level of ``x``."""
  return jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)


def is_leaf_def(treedef: Any) -> bool:
  return treedef.num_nodes == 1 and treedef.num_leaves == 1


def mirrors(ref: Any, node: Any) -> bool:
  """Whether ``node`` is a per-parameter copy of ``ref`` (``MaskedNode`` stands for any subtree)."""
  if isinstance(node, optax.MaskedNode):
    return True
  if is_adapter(ref) or is_adapter(node):
    return is_adapter(ref) and is_adapter(node)
  ref_children, ref_def = children(ref)
  node_children, node_def = children(node)
  if is_leaf_def(ref_def):
    return is_leaf_def(node_def)
  if ref_def != node_def:
    return False
  return all(mirrors(r, n) for r, n in zip(ref_children, node_children))


def is_nnx_variable(x: Any) -> bool:
  """A Flax NNX ``Variable`` (duck-typed: the core does not import Flax)."""
  return all(callable(getattr(x, m, None)) for m in ("get_value", "get_metadata"))


def unwrap_variables(tree: Any) -> Any:
  """``tree`` with every NNX ``Variable`` node replaced by its value."""
  if not any(is_nnx_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_nnx_variable)):
    return tree
  return jax.tree.map(lambda x: x.get_value() if is_nnx_variable(x) else x, tree,
                      is_leaf=is_nnx_variable)
