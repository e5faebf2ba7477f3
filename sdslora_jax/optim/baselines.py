"""Baselines on the same adapter tree: LoRA+ and Riemannian-preconditioned LoRA.

Both act on every ``Adapter`` node of a parameter tree (``is_leaf=is_adapter``)
and pass other leaves through, so they run on exactly the trees ``sds_lora``
trains and can be compared at equal cost. Flax orientation throughout:
``dK = s * a @ b`` with ``a: (d_in, r)``, ``b: (r, d_out)``.

References:
  Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
  ICML 2024 (arXiv 2402.12354).
  Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
  Models", ICML 2024 (arXiv 2402.02347).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sdslora_jax.adapter import is_adapter

_F32 = jnp.float32

FACTOR_LABELS = ("a", "b", "other", "frozen")


def _adapter_labels(x: Any) -> Any:
  if not is_adapter(x):
    return "other"

  def frozen(v):
    return None if v is None else "frozen"

  return dataclasses.replace(
      x, a="a", b="b", qa=frozen(x.qa), qb=frozen(x.qb), sds_on=frozen(x.sds_on),
      stamp=frozen(x.stamp),
  )


def factor_labels(tree: Any) -> Any:
  """Labels every leaf ``"a"``, ``"b"``, ``"other"`` or ``"frozen"``.

  Adapter factors get ``"a"`` / ``"b"``; SDS bases and flags (absent from the
  tree an inner optimizer of ``sds_lora`` sees) get ``"frozen"``; every other
  leaf gets ``"other"``. ``optax.MaskedNode`` subtrees stay as they are, so the
  function works inside ``optax.partition`` / ``optax.masked``. Pass the
  function itself (not its result) as ``param_labels``.
  """
  return jax.tree.map(_adapter_labels, tree, is_leaf=is_adapter)


def loraplus(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
    other_learning_rate: optax.ScalarOrSchedule | None = None,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """LoRA+: the up factor ``b`` learns ``ratio`` times faster than ``a``.

  Builds ``optax.partition`` over ``factor_labels``: ``optimizer(lr_a)`` for
  ``a``, ``optimizer(ratio * lr_a)`` for ``b``, ``optimizer(other_lr)`` for
  other leaves (default ``lr_a``) and ``set_to_zero`` for SDS bases and flags.
  Usable alone (LoRA+) or as the inner optimizer of ``sds_lora``.

  Args:
    learning_rate: ``lr_a``, a float or an ``optax`` schedule.
    ratio: ``lr_b / lr_a`` (default 16, the value recommended by LoRA+).
    optimizer: an optax alias taking ``learning_rate`` first (default
      ``optax.adamw``).
    other_learning_rate: learning rate for non-adapter leaves (default ``lr_a``).
    **optimizer_kwargs: passed to every ``optimizer`` call.

  Returns:
    The partitioned optimizer.

  References:
    Hayou, Ghosh & Yu, "LoRA+", ICML 2024 (arXiv 2402.12354).
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
    raise ValueError(f"ratio must be a positive number, got {ratio!r}")
  if not callable(optimizer):
    raise TypeError(f"optimizer must be an optax alias such as optax.adamw, got {optimizer!r}")
  if callable(learning_rate):
    lr_b = lambda count: ratio * learning_rate(count)
  else:
    lr_b = ratio * learning_rate
  lr_other = learning_rate if other_learning_rate is None else other_learning_rate
  return optax.partition(
      {
          "a": optimizer(learning_rate, **optimizer_kwargs),
          "b": optimizer(lr_b, **optimizer_kwargs),
          "other": optimizer(lr_other, **optimizer_kwargs),
          "frozen": optax.set_to_zero(),
      },
      factor_labels,
  )


def _precondition(g: Any, p: Any, damping: float) -> Any:
  """Scaled-GD gradients of one adapter (other fields pass through)."""
  a = jnp.asarray(p.a, _F32)
  b = jnp.asarray(p.b, _F32)
  eye = jnp.eye(a.shape[-1], dtype=_F32)
  gram_b = b @ b.T + damping * eye  # (r, r), symmetric positive definite
  gram_a = a.T @ a + damping * eye
  g_a = jnp.linalg.solve(gram_b, jnp.asarray(g.a, _F32).T).T  # g_a (b b^T + dI)^-1
  g_b = jnp.linalg.solve(gram_a, jnp.asarray(g.b, _F32))  # (a^T a + dI)^-1 g_b
  return dataclasses.replace(g, a=g_a.astype(g.a.dtype), b=g_b.astype(g.b.dtype))


def scale_by_riemannian_lora(damping: float = 1e-6) -> optax.GradientTransformation:
  """Riemannian preconditioner of LoRA gradients (scaled GD), for every adapter.

  ``g_a <- g_a (b b^T + damping I)^-1`` and ``g_b <- (a^T a + damping I)^-1 g_b``
  (``r x r`` solves in float32, using the current ``params``); other leaves and
  the zero gradients of SDS bases pass through. Chain it before an optimizer:
  ``optax.chain(scale_by_riemannian_lora(), optax.adamw(lr))`` is the scaled
  AdamW variant. The adapter scale ``s`` is not included in the preconditioner
  (as in the reference formulas; it only rescales the learning rate).

  Args:
    damping: ``d > 0`` added to both ``r x r`` Gram matrices (default 1e-6).
      Needed at the usual ``b = 0`` initialisation.

  Returns:
    A stateless ``GradientTransformation`` whose ``update`` needs ``params``.

  References:
    Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models", ICML 2024 (arXiv 2402.02347).
  """
  if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping <= 0:
    raise ValueError(f"damping must be a positive number, got {damping!r}")
  damping = float(damping)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_riemannian_lora needs params")

    def leaf(g, p):
      return _precondition(g, p, damping) if is_adapter(p) else g

    return jax.tree.map(leaf, updates, params, is_leaf=is_adapter), state

  return optax.GradientTransformation(init_fn, update_fn)


def riemannian_lora(
    learning_rate: optax.ScalarOrSchedule, *, damping: float = 1e-6
) -> optax.GradientTransformation:
  """Scaled gradient descent on LoRA factors (Riemannian-preconditioned SGD).

  ``optax.chain(scale_by_riemannian_lora(damping), optax.sgd(learning_rate))``.

  References:
    Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models", ICML 2024 (arXiv 2402.02347).
  """
  return optax.chain(scale_by_riemannian_lora(damping), optax.sgd(learning_rate))


__all__ = ["factor_labels", "loraplus", "riemannian_lora", "scale_by_riemannian_lora"]
