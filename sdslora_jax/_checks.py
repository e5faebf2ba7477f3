"""Shape checks done in Python, before anything is traced."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

Shape = Sequence[int]


def check_tall_matrix(name: str, shape: Shape) -> None:
  if len(shape) != 2:
    raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(shape)}")
  n, r = shape
  if r > n:
    raise ValueError(
        f"{name} of shape {tuple(shape)} has more columns ({r}) than rows ({n}); "
        "an orthonormal basis needs n >= r"
    )


def check_factors(
    a: Shape,
    b: Shape,
    *,
    qa: Shape | None = None,
    qb: Shape | None = None,
    x: Shape | None = None,
) -> tuple[int, int, int]:
  """Validates LoRA factor shapes; returns ``(d_in, r, d_out)``.

  ``a`` is ``(d_in, r)``, ``b`` is ``(r, d_out)``, ``qa`` must match ``a``,
  ``qb`` is ``(d_out, r)`` and ``x`` is ``(..., d_in)``.
  """
  a, b = tuple(a), tuple(b)
  if len(a) != 2 or len(b) != 2:
    raise ValueError(
        f"factors must be 2-D: a (d_in, r) and b (r, d_out); got a {a} and b {b}"
    )
  d_in, r = a
  r_b, d_out = b
  if r != r_b:
    raise ValueError(
        f"inner dimensions of the factors differ: a {a} has rank {r}, b {b} has "
        f"rank {r_b}"
    )
  if r < 1:
    raise ValueError(f"rank must be at least 1, got a {a} and b {b}")
  if r > min(d_in, d_out):
    raise ValueError(
        f"rank r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} for a {a} and "
        f"b {b}"
    )
  if qa is not None and tuple(qa) != (d_in, r):
    raise ValueError(f"basis qa must have shape {(d_in, r)} like a, got {tuple(qa)}")
  if qb is not None and tuple(qb) != (d_out, r):
    raise ValueError(
        f"basis qb must have shape {(d_out, r)} (the shape of b.T), got {tuple(qb)}"
    )
  if x is not None and (len(x) < 1 or x[-1] != d_in):
    raise ValueError(
        f"input x of shape {tuple(x)} does not match a {a}: the last axis of x "
        f"must be d_in={d_in}"
    )
  return d_in, r, d_out


def check_scale(scale) -> float:
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise TypeError(f"scale must be a Python real number, got {scale!r}")
  scale = float(scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be finite and positive, got {scale}")
  return scale


def check_rank(rank: Any) -> int:
  """A rank must be a positive Python / numpy integer (not a bool, not a float)."""
  if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral):
    raise ValueError(f"rank must be a positive int, got {rank!r} ({type(rank).__name__})")
  rank = operator.index(rank)
  if rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank}")
  return rank


def check_float(name: str, dtype: Any) -> None:
  """Refuses non-floating dtypes (integer, bool, complex) with a ``ValueError``.

  Integer activations or factors would be truncated by the matmuls (an int32
  input gives int32 zeros) and complex ones lose their imaginary part, so the
  library refuses them instead of promoting silently.
  """
  if dtype is None:
    return
  try:
    dt = np.dtype(dtype)
  except TypeError:
    dt = None
  import jax.numpy as jnp  # local: keeps this module importable without JAX set-up

  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
        f"{name} must have a real floating dtype (float32, bfloat16, float16, float64), "
        f"got {dt.name if dt is not None else dtype}; cast integer inputs "
        "(e.g. x.astype(jnp.float32)) before the adapter"
    )


def check_float_arrays(**arrays: Any) -> None:
  """``check_float`` on the dtype of every given array that is not ``None``."""
  for name, value in arrays.items():
    if value is not None:
      check_float(name, getattr(value, "dtype", None) or np.result_type(value))
