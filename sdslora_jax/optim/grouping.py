"""SDS adapters stacked into groups of alike ones: ``sds_lora``'s update runs once per group.

Adapters alike in factor shapes, dtypes and scale (a transformer's q/k/v/o projections;
every layer of a scanned stack) are stacked along one leading axis, so that the switch
(SVD), the basis refresh and the stamps run once per group, and the QRs once per factor
shape (shared by the switch and the refresh): a model's update holds a few
factorisations whatever its number of adapters. What grows per adapter is the inner
optimizer's per-leaf work and the stacking and slicing of its arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sdslora_jax import _batching


@dataclasses.dataclass
class Group:
  """SDS adapters alike in shapes, dtypes and scale, stacked along one leading axis.

  Each member's layer axes (a stacked adapter's) are flattened into the group
  axis; ``members`` records ``(leaf index, layer shape)`` in stacking order.
  ``ua``, ``ub`` are the inner optimizer's updates of the factors.
  """

  members: list
  scale: float
  a: jax.Array
  b: jax.Array
  qa: jax.Array
  qb: jax.Array
  sds_on: jax.Array
  stamp: jax.Array | None
  ua: jax.Array
  ub: jax.Array

  @property
  def n(self) -> int:
    return self.a.shape[0]

  def unstack(self, *arrays: jax.Array) -> dict[int, tuple]:
    """``{leaf index: (member's slice of each array, layer axes restored)}``."""
    leads = [lead for _, lead in self.members]
    parts = [_batching.split(x, leads) for x in arrays]
    return {i: tuple(p[n] for p in parts) for n, (i, _) in enumerate(self.members)}


def stack_groups(adapters: dict[int, Any], updates: dict[int, tuple]) -> list[Group]:
  """Stacks SDS adapters (and their factor updates) into ``Group``s, in a fixed order."""
  def sig(i):
    p = adapters[i]
    return _batching.signature((p.a, p.b, p.qa, p.qb, p.sds_on, *updates[i]), (2, 2, 2, 2, 0, 2, 2)) + (
        p.scale, p.stamp is None)

  groups = []
  for idx in _batching.group([(i, sig(i)) for i in adapters]):
    def stack(get, tail, idx=idx):
      return _batching.stack([get(i) for i in idx], tail)[0]

    leads = [tuple(adapters[i].a.shape[:-2]) for i in idx]
    first = adapters[idx[0]]
    groups.append(Group(
        members=list(zip(idx, leads)), scale=first.scale,
        a=stack(lambda i: adapters[i].a, 2), b=stack(lambda i: adapters[i].b, 2),
        qa=stack(lambda i: adapters[i].qa, 2), qb=stack(lambda i: adapters[i].qb, 2),
        sds_on=stack(lambda i: adapters[i].sds_on, 0),
        stamp=None if first.stamp is None else stack(lambda i: adapters[i].stamp, 0),
        ua=stack(lambda i: updates[i][0], 2), ub=stack(lambda i: updates[i][1], 2),
    ))
  return groups
