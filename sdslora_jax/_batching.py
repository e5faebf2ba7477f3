"""Batching alike items: one computation per group instead of one per adapter.

A model's adapters come in a few shapes (a transformer's q/k/v/o projections
share one), so the library's per-adapter linear algebra (QRs, SVDs, stamp
hashes) runs once per group of alike items on arrays stacked along a leading
axis, and the program does not grow with the number of adapters. An item is a
tuple of arrays; array ``k`` of an item has leading axes (a stacked adapter's
layers, the same for all arrays of the item) and ``tails[k]`` trailing axes.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def signature(arrays: Sequence[Any], tails: Sequence[int]) -> tuple:
  """Trailing shapes and dtypes: items with equal signatures can be stacked."""
  return tuple((tuple(jnp.shape(x)[jnp.ndim(x) - t:]), jnp.dtype(jnp.result_type(x)))
               for x, t in zip(arrays, tails))


def group(keys_and_signatures: Sequence[tuple[Hashable, Hashable]]) -> list[list[Hashable]]:
  """Keys with equal signatures, in first-seen order (a fixed order: one program)."""
  groups: dict[Hashable, list] = {}
  for key, sig in keys_and_signatures:
    groups.setdefault(sig, []).append(key)
  return list(groups.values())


def stack(arrays: Sequence[Any], tail: int) -> tuple[jax.Array, list[tuple[int, ...]]]:
  """Arrays with equal trailing shapes flattened to one batch axis and concatenated.

  Returns ``(stacked, leads)``: ``stacked`` is ``(n, *tail_shape)``, ``leads``
  the leading shapes, for ``split``.
  """
  leads = [tuple(jnp.shape(x)[: jnp.ndim(x) - tail]) for x in arrays]
  flat = [jnp.reshape(jnp.asarray(x), (-1, *jnp.shape(x)[jnp.ndim(x) - tail:])) for x in arrays]
  return jnp.concatenate(flat), leads


def split(x: jax.Array, leads: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """Inverse of ``stack``: ``x``'s batch axis cut and reshaped back to each leading shape."""
  offsets = np.cumsum([0] + [int(np.prod(lead, dtype=np.int64)) for lead in leads])
  return [jnp.reshape(x[offsets[n]:offsets[n + 1]], (*lead, *x.shape[1:]))
          for n, lead in enumerate(leads)]


def map_groups(fn: Callable[..., tuple], items: Mapping[Hashable, tuple],
               tails: Sequence[int]) -> dict[Hashable, tuple]:
  """``fn`` applied to every item, one batched call per group of alike items.

  ``fn`` takes the group's stacked arrays (a leading batch axis each) and
  returns a tuple of arrays with that batch axis; the result maps each key to
  its slices, leading axes restored.
  """
  out = {}
  for keys in group([(k, signature(items[k], tails)) for k in items]):
    stacked = [stack([items[k][j] for k in keys], t) for j, t in enumerate(tails)]
    leads = stacked[0][1]
    results = [split(r, leads) for r in fn(*(s for s, _ in stacked))]
    for n, k in enumerate(keys):
      out[k] = tuple(r[n] for r in results)
  return out
