"""The frozen base op and its adapter as one op: ``op(x, w + delta)`` with the adapter's gradients.

An adapted layer computes ``op(x, w) + adapter(x)``: the model's own matmul, then the
adapter's rank-r term. Under autodiff XLA keeps both summands for the backward pass of
what consumes their sum, and sums two activation-sized input cotangents: about one
activation per adapted layer more than full fine-tuning keeps. ``fused_call`` computes
the same value as one op on the merged operand, under a custom VJP:

* forward: ``op(x, w + delta(ad))``, one matmul (merging costs ``d_in d_out r`` flops);
* backward: ``x``'s cotangent through the merged operand (one matmul), the adapter's
  gradients from its rank-r op's own backward (for SDS-LoRA, the gradients without the
  factors' singular values), and the cotangents of ``w`` and of the op's other inputs
  only when they are differentiated (a frozen base gets none: no ``x.T @ g``);
* residuals: the op's inputs, what full fine-tuning saves. The merged operand is formed
  again in the backward pass, once the output's cotangent is there, so that no merged
  kernel lives from the forward to the backward pass.

Merging rounds ``w + delta`` to ``w``'s dtype and the matmul to the op's precision, which
for a small update is only harmless in float32 at full precision: on GPUs (TF32) and
TPUs (bfloat16 passes) a default-precision float32 matmul rounds the merged kernel to
about ``1e-3`` of ``w``, the size of a typical LoRA update. ``use_merged`` therefore
merges only float32 operands on the CPU, or elsewhere at ``Precision.HIGHEST`` (on the op
or as ``jax_default_matmul_precision``), and only where merging is not dearer: when the op
has ``T`` rows of activations with ``T (d_in + d_out) >= d_in d_out`` (``T >= d / 2`` for
a square kernel), so that merging (``d_in d_out r`` flops, as one well-shaped matmul) costs
no more than the two rank-r projections it replaces (``T r (d_in + d_out)``, which read
and write whole activations).
``merging("never" | "always" | "auto")`` overrides the choice (``"always"`` keeps the
dtype and precision conditions); the environment variable ``SDSLORA_JAX_MERGING`` sets
the default.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero, custom_vjp_primal_tree_values

__all__ = ["fused_call", "merging", "split_input", "use_merged"]

_MODES = ("auto", "always", "never")


def _default_mode() -> str:
  mode = os.environ.get("SDSLORA_JAX_MERGING", "auto")
  if mode not in _MODES:
    raise ValueError(f"SDSLORA_JAX_MERGING must be one of {_MODES}, got {mode!r}")
  return mode


_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("sdslora_jax_merging",
                                                            default=_default_mode())


@contextlib.contextmanager
def merging(mode: str) -> Iterator[None]:
  """Within the block, traced adapted ops merge ``"auto"`` (default), ``"always"`` or ``"never"``.

  Read when a function is traced: a step compiled inside the block keeps its choice.
  """
  if mode not in _MODES:
    raise ValueError(f"merging mode must be one of {_MODES}, got {mode!r}")
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


def _full_precision(precision: Any) -> bool:
  """Whether a float32 matmul with this ``precision`` parameter runs in float32."""
  if jax.default_backend() == "cpu":
    return True
  highest = jax.lax.Precision.HIGHEST
  given = precision if isinstance(precision, (tuple, list)) else (precision,)
  if given and all(p in (highest, "highest", "float32") for p in given):
    return True
  default = jax.config.jax_default_matmul_precision
  return precision in (None, (None, None)) and default in ("highest", "float32")


def use_merged(x: Any, w: Any, d_in: int, d_out: int, precision: Any = None) -> bool:
  """Whether the op ``x`` x ``w`` (``d_in`` contracted, ``d_out`` out) should run merged."""
  mode = _MODE.get()
  f32 = jnp.dtype(jnp.float32)
  if mode == "never" or jnp.dtype(x.dtype) != f32 or jnp.dtype(w.dtype) != f32:
    return False
  if not _full_precision(precision):
    return False
  rows = x.size // max(d_in, 1)
  return mode == "always" or rows * (d_in + d_out) >= d_in * d_out


def _is_primal(v: Any) -> bool:
  return isinstance(v, CustomVJPPrimal)


def fused_call(
    op: Callable[[jax.Array, jax.Array, Any], jax.Array],
    delta: Callable[[Any], jax.Array],
    adapter_output: Callable[[jax.Array, Any], jax.Array],
    x: jax.Array,
    w: jax.Array,
    ad: Any,
    rest: Any = (),
) -> jax.Array:
  """``op(x, w + delta(ad), rest)``, with the gradients of ``op(x, w, rest) + adapter(x)``.

  ``adapter(x)`` is ``adapter_output(x, ad)``.

  Args:
    op: the base op, ``op(x, w, rest)``; differentiable in all three.
    delta: the adapter's update in ``w``'s shape (float32), as ``adapter_output`` applies it.
    adapter_output: the adapter's term ``x -> x @ delta`` through its rank-r op; its
      backward gives the adapter's gradients.
    x, w, ad, rest: the activations, the weight operand, the adapter pytree and the op's
      other inputs (a bias, a module's other variables). Closures must not capture arrays.
  """

  def merged(w, ad):
    return w + delta(ad).astype(w.dtype)

  @jax.custom_vjp
  def call(x, w, ad, rest):
    # The update is formed once x is there: otherwise XLA forms every layer's update
    # (independent of the activations) at the start of the step, all alive at once.
    x, w, ad = jax.lax.optimization_barrier((x, w, ad))
    return op(x, merged(w, ad), rest)

  # Which of the base's inputs are differentiated, from the forward rule (symbolic zeros):
  # a frozen base gets no kernel-sized cotangent, not even as dead code in the jaxpr.
  perturbed = {"w": True, "rest": True}

  def fwd(x, w, ad, rest):
    perturbed["w"] = w.perturbed
    perturbed["rest"] = any(p.perturbed for p in jax.tree.leaves(rest, is_leaf=_is_primal))
    x, w, ad, rest = custom_vjp_primal_tree_values((x, w, ad, rest))
    return call(x, w, ad, rest), (x, w, ad, rest)

  def bwd(res, g):
    x, w, ad, rest = res
    if isinstance(g, SymbolicZero):
      return None, None, None, None
    # The merged kernel is formed again once g is there (an optimization barrier ties the
    # inputs to g): otherwise XLA reuses the forward's (equal computations are merged) or
    # forms it early, and it stays alive from the forward pass on, one kernel per layer.
    w, ad, g = jax.lax.optimization_barrier((w, ad, g))
    w_eff = merged(w, ad)
    if perturbed["w"] or perturbed["rest"]:
      _, vjp_op = jax.vjp(op, x, w_eff, rest)
      d_x, d_w, d_rest = vjp_op(g)
      d_w, d_rest = (d_w if perturbed["w"] else None), (d_rest if perturbed["rest"] else None)
    else:
      d_w = d_rest = None
      _, vjp_x = jax.vjp(lambda x: op(x, w_eff, rest), x)
      (d_x,) = vjp_x(g)
    _, vjp_ad = jax.vjp(lambda ad: adapter_output(x, ad).astype(g.dtype), ad)
    (d_ad,) = vjp_ad(g)
    return d_x, d_w, d_ad, d_rest

  call.defvjp(fwd, bwd, symbolic_zeros=True)
  return call(x, w, ad, rest)


def split_input(args: tuple, kwargs: dict, name: str = "inputs"):
  """``(x, rebuild)`` for a layer call whose one array argument is its input, else ``None``.

  ``x`` is the first positional argument or keyword ``name``; ``rebuild(x2)`` gives the
  call's ``(args, kwargs)`` with ``x2`` in its place. A call with other array arguments
  (a mask, a second input) is not merged: ``fused_call``'s closures must not hold arrays.
  """
  if args:
    x, others = args[0], (args[1:], kwargs)
    rebuild = lambda x2: ((x2, *args[1:]), kwargs)  # noqa: E731
  elif name in kwargs:
    x, others = kwargs[name], {k: v for k, v in kwargs.items() if k != name}
    rebuild = lambda x2: ((), {**kwargs, name: x2})  # noqa: E731
  else:
    return None
  if any(hasattr(v, "shape") and hasattr(v, "dtype") for v in jax.tree.leaves(others)):
    return None
  return x, rebuild
