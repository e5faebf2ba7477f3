"""A frozen kernel stored quantized, dequantized one block at a time inside its matmul.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) keeps the frozen base in 4 or 8
bits and the adapters in full precision. The stored form read here is qwix's
``QArray`` (``qvalue`` codes, ``scale``, optional ``zero_point``, and ``qtype``),
whose value is ``(codes - zero_point) * scale`` with the scale "generically
broadcast": a scale axis of size 1 is shared, one of the kernel's size is per
channel, one of ``size / t`` is per tile of ``t``. Non-uniform types (nf4) map
codes through a table first.

``blocked_dot_general`` computes ``x @ W`` for such a ``W`` without ever forming
``W`` in floating point: a loop over blocks of one output axis dequantizes a
block, multiplies, writes the block's columns and drops it; the backward pass
(rematerialized per block) does the same for ``dx``. The temporary float copy is
one block: at most half the kernel, about ``BLOCK_BYTES`` for a large one.

No Flax or qwix import here: the arrays are read by their field names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__: list[str] = []  # internal: used by the library, not part of its API

# The array fields of a quantized weight, as qwix's ``QArray`` names them.
PARTS = ("qvalue", "scale", "zero_point")
# A kernel is split into about (float bytes / BLOCK_BYTES) blocks, at least 2 (no float
# copy of the whole kernel), at most MAX_BLOCKS (each block is one loop iteration: on a
# 2-core CPU, 2 blocks cost 1.17x the float step, 8 blocks 1.30x, d = 1024).
BLOCK_BYTES = 4 * 2**20
MAX_BLOCKS = 16

_UNIFORM = {f"int{b}" for b in range(2, 9)} | {f"uint{b}" for b in range(2, 9)} | {
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e3m4", "bfloat16", "float16"}
# NormalFloat4's code values (QLoRA, Appendix E). The op-level path uses the model's own
# lookup table; this one serves merges and exports outside a model.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_TABLE = {"nf4": NF4}  # codes index a table of values


def readable(qtype: Any) -> bool:
  """Whether this module can dequantize a weight of logical type ``qtype``."""
  name = _qtype_name(qtype)
  return name in _UNIFORM or name in _TABLE


def _qtype_name(qtype: Any) -> str:
  return str(getattr(qtype, "name", qtype))


def stored(node: Any) -> Any:
  """The quantized array in a parameter-tree node (a ``QArray``, or one wrapped in a
  node's ``array`` field as qwix's ``WithAux`` does), else ``None``."""
  for z in (node, getattr(node, "array", None)):
    if hasattr(z, "qvalue") and hasattr(z, "scale"):
      return z
  return None


def value(node: Any, dtype: Any = None) -> jax.Array:
  """The float value of a quantized node (see ``stored``), in its scale's dtype."""
  q = stored(node)
  name = _qtype_name(getattr(q, "qtype", None) or q.qvalue.dtype)
  if not readable(name):
    raise ValueError(f"quantized type {name!r} cannot be dequantized here (readable: integer, "
                     "float8 and nf4 types)")
  table = _TABLE.get(name)
  return dequantize(q.qvalue, q.scale, getattr(q, "zero_point", None),
                    None if table is None else jnp.asarray(table, q.scale.dtype), dtype)


def logical(params: Any) -> Any:
  """``params`` with each quantized node replaced by its logical shape and float dtype
  (a ``jax.ShapeDtypeStruct``): what code that reads kernel paths and shapes expects."""
  return jax.tree.map(
      lambda z: jax.ShapeDtypeStruct(stored(z).qvalue.shape, stored(z).scale.dtype)
      if stored(z) is not None else z, params, is_leaf=lambda z: stored(z) is not None)


def _broadcast(op, x: jax.Array, y: jax.Array) -> jax.Array:
  """``op(x, y)`` with ``y``'s axes shared (size 1), per index, or per tile of ``x``."""
  if x.ndim != y.ndim:
    raise ValueError(f"quantized parts of different ranks: {x.shape} and {y.shape}")
  xs, ys = [], []
  for a, b in zip(x.shape, y.shape):
    if a == b or b == 1:
      xs.append(a)
      ys.append(b)
    elif a % b == 0:
      xs += [b, a // b]
      ys += [b, 1]
    else:
      raise ValueError(f"scale of shape {y.shape} does not tile a kernel of shape {x.shape}")
  return op(x.reshape(xs), y.reshape(ys)).reshape(x.shape)


def dequantize(qvalue: jax.Array, scale: jax.Array, zero_point: jax.Array | None = None,
               table: jax.Array | None = None, dtype: Any = None) -> jax.Array:
  """The float value of quantized codes: ``(table[codes] - zero_point) * scale``.

  Computed in ``scale.dtype`` (as qwix does), then cast to ``dtype``.
  """
  v = qvalue if table is None else jnp.take(table, qvalue.astype(jnp.int32), mode="clip")
  v = v.astype(scale.dtype)
  if zero_point is not None:
    v = _broadcast(jnp.subtract, v, zero_point.astype(v.dtype))
  v = _broadcast(jnp.multiply, v, scale)
  return v if dtype is None else v.astype(dtype)


def _tile(size: int, part: jax.Array | None, axis: int) -> int:
  """The block-size granule a part imposes on ``axis``: 1 if shared or per index."""
  if part is None or part.shape[axis] in (1, size):
    return 1
  return size // part.shape[axis]


def block_count(size: int, tile: int, target: int) -> int:
  """The smallest number of whole-tile blocks that is at least ``target`` (or all tiles)."""
  tiles = size // tile
  return next(n for n in range(1, tiles + 1) if tiles % n == 0 and n >= min(target, tiles))


def blocked_dot_general(x: jax.Array, parts: dict[str, jax.Array], *, w_side: int,
                        dimension_numbers, table: jax.Array | None = None, dtype: Any,
                        precision=None, preferred_element_type=None,
                        blocks: int | None = None) -> jax.Array:
  """``lax.dot_general`` of ``x`` and a quantized kernel, dequantized block by block.

  Args:
    x: the other operand.
    parts: ``{"qvalue", "scale", "zero_point"?}`` of the kernel, in its local shape.
    w_side: 1 if the kernel is the right operand of the ``dot_general``, else 0.
    dimension_numbers: as ``lax.dot_general`` takes them.
    table: the code table of a non-uniform type (nf4), else ``None``.
    dtype: the dtype the kernel enters the op in (the model's own cast).
    blocks: about how many blocks to split the kernel into; default from the
      kernel's float size (``BLOCK_BYTES``, at least 2, at most ``MAX_BLOCKS``).

  Returns:
    The same value as ``dot_general`` on the dequantized kernel. Differentiable in
    ``x``; the kernel is frozen (no gradient for its parts).
  """
  q, scale, zp = parts["qvalue"], parts["scale"], parts.get("zero_point")
  (lc, rc), (lb, rb) = dimension_numbers
  wc, wb = (rc, rb) if w_side == 1 else (lc, lb)
  free = [d for d in range(q.ndim) if d not in wc and d not in wb]
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)

  def dot(w):
    return lax.dot_general(x, w, dimension_numbers, **kw) if w_side == 1 else lax.dot_general(
        w, x, dimension_numbers, **kw)

  if blocks is None:
    nbytes = q.size * jnp.dtype(dtype).itemsize
    blocks = min(MAX_BLOCKS, max(2, -(-nbytes // BLOCK_BYTES)))
  # Block along the free axis that splits into the most blocks (ties: the largest).
  best = None
  for d in free:
    tile = max(_tile(q.shape[d], scale, d), _tile(q.shape[d], zp, d))
    if tile and q.shape[d] % tile == 0:
      n = block_count(q.shape[d], tile, blocks)
      if best is None or (n, q.shape[d]) > (best[1], q.shape[best[0]]):
        best = (d, n)
  if best is None or best[1] == 1:
    return dot(dequantize(q, scale, zp, table, dtype))
  axis, n = best

  names = [k for k in ("qvalue", "scale", "zero_point") if parts.get(k) is not None]

  @jax.checkpoint  # the backward pass dequantizes the block again instead of saving it
  def block(k):
    p = {}
    for name in names:  # a window of each part (a part shared along the axis stays whole)
      a = parts[name]
      step = a.shape[axis] // n if a.shape[axis] != 1 else 0
      p[name] = lax.dynamic_slice_in_dim(a, k * step, step, axis) if step else a
    return dot(dequantize(p["qvalue"], p["scale"], p.get("zero_point"), table, dtype))

  nb = len(wb)
  lhs_free = [d for d in range(x.ndim if w_side == 1 else q.ndim) if d not in lc and d not in lb]
  pos = nb + (len(lhs_free) + free.index(axis) if w_side == 1 else free.index(axis))
  shape = jax.eval_shape(block, 0)
  out_shape = shape.shape[:pos] + (shape.shape[pos] * n,) + shape.shape[pos + 1:]

  def write(k, y):  # each block's columns written in place: no stacked copy to transpose
    return lax.dynamic_update_slice_in_dim(y, block(k), k * shape.shape[pos], pos)

  return lax.fori_loop(0, n, write, jnp.zeros(out_shape, shape.dtype))

