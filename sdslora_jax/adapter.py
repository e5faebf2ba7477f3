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
  """

  a: jax.Array
  b: jax.Array
  qa: jax.Array | None = None
  qb: jax.Array | None = None
  sds_on: jax.Array | None = None
  method: str = "lora"
  scale: float = 1.0

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    """The ``(d_in, d_out)`` shape of the kernel update."""
    return self.a.shape[0], self.b.shape[-1]


jax.tree_util.register_dataclass(
    Adapter, data_fields=["a", "b", "qa", "qb", "sds_on"], meta_fields=["method", "scale"]
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
