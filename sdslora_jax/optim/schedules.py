"""When to recompute the SDS-LoRA bases from the factors.

A refresh schedule maps the post-warm-up step ``j`` (an int32 array; ``j = 1``
is the first optimizer update after the switch to SDS-LoRA) to a boolean array:
whether the bases are recomputed from the factors at the end of that update.
Schedules are pure ``jnp`` functions, so the decision is data inside one
compiled step (no retracing at a refresh).

Fixed bases after the warm-up stall training; the bases must follow the factors
(Oh, Baik & Lee, "SDS-LoRA", arXiv 2606.16454; the schedules here are this
project's reading of it, see ``sds_lora``).

References:
  Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
  Low-Rank Adaptation", arXiv 2606.16454, 2026.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

RefreshSchedule = Callable[[jax.Array], jax.Array]
"""``j -> bool``: refresh at the end of post-warm-up update ``j >= 1``."""

REFRESH_MODES = ("every_step", "phases")


def _check_positive_int(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def refresh_every(every: int) -> RefreshSchedule:
  """Refreshes at every ``every``-th post-warm-up update (``j % every == 0``).

  Args:
    every: the refresh interval; ``1`` refreshes after every update.

  Returns:
    A refresh schedule.
  """
  every = _check_positive_int("every", every)

  def schedule(j: jax.Array) -> jax.Array:
    return jnp.asarray(j, jnp.int32) % every == 0

  return schedule


def refresh_phases(num_phases: int, num_steps: int) -> RefreshSchedule:
  """Growing intervals: ``num_phases`` phases over ``num_steps`` updates.

  Refreshes when ``j % ceil(num_phases * j / num_steps) == 0``: every update in
  the first phase, every second update in the second, ..., every
  ``num_phases``-th in the last. Beyond ``num_steps`` the interval stays at
  ``num_phases``. Integer arithmetic throughout (no float rounding at phase
  boundaries).

  Args:
    num_phases: the number of phases ``P`` (the final interval).
    num_steps: the number of post-warm-up updates ``T`` the phases span.

  Returns:
    A refresh schedule.
  """
  num_phases = _check_positive_int("num_phases", num_phases)
  num_steps = _check_positive_int("num_steps", num_steps)

  def schedule(j: jax.Array) -> jax.Array:
    j = jnp.maximum(jnp.asarray(j, jnp.int32), 1)
    capped = jnp.minimum(j, num_steps)  # keeps num_phases * capped in int32
    interval = (num_phases * capped + num_steps - 1) // num_steps
    return j % jnp.maximum(interval, 1) == 0

  return schedule


def make_refresh_schedule(
    refresh: str | int | RefreshSchedule,
    *,
    warmup_steps: int,
    phases: int = 5,
    total_steps: int | None = None,
) -> RefreshSchedule:
  """Builds the schedule named by ``sds_lora``'s ``refresh`` argument.

  Args:
    refresh: ``"every_step"``; an int ``k`` (every ``k`` updates); ``"phases"``
      (``refresh_phases(phases, total_steps - warmup_steps)``); or a callable
      ``j -> bool`` used as is.
    warmup_steps: the number of plain-LoRA warm-up updates.
    phases: the number of phases for ``"phases"``.
    total_steps: the total number of updates, warm-up included; required for
      ``"phases"`` and must exceed ``warmup_steps``.

  Returns:
    A refresh schedule.

  Raises:
    ValueError: on an unknown mode or invalid numbers.
  """
  if callable(refresh):
    return refresh
  if isinstance(refresh, int) and not isinstance(refresh, bool):
    return refresh_every(refresh)
  if refresh == "every_step":
    return refresh_every(1)
  if refresh == "phases":
    if total_steps is None:
      raise ValueError('refresh="phases" needs total_steps')
    total_steps = _check_positive_int("total_steps", total_steps)
    if total_steps <= warmup_steps:
      raise ValueError(
          f"total_steps={total_steps} must exceed warmup_steps={warmup_steps} "
          'for refresh="phases"'
      )
    return refresh_phases(phases, total_steps - warmup_steps)
  raise ValueError(
      f"refresh must be one of {REFRESH_MODES}, a positive int or a callable, "
      f"got {refresh!r}"
  )


def refreshes_every_update(refresh: Any) -> bool:
  """Whether the ``refresh`` argument of ``sds_lora`` is its default, every update.

  Only then do the bases span the factors after every update, so that SDS
  adapters may keep ``fresh_bases=True`` (the rank-r op).
  """
  return refresh in ("every_step", 1) and not isinstance(refresh, bool)


def refresh_steps(schedule: RefreshSchedule, num_steps: int) -> list[int]:
  """The post-warm-up steps ``1..num_steps`` at which ``schedule`` refreshes."""
  js = jnp.arange(1, num_steps + 1, dtype=jnp.int32)
  hits = jax.vmap(schedule)(js)
  return [int(j) for j, h in zip(js, hits) if bool(h)]


__all__: list[str] = []  # internal: used by the library, not part of its API
