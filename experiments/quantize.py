"""A frozen base stored quantized with qwix (QLoRA), for the trainer and the benchmarks.

``quantize_base`` stores chosen kernels as qwix ``QArray``s; ``dequantized`` is what a
model function calls on its parameters to read them back where it uses them, the way
qwix's own quantized models do (codes, then scale). The op-level path
(``sdslora_jax.intercept``) recognises that dequantization at each kernel's matmul and
multiplies block by block instead, so the float kernel is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdslora_jax import quantized
from sdslora_jax.targets import path_str

QUANTIZATIONS = ("none", "int8", "int4", "nf4")


def is_kernel(path: str, x: Any) -> bool:
  """A ``.../kernel`` leaf with two or more axes outside the head (the trainer's choice)."""
  return path.split("/")[-1] == "kernel" and path.split("/")[0] != "head" and np.ndim(x) >= 2


def quantize_base(params: Any, qtype: str, tile: int = 64, *,
                  select: Callable[[str, Any], bool] = is_kernel,
                  in_axes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
  """``params`` with every selected leaf stored as ``qtype`` ("int8", "int4", "nf4").

  Scales are per output channel: every axis but the contracted ones (``in_axes[path]``,
  e.g. from ``sdslora_jax.intercept.layouts``; else axis 0). 4-bit types also get one
  scale per ``tile`` entries of the first contracted axis where it divides (QLoRA's
  blocks).
  """
  import qwix

  if qtype not in QUANTIZATIONS[1:]:
    raise ValueError(f"quantization {qtype!r} is not one of {QUANTIZATIONS[1:]}")

  def one(kp, x):
    path = path_str(kp)
    if not select(path, x):
      return x
    contracted = tuple((in_axes or {}).get(path, (0,)))
    channels = [a for a in range(np.ndim(x)) if a not in contracted]
    first = contracted[0]
    tiled = ({first: tile} if qtype != "int8" and np.shape(x)[first] % tile == 0
             and np.shape(x)[first] > tile else None)
    return qwix.quantize(jnp.asarray(x, jnp.float32), qtype, channelwise_axes=channels,
                         tiled_axes=tiled)

  return jax.tree_util.tree_map_with_path(one, params)


def dequantized(params: Any) -> Any:
  """``params`` with every quantized leaf replaced by its float value (inside a model)."""
  import qwix
  is_q = lambda z: quantized.stored(z) is z
  return jax.tree.map(lambda z: qwix.dequantize(z) if is_q(z) else z, params, is_leaf=is_q)


def device_bytes(tree: Any) -> int:
  """Bytes the arrays of ``tree`` take on their device (4-bit types packed two per byte)."""
  return sum(int(x.on_device_size_in_bytes()) for x in jax.tree.leaves(tree))
