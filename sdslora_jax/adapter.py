"""One adapter on one 2-D kernel, as a pytree node.

``Adapter`` holds the trainable factors and, for SDS-LoRA, the bases and the
phase flag; ``method`` and ``scale`` are static metadata, so transforms over an
adapter tree (the Optax transforms, merging, export) can find every adapter with
``is_leaf=is_adapter`` and know how to treat it without side tables.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.basis import factor_bases
from sdslora_jax.ops import lora_delta, lora_matmul, sds_delta, warmup_sds_matmul

METHODS = ("lora", "sds")


@dataclasses.dataclass(frozen=True)
class Adapter:
  """LoRA or SDS-LoRA factors for one ``(d_in, d_out)`` kernel.

  Attributes:
    a: ``(d_in, r)`` down factor (trainable).
    b: ``(r, d_out)`` up factor (trainable).
    qa: ``(d_in, r)`` float32 basis of ``a`` (SDS-LoRA only; not trained by
      gradients, kept current by ``sdslora_jax.optim``).
    qb: ``(d_out, r)`` float32 basis of ``b.T`` (SDS-LoRA only).
    sds_on: float32 scalar, 0. during the plain-LoRA warm-up and 1. once the
      adapter runs as SDS-LoRA (SDS-LoRA only).
    method: ``"lora"`` or ``"sds"`` (static).
    scale: the adapter scale ``s`` (static).
    kernel_shape: shape of the targeted kernel when it is not simply
      ``(d_in, d_out)`` (static; ``None`` means the 2-D kernel ``(d_in, d_out)``).
    in_axes: kernel axes that form the input side, in kernel order (static;
      ``None`` means ``(0,)``). The update's ``d_in`` is the product of these
      axes' sizes and ``d_out`` that of the others, each flattened in kernel
      order.
    kind: ``"dense"`` (Dense, DenseGeneral, Einsum), ``"embed"``, ``"conv"``,
      or one of ``"conv_grouped"``, ``"conv_transpose"``, ``"conv_local"``
      (merged per call like ``"conv"``, not exportable to PEFT) (static;
      ``None`` means ``"dense"``); decides how the frontends apply the update
      and how it is exported.
  """

  a: jax.Array
  b: jax.Array
  qa: jax.Array | None = None
  qb: jax.Array | None = None
  sds_on: jax.Array | None = None
  method: str = "lora"
  scale: float = 1.0
  kernel_shape: tuple[int, ...] | None = None
  in_axes: tuple[int, ...] | None = None
  kind: str | None = None

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    """The ``(d_in, d_out)`` shape of the kernel update."""
    return self.a.shape[0], self.b.shape[-1]

  @property
  def target_shape(self) -> tuple[int, ...]:
    """Shape of the targeted kernel (``(d_in, d_out)`` unless ``kernel_shape`` is set)."""
    return self.shape if self.kernel_shape is None else tuple(self.kernel_shape)

  @property
  def input_axes(self) -> tuple[int, ...]:
    """Kernel axes forming the input side, in kernel order."""
    return (0,) if self.in_axes is None else tuple(self.in_axes)

  @property
  def output_axes(self) -> tuple[int, ...]:
    """Kernel axes forming the output side, in kernel order."""
    return tuple(i for i in range(len(self.target_shape)) if i not in self.input_axes)


jax.tree_util.register_dataclass(
    Adapter,
    data_fields=["a", "b", "qa", "qb", "sds_on"],
    meta_fields=["method", "scale", "kernel_shape", "in_axes", "kind"],
)


def is_adapter(x: Any) -> bool:
  return isinstance(x, Adapter)


def init_adapter(
    key: jax.Array,
    d_in: int,
    d_out: int,
    *,
    rank: int,
    scale: float,
    method: str = "sds",
    dtype: Any = jnp.float32,
    sds_on: bool = False,
) -> Adapter:
  """LoRA initialisation: ``a`` Kaiming-uniform (as in PEFT), ``b = 0``.

  The update is exactly zero, so the adapted model equals the base model. For
  ``method="sds"`` the adapter starts in the plain-LoRA warm-up
  (``sds_on=False``) unless asked otherwise; the bases are then ``orth(a)`` and
  a deterministic completion for ``b = 0``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown adapter method {method!r}; choose from {METHODS}")
  _checks.check_factors((d_in, rank), (rank, d_out))
  scale = _checks.check_scale(scale)
  bound = 1.0 / jnp.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on a (r, d_in) weight
  a = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound).astype(dtype)
  b = jnp.zeros((rank, d_out), dtype)
  if method == "lora":
    return Adapter(a=a, b=b, method="lora", scale=scale)
  qa, qb = factor_bases(a, b)
  return Adapter(
      a=a,
      b=b,
      qa=qa,
      qb=qb,
      sds_on=jnp.asarray(1.0 if sds_on else 0.0, jnp.float32),
      method="sds",
      scale=scale,
  )


def adapter_matmul(x: jax.Array, adapter: Adapter) -> jax.Array:
  """``x @ adapter_delta(adapter)`` through rank-r projections (no kernel-sized value)."""
  if adapter.method == "lora":
    return lora_matmul(x, adapter.a, adapter.b, scale=adapter.scale)
  return warmup_sds_matmul(
      x, adapter.a, adapter.b, adapter.qa, adapter.qb, adapter.sds_on, scale=adapter.scale
  )


def adapter_delta(adapter: Adapter) -> jax.Array:
  """The dense ``(d_in, d_out)`` update in float32 (merge and export path)."""
  a = adapter.a.astype(jnp.float32)
  b = adapter.b.astype(jnp.float32)
  if adapter.method == "lora":
    return lora_delta(a, b, scale=adapter.scale)
  sds = sds_delta(a, b, scale=adapter.scale, qa=adapter.qa, qb=adapter.qb)
  return jnp.where(adapter.sds_on > 0.5, sds, lora_delta(a, b, scale=adapter.scale))


def kernel_delta(adapter: Adapter) -> jax.Array:
  """The dense update in the targeted kernel's own shape and axis order (float32).

  ``adapter_delta`` is ``(d_in, d_out)``; it is unflattened to the input axes'
  and output axes' sizes and transposed back to the kernel's axis order.
  """
  delta = adapter_delta(adapter)
  shape = adapter.target_shape
  in_axes, out_axes = adapter.input_axes, adapter.output_axes
  split = tuple(shape[i] for i in in_axes) + tuple(shape[i] for i in out_axes)
  delta = delta.reshape(split)
  perm = in_axes + out_axes
  return jnp.transpose(delta, tuple(perm.index(i) for i in range(len(shape))))
