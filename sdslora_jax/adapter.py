"""One adapter on one 2-D kernel, as a pytree node.

``Adapter`` holds the trainable factors and, for SDS-LoRA, the bases and the
phase flag; ``method`` and ``scale`` are static metadata, so transforms over an
adapter tree (the Optax transforms, merging, export) can find every adapter with
``is_leaf=is_adapter`` and know how to treat it without side tables.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdslora_jax import _batching, _checks, fused
from sdslora_jax.basis import factor_bases, orthonormal_basis
from sdslora_jax.ops import (
    in_sds_phase,
    lora_delta,
    lora_matmul,
    sds_delta,
    warmup_sds_delta,
    warmup_sds_matmul,
)

__all__ = [
    "Adapter",
    "adapter_matmul",
    "init_adapter",
    "is_adapter",
    "kernel_delta",
    "restamp",
    "verify_stamps",
    "with_fresh_bases",
]

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
    kernel_shape: shape of the targeted kernel, layer axes included (static;
      left unset, the 2-D kernel ``(d_in, d_out)``).
    in_axes: kernel axes that form the input side, in kernel order (static;
      default ``(0,)``). The update's ``d_in`` is the product of these
      axes' sizes and ``d_out`` that of the others, each flattened in kernel
      order.
    stamp: float32 scalar, an exact integer hash of ``a``, ``b``, ``qa``, ``qb``
      and ``sds_on`` as left by the library (``init_adapter``, ``sds_lora``,
      ``restamp``) (SDS-LoRA only; ``None`` turns the check off). When
      gradients flow through an SDS adapter whose arrays no longer match
      their stamp, their gradients are NaN and ``verify_stamps`` names them:
      that is an adapter trained without ``sdslora_jax.optim.sds_lora``, or
      with a transformation chained after it (see ``guard``).
    kind: ``"dense"`` (Dense, DenseGeneral, Einsum), ``"embed"``, ``"conv"``,
      or one of ``"conv_grouped"``, ``"conv_transpose"``, ``"conv_local"``
      (merged per call like ``"conv"``, not exportable to PEFT) (static;
      default ``"dense"``); decides how the frontends apply the update
      and how it is exported.
    layer_axes: kernel axes that stack layers (``nn.scan`` / ``nnx.vmap``), in
      kernel order (static; default ``()``: an unstacked kernel). A stacked adapter
      holds one adapter per layer: ``a: (*L, d_in, r)``, ``b: (*L, r, d_out)``,
      ``qa: (*L, d_in, r)``, ``qb: (*L, d_out, r)``, ``sds_on`` and ``stamp``
      of shape ``L``, with ``L`` the sizes of the layer axes. ``in_axes`` index
      the full (stacked) kernel and never include a layer axis.
    fresh_bases: SDS-LoRA only (static): whether the bases span the factors
      whenever ``sds_on`` is 1, as they do when ``sds_lora`` refreshes them after
      every update (its default schedule). The adapter then runs as one rank-r
      op in both phases, at LoRA's cost (``ops.warmup_sds_matmul(...,
      fresh=True)``). ``False``: the exact two-branch op, for sparser refresh
      schedules (``sds_lora`` refuses those with ``fresh_bases`` adapters; set it
      with ``rule(..., fresh_bases=False)`` or ``with_fresh_bases``).
  """

  a: jax.Array
  b: jax.Array
  qa: jax.Array | None = None
  qb: jax.Array | None = None
  sds_on: jax.Array | None = None
  stamp: jax.Array | None = None
  method: str = "lora"
  scale: float = 1.0
  kernel_shape: tuple[int, ...] | None = None
  in_axes: tuple[int, ...] | None = None
  kind: str | None = None
  layer_axes: tuple[int, ...] | None = None
  fresh_bases: bool = True

  def __post_init__(self):
    # One value per meaning: the static fields left unset take their defaults here, so
    # adapters built either way have the same tree structure (and checkpoints written
    # with ``None`` restore into them).
    def put(name, value):
      object.__setattr__(self, name, value)

    put("in_axes", (0,) if self.in_axes is None else tuple(int(i) for i in self.in_axes))
    put("layer_axes", () if self.layer_axes is None else tuple(int(i) for i in self.layer_axes))
    put("kind", "dense" if self.kind is None else self.kind)
    if self.kernel_shape is not None:
      put("kernel_shape", tuple(int(d) for d in self.kernel_shape))
    elif hasattr(self.a, "shape") and hasattr(self.b, "shape"):
      put("kernel_shape", (int(self.a.shape[-2]), int(self.b.shape[-1])))

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    """The ``(d_in, d_out)`` shape of one layer's kernel update."""
    return self.a.shape[-2], self.b.shape[-1]

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """Sizes of the layer axes (``()`` for an unstacked adapter)."""
    return tuple(self.kernel_shape[i] for i in self.layer_axes)

  @property
  def output_axes(self) -> tuple[int, ...]:
    """Kernel axes forming the output side, in kernel order."""
    skip = set(self.in_axes) | set(self.layer_axes)
    return tuple(i for i in range(len(self.kernel_shape)) if i not in skip)


jax.tree_util.register_dataclass(
    Adapter,
    data_fields=["a", "b", "qa", "qb", "sds_on", "stamp"],
    meta_fields=["method", "scale", "kernel_shape", "in_axes", "kind", "layer_axes",
                 "fresh_bases"],
)


def is_adapter(x: Any) -> bool:
  return isinstance(x, Adapter)


_STAMP_BITS = 24  # stamps are integers below 2**24: float32 adds them exactly


def _bits_hash(x: jax.Array, salt: int) -> jax.Array:
  """A position-weighted wrapping uint32 sum of ``x``'s float32 bit patterns.

  Integer arithmetic modulo 2**32 is exact and associative, so the value does
  not depend on reduction order, fusion or sharding. Signed zeros hash alike
  (a zero update turns ``-0.0`` into ``+0.0``).
  """
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 + 0.0 is +0.0: hash both zeros alike
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # Row-major position from per-axis iotas: no reshape, so a sharded array is not gathered.
  position = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= bits.shape[axis]
  weights = position * jnp.uint32(2) + jnp.uint32(salt)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit  # one program per shape: eagerly, its ~100 small ops compile one by one
def adapter_stamp(a, b, qa, qb, sds_on) -> jax.Array:
  """A float32 integer in ``[0, 2**24)`` that changes with any bit of the adapter's arrays.

  The value ``Adapter.stamp`` records. Because it is an integer below ``2**24``,
  ``stamp + (new - old)`` is exact in float32: an update that reaches
  ``optax.apply_updates`` unchanged leaves a stamp that matches the new
  arrays bit for bit, and any other change does not (except with probability
  about ``2**-24``).
  """
  h = jnp.uint32(0)
  for salt, x in ((1, a), (3, b), (5, qa), (7, qb), (9, sds_on)):
    h = h + _bits_hash(x, salt) * jnp.uint32(2 * salt + 0x9E3779B1)
  h = h ^ (h >> jnp.uint32(_STAMP_BITS))
  return (h & jnp.uint32((1 << _STAMP_BITS) - 1)).astype(jnp.float32)


def restamp(adapter: Adapter) -> Adapter:
  """The adapter with its stamp recomputed from its arrays (SDS-LoRA only).

  Call it after editing an SDS adapter by hand (loading factors from
  elsewhere, surgery in a test); the optimizer transform keeps it current. A
  stacked adapter gets one stamp per layer.
  """
  if adapter.method != "sds":
    return adapter
  stamps = per_layer(adapter_stamp, adapter)(
      adapter.a, adapter.b, adapter.qa, adapter.qb, adapter.sds_on)
  return dataclasses.replace(adapter, stamp=stamps)


def with_fresh_bases(tree: Any, fresh: bool) -> Any:
  """``tree`` with ``fresh_bases`` set on every SDS adapter (static metadata only).

  ``False`` before training with a refresh schedule sparser than every update
  (``sds_lora(refresh=k)``, ``"phases"``); see ``Adapter.fresh_bases``.
  """
  return jax.tree.map(
      lambda x: dataclasses.replace(x, fresh_bases=bool(fresh))
      if is_adapter(x) and x.method == "sds" else x, tree, is_leaf=is_adapter)


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
  """An adapter whose update is exactly zero, so the adapted model equals the base.

  * ``method="lora"``, and ``method="sds"`` with ``sds_on=False`` (default):
    the LoRA initialisation, ``a`` Kaiming-uniform (as in PEFT), ``b = 0``. An
    SDS adapter then starts in the plain-LoRA warm-up that ``sds_lora``
    switches off; its bases are ``orth(a)`` and a deterministic completion for
    ``b = 0`` (Householder QR), unused until the switch.
  * ``method="sds"`` with ``sds_on=True``: zero factors with random
    orthonormal bases (``qa``, ``qb`` from ``fold_in(key, 1)``, ``fold_in(key,
    2)``). The update ``s (qa b + a qb.T)`` is zero and the SDS gradients
    ``s qa.T G``, ``s G qb`` are not, so it trains as SDS-LoRA from the first
    step without a warm-up (``sds_lora(..., warmup_steps=0)``).

  Raises:
    ValueError: unknown method, a rank that is not a positive int or exceeds
      ``min(d_in, d_out)``, or a non-floating ``dtype``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown adapter method {method!r}; choose from {METHODS}")
  rank = _checks.check_rank(rank)
  _checks.check_factors((d_in, rank), (rank, d_out))
  _checks.check_float("dtype", dtype)
  scale = _checks.check_scale(scale)
  if sds_on and method != "sds":
    raise ValueError("sds_on=True needs method='sds'")
  a, b, qa, qb, on, stamp = _init_arrays(key, d_in, d_out, rank, method, jnp.dtype(dtype),
                                         bool(sds_on))
  if method == "lora":
    return Adapter(a=a, b=b, method="lora", scale=scale)
  return Adapter(a=a, b=b, qa=qa, qb=qb, sds_on=on, stamp=stamp, method="sds", scale=scale)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_arrays(key, d_in, d_out, rank, method, dtype, sds_on):
  """``init_adapter``'s arrays as one program per shape (eagerly, the QRs and the
  stamp's small ops would compile one by one: seconds per new shape)."""
  b = jnp.zeros((rank, d_out), dtype)
  if sds_on:
    a = jnp.zeros((d_in, rank), dtype)
    qa = orthonormal_basis(jax.random.normal(jax.random.fold_in(key, 1), (d_in, rank)))
    qb = orthonormal_basis(jax.random.normal(jax.random.fold_in(key, 2), (d_out, rank)))
    on = jnp.ones((), jnp.float32)
  else:
    bound = 1.0 / jnp.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on a (r, d_in) weight
    a = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound).astype(dtype)
    if method == "lora":
      return a, b, None, None, None, None
    # LAPACK's QR: a tenth of the Gram QR's compile time, and the same qa up to rounding.
    qa, qb = factor_bases(a, b, method="householder")
    on = jnp.zeros((), jnp.float32)
  return a, b, qa, qb, on, adapter_stamp(a, b, qa, qb, on)


_MISUSE = (
    "an SDS-LoRA adapter changed since sdslora_jax.optim.sds_lora last updated it (its stamp "
    "no longer matches its factors, bases and flag; under differentiation its gradients are "
    "NaN): it is being trained without sds_lora, or not only by it. Train SDS adapters with "
    "sds_lora(your_optimizer) as the outermost transformation: a plain Optax optimizer "
    "trains them as plain LoRA and decays their bases, and a transformation chained "
    "after sds_lora (optax.chain(sds_lora(...), optax.scale(...)), add_decayed_weights, "
    "...) rescales their basis and flag updates; put such transformations inside "
    "sds_lora(optax.chain(...)). After editing factors by hand, call "
    "sdslora_jax.adapter.restamp(adapter)."
)


def _poisoned(bad, cotangents):
  """The cotangents, or NaN in every one of them when ``bad``."""
  bad = jnp.any(bad)
  return jax.tree.map(lambda c: jnp.where(bad, jnp.asarray(jnp.nan, c.dtype), c), cotangents)


@jax.custom_vjp
def _guarded(a, b, qa, qb, sds_on, stamp):
  return a, b, qa, qb, sds_on, stamp


def _guarded_fwd(a, b, qa, qb, sds_on, stamp):
  bad = adapter_stamp(a, b, qa, qb, sds_on) != stamp
  return (a, b, qa, qb, sds_on, stamp), bad


_guarded.defvjp(_guarded_fwd, _poisoned)


def guard(adapter: Adapter) -> Adapter:
  """The adapter itself; under differentiation, its gradients are NaN unless ``sds_lora`` trained it.

  An identity with a custom VJP: the forward pass is free, and only when
  gradients are taken does the backward pass compare the stamp with the
  adapter's arrays (one integer reduction per array, exact, so no tolerance).
  An adapter changed other than by ``sds_lora``'s updates gets NaN gradients,
  so the step after the misuse turns its loss into NaN instead of training on
  silently; ``verify_stamps(params)`` then names the adapters and the cause.
  The check is data in the compiled step, not a host callback: a callback in a
  step costs 5-7 % of its time on CPU even when it never fires.
  LoRA adapters, SDS adapters without a stamp, and adapters whose stamp is not
  float32 (a tree cast as a whole, e.g. to bfloat16 for the compute) pass
  unchecked.
  """
  if not _checked(adapter):
    return adapter
  a, b, qa, qb, sds_on, stamp = _guarded(
      adapter.a, adapter.b, adapter.qa, adapter.qb, adapter.sds_on, adapter.stamp
  )
  return dataclasses.replace(adapter, a=a, b=b, qa=qa, qb=qb, sds_on=sds_on, stamp=stamp)


def verify_stamps(tree: Any) -> None:
  """Raises ``ValueError`` naming every SDS adapter of ``tree`` whose stamp does not match.

  Eager (concrete arrays): call it between steps, e.g. when a loss turned NaN
  (``guard``). Adapters that ``guard`` passes unchecked are skipped.
  """
  stale = []
  for path, ad in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)[0]:
    if is_adapter(ad) and _checked(ad):
      want = per_layer(adapter_stamp, ad)(ad.a, ad.b, ad.qa, ad.qb, ad.sds_on)
      if not np.array_equal(np.asarray(want), np.asarray(ad.stamp)):
        stale.append(jax.tree_util.keystr(path) or "<root>")
  if stale:
    more = f" and {len(stale) - 10} more" if len(stale) > 10 else ""
    raise ValueError(f"{_MISUSE} Stale stamps: {', '.join(stale[:10])}{more}.")


def _checked(adapter: Adapter) -> bool:
  return (adapter.method == "sds" and adapter.stamp is not None
          and jnp.result_type(adapter.stamp) == jnp.float32)


_TAILS = (2, 2, 2, 2, 0, 0)  # trailing axes of a, b, qa, qb, sds_on, stamp


def _tree_stamps_bad(plan, arrays):
  """Whether any adapter's stamp differs from its arrays: one batched hash per group."""
  bad = []
  for group in plan:
    stacked = [_batching.stack([arrays[i][f] for i in group], t)[0] for f, t in enumerate(_TAILS)]
    stamps = jax.vmap(adapter_stamp)(*stacked[:5])
    bad.append(jnp.any(stamps != stacked[5]))
  return jnp.any(jnp.stack(bad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _guarded_tree(plan, arrays):
  return arrays


def _guarded_tree_fwd(plan, arrays):
  return arrays, _tree_stamps_bad(plan, arrays)


def _guarded_tree_bwd(plan, bad, cotangents):
  return (_poisoned(bad, cotangents),)


_guarded_tree.defvjp(_guarded_tree_fwd, _guarded_tree_bwd)


def guard_tree(tree: Any) -> Any:
  """``guard`` for every adapter of a tree at once; the result's adapters need no guard.

  The same check as ``guard`` (under differentiation only; a stale stamp makes
  every adapter's gradients NaN), with the stamps of
  alike adapters (same shapes and dtypes) hashed in one batched computation, so
  a model with many adapters gets one small check instead of one per layer
  call. Checked adapters come back with ``stamp=None`` (their arrays flow
  through the check), so per-call ``guard``s downstream pass them unchanged.
  Frontends call this once per ``apply``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_adapter)
  idx = [i for i, leaf in enumerate(leaves) if is_adapter(leaf) and _checked(leaf)]
  if not idx:
    return tree
  arrays = tuple(tuple(getattr(leaves[i], f) for f in _ARRAYS) for i in idx)
  plan = tuple(tuple(g) for g in _batching.group(
      [(n, _batching.signature(arrays[n], _TAILS)) for n in range(len(idx))]))
  arrays = _guarded_tree(plan, arrays)
  for i, (a, b, qa, qb, sds_on, _) in zip(idx, arrays):
    leaves[i] = dataclasses.replace(leaves[i], a=a, b=b, qa=qa, qb=qb, sds_on=sds_on, stamp=None)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def adapter_matmul(x: jax.Array, adapter: Adapter) -> jax.Array:
  """``x @ matrix_delta(adapter)`` through rank-r projections (no kernel-sized value).

  A stacked adapter is applied one layer at a time, inside a scan over the
  layers (``layer_view``); applied to a whole stack it raises.
  """
  adapter = guard(layer_view(adapter))
  if adapter.method == "lora":
    return lora_matmul(x, adapter.a, adapter.b, scale=adapter.scale)
  return warmup_sds_matmul(
      x, adapter.a, adapter.b, adapter.qa, adapter.qb, adapter.sds_on, scale=adapter.scale,
      fresh=adapter.fresh_bases,
  )


def adapted_module_call(x: jax.Array, kernel: Any, adapter: Adapter, *, mergeable: bool,
                        precision: Any, merged_op: Callable[[], tuple[Callable, Any]],
                        base_call: Callable[[], jax.Array],
                        adapter_output: Callable[[jax.Array, Adapter], jax.Array],
                        delta: Callable[..., jax.Array] | None = None) -> jax.Array:
  """An adapted layer: the module's call plus ``adapter_output(x, adapter)``.

  One merged op (``fused.fused_call`` on ``kernel + delta(adapter, as_applied=True)``,
  ``delta`` by default ``kernel_delta``) where the module may be called again on a merged
  kernel (``mergeable``: the Linen and NNX frontends decide), ``kernel`` is an array and
  ``fused.use_merged`` says so; else the sum of ``base_call()`` and the adapter's rank-r
  term. ``merged_op()`` returns ``(op, rest)``, the module as ``op(x, kernel, rest)``
  with its other variables ``rest``; it is called only when merging.
  """
  if (mergeable and isinstance(kernel, jax.Array)
      and fused.use_merged(x, kernel, *adapter.shape, precision)):
    op, rest = merged_op()
    merged_delta = functools.partial(delta or kernel_delta, as_applied=True)
    return fused.fused_call(op, merged_delta, adapter_output, x, kernel, adapter, rest)
  y = base_call()
  return y + adapter_output(x.astype(y.dtype), adapter)


def adapted_matmul(x: jax.Array, kernel: jax.Array, adapter: Adapter, *,
                   precision: Any = None) -> jax.Array:
  """The adapted layer ``x @ kernel + adapter_matmul(x, adapter)``, with the adapter's gradients.

  ``kernel`` is the frozen ``(d_in, d_out)`` matrix the adapter belongs to. Where merging
  is cheaper and exact enough (float32 at full precision, ``T`` rows of ``x`` with
  ``T (d_in + d_out) >= d_in d_out``; see ``merging``), this runs as one matmul on
  ``kernel + update`` each way (``fused.fused_call``): XLA then keeps what full
  fine-tuning keeps for the backward pass (``x``) and forms no kernel gradient.
  Otherwise it is the sum of the two, the adapter
  through its rank-r op.
  """
  layer = layer_view(adapter)
  if tuple(jnp.shape(kernel)) != layer.shape:
    raise ValueError(f"adapted_matmul: the kernel has shape {tuple(jnp.shape(kernel))}, the "
                     f"adapter is for a {layer.shape} kernel")
  op = lambda x, k, rest: jnp.matmul(x, k, precision=precision)  # noqa: E731
  return adapted_module_call(
      x, kernel, adapter, mergeable=True, precision=precision, merged_op=lambda: (op, ()),
      base_call=lambda: op(x, kernel, ()),
      adapter_output=lambda x, ad: adapter_matmul(x, ad).astype(x.dtype), delta=matrix_delta)


def matrix_delta(adapter: Adapter, *, as_applied: bool = False) -> jax.Array:
  """The dense ``(d_in, d_out)`` update in float32 (merge and export path).

  A stacked adapter gives ``(*L, d_in, d_out)``, one update per layer.
  ``as_applied=True`` gives the update as ``adapter_matmul`` applies it, in one
  product (``ops.warmup_sds_delta``): for an adapter with ``fresh_bases`` its
  bases are taken to span its factors, as the op takes them. That is the forward
  value of a merged layer (``fused``); differentiate the default form instead.
  """
  if adapter.layer_axes and adapter.a.ndim > 2:
    return _stacked(functools.partial(matrix_delta, as_applied=as_applied), adapter)
  adapter = guard(layer_view(adapter))
  a = adapter.a.astype(jnp.float32)
  b = adapter.b.astype(jnp.float32)
  if adapter.method == "lora":
    return lora_delta(a, b, scale=adapter.scale)
  if as_applied:
    return warmup_sds_delta(a, b, adapter.qa, adapter.qb, adapter.sds_on, scale=adapter.scale,
                            fresh=adapter.fresh_bases)
  sds = sds_delta(a, b, scale=adapter.scale, qa=adapter.qa, qb=adapter.qb)
  return jnp.where(in_sds_phase(adapter.sds_on), sds, lora_delta(a, b, scale=adapter.scale))


def layer_view(adapter: Adapter) -> Adapter:
  """One layer of a stacked adapter, as seen inside ``nn.scan`` / ``nnx.scan``.

  For an adapter whose static metadata says it is stacked but whose arrays
  are one layer's (a scan body sliced them), returns the per-layer adapter:
  ``kernel_shape`` without the layer axes (wherever they sit), ``in_axes``
  renumbered, no ``layer_axes``. An unstacked adapter is returned as is.
  """
  n = len(adapter.layer_axes)
  if not n:
    return adapter
  if adapter.a.ndim != 2:
    raise ValueError(
        f"a stacked adapter (layer axes {adapter.layer_axes} of kernel shape "
        f"{adapter.kernel_shape}) was applied to one layer with factors of shape "
        f"{adapter.a.shape}: apply it inside the scan over layers, or take a layer first"
    )
  layers = adapter.layer_axes
  return dataclasses.replace(
      adapter,
      kernel_shape=tuple(d for i, d in enumerate(adapter.kernel_shape) if i not in layers),
      in_axes=tuple(i - sum(j < i for j in layers) for i in adapter.in_axes),
      layer_axes=None,
  )


def take_layer(adapter: Adapter, index: int | tuple[int, ...]) -> Adapter:
  """Layer ``index`` of a stacked adapter (its arrays indexed, ``layer_view`` applied)."""
  index = (index,) if isinstance(index, int) else tuple(index)
  arrays = {f: (None if getattr(adapter, f) is None else getattr(adapter, f)[index])
            for f in _ARRAYS}
  return layer_view(dataclasses.replace(adapter, **arrays))


_ARRAYS = ("a", "b", "qa", "qb", "sds_on", "stamp")


def per_layer(fn, adapter: Adapter):
  """``fn`` vmapped over a stacked adapter's layer axes (``fn`` itself when unstacked)."""
  for _ in adapter.layer_axes:
    fn = jax.vmap(fn)
  return fn


def _stacked(fn, adapter: Adapter) -> jax.Array:
  """``fn`` of every layer of a stacked adapter, stacked along the layer axes."""
  one = lambda arrays: fn(layer_view(dataclasses.replace(adapter, **arrays)))
  return per_layer(one, adapter)({f: getattr(adapter, f) for f in _ARRAYS})


def kernel_delta(adapter: Adapter, *, as_applied: bool = False) -> jax.Array:
  """The dense update in the targeted kernel's own shape and axis order (float32).

  ``matrix_delta`` is ``(d_in, d_out)``; it is unflattened to the input axes'
  and output axes' sizes and transposed back to the kernel's axis order. A
  stacked adapter gives every layer's update, stacked along the layer axes.
  ``as_applied``: see ``matrix_delta``.
  """
  if adapter.layer_axes and adapter.a.ndim > 2:
    # One update per layer, stacked in front, then moved to the layer axes' places
    # (MaxText-style stacks keep their layers on axis 1, for instance).
    n = len(adapter.layer_axes)
    one = functools.partial(kernel_delta, as_applied=as_applied)
    return jnp.moveaxis(_stacked(one, adapter), tuple(range(n)), adapter.layer_axes)
  adapter = layer_view(adapter)
  delta = matrix_delta(adapter, as_applied=as_applied)
  shape = adapter.kernel_shape
  in_axes, out_axes = adapter.in_axes, adapter.output_axes
  split = tuple(shape[i] for i in in_axes) + tuple(shape[i] for i in out_axes)
  delta = delta.reshape(split)
  perm = in_axes + out_axes
  return jnp.transpose(delta, tuple(perm.index(i) for i in range(len(shape))))
