"""``sds_lora``: an Optax wrapper that trains SDS-LoRA adapters with any optimizer.

The wrapped ("inner") optimizer sees only the trainable leaves: the factors
``a``, ``b`` of every adapter and every other leaf of the tree (a head, a frozen
base handled by the user's own partition, ...). The bases ``qa``, ``qb`` and the
phase flag ``sds_on`` of SDS adapters are removed from the tree it sees, so they
get no optimizer state and no weight decay. Around the inner update the
wrapper runs the SDS-LoRA life cycle, as data inside one compiled step:

1. Warm-up: for the first ``warmup_steps`` updates SDS adapters train as plain
   LoRA (``sds_on == 0``; the forward pass switches on the flag).
2. Switch, at the end of update number ``warmup_steps``: the factors after this
   update are re-expressed exactly in SDS form (``activate_sds``: the adapted
   function is unchanged), ``sds_on`` becomes 1, the bases are set, and the
   inner optimizer's per-parameter state for those factors is reset.
3. SDS phase: after the update the bases are recomputed from the updated
   factors (``basis.refresh_bases``, signs aligned to the previous bases) on a
   schedule (``schedules.py``).

The returned updates are ``new - old`` for every leaf, so
``optax.apply_updates(params, updates)`` gives factors and bases that belong
together. Where nothing but the inner update happens, the factor updates are
the inner updates unchanged (bit for bit; for bfloat16 / float16 factors they
are returned in float32, so that the switch's new factors are rounded once,
by ``apply_updates``, and not as a low-precision difference).

Outermost only. The basis, flag and stamp updates are exact differences and
must reach ``optax.apply_updates`` unchanged: nothing may be chained after
``sds_lora`` (``optax.chain(sds_lora(...), optax.scale(-lr))`` would rescale
them). Put the whole optimizer inside it. Adapters carry a stamp (see
``Adapter.stamp``): a chained transformation, or training SDS adapters with a
plain Optax optimizer, makes the next backward pass return NaN gradients for
them, and ``sdslora_jax.adapter.verify_stamps(params)`` raises a ``ValueError``
that says so.

NNX. ``nnx.Optimizer(model, sds_lora(...), wrt=AdapterVariable)`` works: the
inner optimizer is initialised on the values of the ``Variable`` nodes, so its
state holds ``Adapter`` nodes that NNX can update in place. (A plain Optax
optimizer initialised by ``nnx.Optimizer`` on ``AdapterVariable`` state holds
the ``Adapter`` inside NNX's ``OptVariable`` and fails on its second update;
wrap it in ``sds_lora``, which passes LoRA adapters through unchanged.)

Moment reset. At the switch, the inner optimizer's per-parameter state of the switching
factors is reset by a structural rule (``state_reset.py``), so that the factors restart
like a fresh optimizer's where that is exact, and never take a larger step than one.

Composition. ``optax.MultiSteps`` and ``optax.apply_if_finite`` must wrap
``sds_lora``, not sit inside it (inside, the warm-up would count micro-steps
and the switch could land mid-accumulation); ``init`` raises a ``ValueError``
when it finds their state in the inner optimizer.

Cost. SDS adapters alike in factor shapes, dtypes and scale are stacked into groups
(``grouping.py``): the switch, the refresh and the stamps run once per group, and the QRs
once per factor shape, so a model's update holds a few factorisations whatever its number
of adapters.

References:
  Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
  Low-Rank Adaptation", arXiv 2606.16454, 2026.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sdslora_jax import _batching, _trees
from sdslora_jax.adapter import adapter_stamp, is_adapter
from sdslora_jax.basis import BASIS_METHODS, align_signs, orthonormal_basis
from sdslora_jax.ops import in_sds_phase
from sdslora_jax.optim.grouping import stack_groups
from sdslora_jax.optim.schedules import (
    RefreshSchedule,
    make_refresh_schedule,
    refreshes_every_update,
)
from sdslora_jax.optim.state_reset import reset_switched
from sdslora_jax.reparam import activated_from_bases
from sdslora_jax.retraction import retract

_F32 = jnp.float32
SWITCH_STATES = ("reset", "keep")
REFRESH_RULES = ("orth", "retract")
STEP_SCALE = 6.0**-0.5
"""``sds_lora``'s default ``step_scale``: SDS-LoRA's Adam steps the size of LoRA's."""
REWARMUP_STEPS = 10
"""``sds_lora``'s default ``rewarmup_steps``: factor steps ramped up after the switch."""


class SdsLoraState(NamedTuple):
  """State of ``sds_lora``.

  Attributes:
    count: int32, the number of updates applied so far (warm-up included).
    num_refreshes: int32, the number of updates at the end of which bases were
      recomputed from the factors (the switch itself not counted).
    inner_state: the wrapped optimizer's state, for the trainable leaves only.
  """

  count: jax.Array
  num_refreshes: jax.Array
  inner_state: optax.OptState


def _is_sds(x: Any) -> bool:
  return is_adapter(x) and x.method == "sds"


def _strip(x: Any) -> Any:
  if not _is_sds(x):
    return x
  return dataclasses.replace(x, qa=None, qb=None, sds_on=None, stamp=None)


def trainable_params(tree: Any) -> Any:
  """The tree an inner optimizer sees: SDS adapters without ``qa``, ``qb``, ``sds_on``, ``stamp``.

  NNX ``Variable`` nodes are replaced by their values. Build ``optax.partition``
  / ``optax.masked`` label and mask trees against this structure (or pass a
  callable such as ``factor_labels``).
  """
  # nnx.Optimizer initialises the optimizer on a state whose adapters sit inside
  # AdapterVariable nodes but updates it with plain values; an inner state built on the
  # unwrapped tree has Adapter nodes outside any Variable, which NNX can write back into.
  return jax.tree.map(_strip, _trees.unwrap_variables(tree), is_leaf=is_adapter)


def _update_dtype(p: jax.Array, u: jax.Array) -> Any:
  """Factor updates of low-precision factors are float32 (the switch stays exact)."""
  return jnp.promote_types(jnp.asarray(u).dtype, _F32) if jnp.finfo(
      jnp.asarray(p).dtype).bits < 32 else jnp.asarray(u).dtype


def _apply(p: jax.Array, u: jax.Array) -> jax.Array:
  """``optax.apply_updates`` for one leaf."""
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def _update_to(p: jax.Array, new: jax.Array, mask: jax.Array, update: jax.Array) -> jax.Array:
  """The update taking ``p`` to ``new`` where ``mask``, else ``update``; in ``update``'s dtype.

  A float32 difference of values rounded once: ``p + u`` is exactly ``new`` rounded to
  ``p``'s dtype, so ``apply_updates`` leaves that value (no second rounding of a
  low-precision difference).
  """
  diff = new.astype(p.dtype).astype(_F32) - p.astype(_F32)
  return jnp.where(mask, diff, update.astype(_F32)).astype(update.dtype)


# Wrappers that must sit outside ``sds_lora``.
_OUTER_ONLY = (
    (optax.MultiStepsState, "optax.MultiSteps"),
    (optax.ApplyIfFiniteState, "optax.apply_if_finite"),
)


def _after_steps(adapters: Any, steps: Any) -> tuple[Any, Any]:
  """``(adapters, steps)`` behind an optimization barrier: work on the adapters waits for the steps.

  The groups' stacked copies of the factors and bases depend on the parameters only, so
  XLA would form them at the start of the train step and keep them alive through the
  forward and backward passes (4 MiB at the peak of the d = 1024, r = 64 stack).
  """
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  tied, steps = jax.lax.optimization_barrier(([leaves[i] for i in arrays], steps))
  for i, x in zip(arrays, tied):
    leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves), steps


def _check_inner_state(inner_state: Any) -> None:
  """Raises if an outer-only wrapper's state is found inside ``inner_state``."""
  types = tuple(t for t, _ in _OUTER_ONLY)
  for node in jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, types)):
    for t, name in _OUTER_ONLY:
      if isinstance(node, t):
        raise ValueError(  # noqa: TRY004 (an invalid composition)
            f"{name} found inside sds_lora's inner optimizer: put it outside sds_lora "
            f"({name}(sds_lora(...)), not sds_lora({name}(...))) so that the warm-up "
            "counts real updates and the switch never lands mid-step"
        )


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return value


def sds_lora(
    inner: optax.GradientTransformation,
    *,
    warmup_steps: int = 10,
    refresh: str | int | RefreshSchedule = "every_step",
    phases: int = 5,
    total_steps: int | None = None,
    basis: str = "gram",
    switch_state: str = "reset",
    rewarmup_steps: int = REWARMUP_STEPS,
    refresh_rule: str = "orth",
    step_scale: float = STEP_SCALE,
) -> optax.GradientTransformationExtraArgs:
  """Trains a tree of ``Adapter`` nodes as SDS-LoRA with the optimizer ``inner``.

  Add it once, around the whole optimizer chain; see the module docstring for
  the life cycle and the moment-reset rule. ``update`` needs ``params``.

  Args:
    inner: the user's optimizer (any ``GradientTransformation``, e.g. an
      ``optax.chain``); it sees ``trainable_params(params)``.
    warmup_steps: plain-LoRA updates before the switch. ``0`` is allowed:
      adapters already in SDS mode (``sds_on == 1``) train as SDS-LoRA from the
      first update; adapters still in warm-up mode switch at the end of the
      first update (the usual ``b = 0`` initialisation has no basis, so at
      least one LoRA update is needed). An adapter found with ``sds_on == 0``
      after the warm-up (e.g. added later) switches at the next update.
    refresh: when to recompute the bases after the switch: ``"every_step"``
      (default; the bases are a function of the factors), an int ``k`` (every
      ``k`` updates), ``"phases"`` (growing intervals ``1, 2, ..., phases``
      over ``total_steps - warmup_steps`` updates) or a callable ``j -> bool``
      of the post-warm-up step ``j >= 1``. Adapters already in SDS mode during
      the warm-up are refreshed after every warm-up update. Every schedule but
      the default needs SDS adapters with ``fresh_bases=False`` (``init`` and
      ``update`` raise otherwise): the default lets them run at rank r.
    phases: the number of phases for ``refresh="phases"`` (default 5).
    total_steps: the total number of updates, warm-up included; needed by
      ``refresh="phases"``.
    basis: how the switch and the refreshes compute bases: ``"gram"``
      (default: Cholesky-QR on ``r x r`` Gram matrices, so a sharded factor is
      never gathered) or ``"householder"`` (LAPACK / XLA QR).
    switch_state: what the switch does to the inner optimizer's state of the
      switching factors: ``"reset"`` (default: the moment-reset rule of the
      module docstring) or ``"keep"`` (moments carry on, although the factors
      they describe are re-expressed in other coordinates). The defaults
      (``warmup_steps=10``, ``"reset"``, ``refresh="every_step"``) were kept
      after the project's ablations (MiniLM sentiment, AdamW at 2e-3, 3 seeds;
      README, "Defaults, chosen from the ablations"): ``"keep"`` and a longer
      warm-up did better on average, but neither removed the loss jump after the
      switch. Below LoRA's best rate the defaults trained stably.
    rewarmup_steps: ``k > 0`` scales the inner updates of adapters in SDS mode by
      ``min(1, j / k)`` on post-warm-up update ``j`` (a linear learning-rate
      re-warm-up of the factors after the switch; other leaves, and adapters
      that switch later than ``warmup_steps``, are not scaled). ``0``: none.
      The default, 10, with the default ``step_scale``, kept the loss from
      jumping at the switch at twice LoRA's best rate on every seed of the
      project's stability runs (README, "SDS-LoRA at LoRA's learning rates");
      the step scale alone did on 9 of 10, the re-warm-up alone did not help.
    refresh_rule: what a refresh does: ``"orth"`` (default: ``qa = orth(a)``,
      ``qb = orth(b.T)`` from the updated factors, signs aligned, factors
      kept; the adapted function changes by about as much as the step) or
      ``"retract"`` (bases and factors re-expressed from the update itself,
      which moves only to its best rank-r approximation: see
      ``retraction.py``).
    step_scale: multiplies the inner updates of adapters in SDS mode (``1.0``:
      the inner optimizer's step unchanged). An Adam step of about ``lr`` per
      entry moves the SDS update ``s (qa b + a qb.T)`` along two orthonormal
      bases, LoRA's ``s a b`` along ``a``, whose singular values are about
      ``1/sqrt(3)`` at the PEFT initialisation: at one learning rate an
      SDS-LoRA step is about ``sqrt(2) / (1/sqrt(3)) = sqrt(6)`` times LoRA's
      early in training. The default ``1/sqrt(6)`` gives it LoRA's size, so a
      rate tuned for LoRA carries over: at twice LoRA's best rate the unscaled
      steps diverged or jumped at the switch, the scaled ones did not (README,
      "SDS-LoRA at LoRA's learning rates").

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra arguments go to ``inner``.

  Raises:
    TypeError: if ``inner`` is not a gradient transformation.
    ValueError: on invalid arguments (at construction); in ``init`` when
      ``inner`` contains ``optax.MultiSteps`` or ``optax.apply_if_finite``
      (wrap ``sds_lora`` with them instead); or when ``update`` is called
      without ``params`` or with an SDS adapter that has no ``sds_on``.

  Examples:
    >>> import jax, optax, sdslora_jax as sl
    >>> from sdslora_jax.optim import sds_lora
    >>> params = {"w": sl.init_adapter(jax.random.key(0), 16, 8, rank=2, scale=1.0)}
    >>> tx = sds_lora(optax.adamw(1e-3), warmup_steps=10)
    >>> state = tx.init(params)

  References:
    Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
    Low-Rank Adaptation", arXiv 2606.16454, 2026.
  """
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise TypeError(f"inner must be an optax GradientTransformation, got {inner!r}")
  warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
  phases = _check_int("phases", phases, 1)
  if total_steps is not None:
    total_steps = _check_int("total_steps", total_steps, 1)
  if basis not in BASIS_METHODS:
    raise ValueError(f"unknown basis method {basis!r}; choose from {BASIS_METHODS}")
  if switch_state not in SWITCH_STATES:
    raise ValueError(f"unknown switch_state {switch_state!r}; choose from {SWITCH_STATES}")
  rewarmup_steps = _check_int("rewarmup_steps", rewarmup_steps, 0)
  if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)) or not (
      0.0 < step_scale < float("inf")):
    raise ValueError(f"step_scale must be a positive finite number, got {step_scale!r}")
  step_scale = float(step_scale)
  if refresh_rule not in REFRESH_RULES:
    raise ValueError(f"unknown refresh_rule {refresh_rule!r}; choose from {REFRESH_RULES}")
  should_refresh = make_refresh_schedule(
      refresh, warmup_steps=warmup_steps, phases=phases, total_steps=total_steps
  )
  inner = optax.with_extra_args_support(inner)
  every_update = refreshes_every_update(refresh)

  def check_fresh(params):
    if every_update:
      return
    leaves = jax.tree_util.tree_flatten_with_path(
        _trees.unwrap_variables(params), is_leaf=is_adapter)[0]
    fresh = [jax.tree_util.keystr(p) for p, x in leaves if _is_sds(x) and x.fresh_bases]
    if fresh:
      raise ValueError(
          f"sds_lora(refresh={refresh!r}) keeps the bases between refreshes, but the SDS "
          f"adapters at {fresh[:5]}{' ...' if len(fresh) > 5 else ''} are built for bases "
          "refreshed after every update (fresh_bases=True, the default; they run at rank r "
          "and would be wrong with stale bases). Build them with rule(..., fresh_bases=False), "
          "or pass the tree through sdslora_jax.adapter.with_fresh_bases(params, False).")

  def init_fn(params):
    check_fresh(params)
    inner_state = inner.init(trainable_params(params))
    _check_inner_state(inner_state)
    return SdsLoraState(
        count=jnp.zeros([], jnp.int32),
        num_refreshes=jnp.zeros([], jnp.int32),
        inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sds_lora needs params: call update(updates, state, params)")
    check_fresh(params)
    _check_inner_state(state.inner_state)
    # ``treedef`` is the caller's structure (NNX Variable nodes included): the
    # returned updates have it. The inner optimizer works on unwrapped trees.
    _, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_adapter)
    plain = _trees.unwrap_variables(params)
    leaves, plain_def = jax.tree_util.tree_flatten(plain, is_leaf=is_adapter)
    sds_idx = [i for i, leaf in enumerate(leaves) if _is_sds(leaf)]
    for i in sds_idx:
      if leaves[i].sds_on is None or leaves[i].qa is None or leaves[i].qb is None:
        raise ValueError("an SDS adapter needs qa, qb and sds_on (see init_adapter)")
    view = jax.tree.map(_strip, plain, is_leaf=is_adapter)  # trainable_params, unwrapped once
    inner_updates, inner_state = inner.update(
        trainable_params(updates), state.inner_state, view, **extra_args
    )
    count = optax.safe_increment(state.count)
    upd_leaves = plain_def.flatten_up_to(inner_updates)
    if not sds_idx:
      return treedef.unflatten(upd_leaves), SdsLoraState(count, state.num_refreshes, inner_state)

    view_leaves = plain_def.flatten_up_to(view)
    # SDS adapters alike in shapes, dtypes and scale are stacked into groups: the
    # switch, the refresh and the stamps then run once per group (and the QRs once
    # per factor shape), so the program does not grow with the number of adapters.
    groups = stack_groups(*_after_steps({i: leaves[i] for i in sds_idx},
                                        {i: (upd_leaves[i].a, upd_leaves[i].b) for i in sds_idx}))
    if rewarmup_steps or step_scale != 1.0:
      # Factor steps of adapters already in SDS mode: x step_scale, and x the re-warm-up ramp.
      ramp = jnp.clip((count - warmup_steps) / rewarmup_steps, 0.0, 1.0) if rewarmup_steps else 1.0
      for g in groups:  # one factor per member (a scanned stack: per layer)
        f = jnp.where(in_sds_phase(g.sds_on), ramp * step_scale, 1.0)[:, None, None]
        g.ua, g.ub = (g.ua * f).astype(g.ua.dtype), (g.ub * f).astype(g.ub.dtype)
    was_on = [in_sds_phase(g.sds_on) for g in groups]
    switch = [(count >= warmup_steps) & ~on for on in was_on]
    any_switch = jnp.any(jnp.concatenate(switch))
    j = count - warmup_steps
    refresh_now = jnp.where(j <= 0, True, jnp.asarray(should_refresh(jnp.maximum(j, 1))))
    any_refresh = refresh_now & jnp.any(jnp.concatenate(was_on))
    # The factor updates in the dtype they are returned in, and the factors they give
    # (float32 copies of exactly what apply_updates will leave).
    steps = [(g.ua.astype(_update_dtype(g.a, g.ua)), g.ub.astype(_update_dtype(g.b, g.ub)))
             for g in groups]
    stepped = [(_apply(g.a, ua).astype(_F32), _apply(g.b, ub).astype(_F32))
               for g, (ua, ub) in zip(groups, steps)]

    # Orthonormal bases of the updated factors: the refresh's new bases and the switch's
    # first step share them, so the program holds one QR per factor shape.
    def updated_bases(_):
      mats = {}
      for k, (a1, b1) in enumerate(stepped):
        mats[k, "a"] = (a1,)
        mats[k, "b"] = (jnp.swapaxes(b1, -1, -2),)
      q = _batching.map_groups(lambda m: (orthonormal_basis(m, method=basis),), mats, tails=(2,))
      return [(q[k, "a"][0], q[k, "b"][0]) for k in range(len(groups))]

    def previous_bases(_):
      return [(g.qa.astype(_F32), g.qb.astype(_F32)) for g in groups]

    need_bases = any_switch | any_refresh if refresh_rule == "orth" else any_switch
    updated = jax.lax.cond(need_bases, updated_bases, previous_bases, None)

    # Switch: the updated factors re-expressed in SDS form (activate_sds), moments reset.
    # Per group: (factor updates, sds_on, float32 factors, switch bases).
    def do_switch(istate):
      out = []
      for k, g in enumerate(groups):
        a1, b1 = stepped[k]
        a2, b2, qa2, qb2 = activated_from_bases(a1, b1, *updated[k], jnp.full(g.n, g.scale, _F32))
        sw = switch[k][:, None, None]
        out.append((
            _update_to(g.a, a2, sw, steps[k][0]),
            _update_to(g.b, b2, sw, steps[k][1]),
            jnp.where(switch[k], 1.0, g.sds_on).astype(g.sds_on.dtype),
            jnp.where(sw, a2, a1),
            jnp.where(sw, b2, b1),
            qa2,
            qb2,
        ))
      if switch_state == "keep":
        return out, istate
      new_view, flags = {}, {}
      for k, g in enumerate(groups):
        new_a, new_b = _apply(g.a, out[k][0]), _apply(g.b, out[k][1])
        for i, (na, nb, sw) in g.unstack(new_a, new_b, switch[k]).items():
          new_view[i] = dataclasses.replace(view_leaves[i], a=na, b=nb)
          flags[id(view_leaves[i])] = sw
      fresh = inner.init(plain_def.unflatten([new_view.get(i, v)
                                              for i, v in enumerate(view_leaves)]))
      return out, reset_switched(view, istate, fresh, flags)

    def no_switch(istate):
      return [(*steps[k], g.sds_on, *stepped[k], *updated[k])
              for k, g in enumerate(groups)], istate

    out, inner_state = jax.lax.cond(any_switch, do_switch, no_switch, inner_state)

    def retracted(_):
      # Groups alike in shapes retract as one batch (one QR per shape, as the switch).
      items = {k: (out[k][3], out[k][4], g.qa, g.qb) for k, g in enumerate(groups)}
      moved = _batching.map_groups(lambda *x: retract(*x, method=basis), items,
                                   tails=(2, 2, 2, 2))
      bases, factors = [], []
      for k, g in enumerate(groups):
        a2, b2, qa2, qb2 = moved[k]
        now = (was_on[k] & refresh_now)[:, None, None]
        factors.append((_update_to(g.a, a2, now, out[k][0]), _update_to(g.b, b2, now, out[k][1])))
        bases.append((qa2, qb2))
      return bases, factors

    def kept(_):
      return [(g.qa, g.qb) for g in groups], [o[:2] for o in out]

    # Bases: set at the switch; recomputed from the updated factors (signs aligned to the
    # previous bases) for adapters that were already in SDS mode, on schedule.
    # (refresh_rule="retract": the refresh retracts bases and factors instead.)
    if refresh_rule == "orth":
      factors = [o[:2] for o in out]
      moved_bases = [tuple(align_signs(q, prev) for q, prev in zip(updated[k], (g.qa, g.qb)))
                     for k, g in enumerate(groups)]
    else:
      moved_bases, factors = jax.lax.cond(any_refresh, retracted, kept, None)
    bases = []
    for k, g in enumerate(groups):
      now = (was_on[k] & refresh_now)[:, None, None]
      sw = switch[k][:, None, None]
      bases.append(tuple(
          jnp.where(sw, q_sw, jnp.where(now, moved, prev)).astype(prev.dtype)
          for moved, q_sw, prev in zip(moved_bases[k], out[k][5:], (g.qa, g.qb))))
    result = list(upd_leaves)
    for k, g in enumerate(groups):
      (ua, ub), on = factors[k], out[k][2]
      qa, qb = bases[k]
      stamp = None
      if g.stamp is not None:  # the stamps of the arrays exactly as apply_updates leaves them
        stamp = jax.vmap(adapter_stamp)(
            _apply(g.a, ua), _apply(g.b, ub), _apply(g.qa, qa - g.qa), _apply(g.qb, qb - g.qb),
            _apply(g.sds_on, on - g.sds_on)) - g.stamp
      parts = (ua, ub, qa - g.qa, qb - g.qb, on - g.sds_on) + ((stamp,) if stamp is not None else ())
      for i, arrays in g.unstack(*parts).items():
        result[i] = dataclasses.replace(
            leaves[i], a=arrays[0], b=arrays[1], qa=arrays[2], qb=arrays[3], sds_on=arrays[4],
            stamp=arrays[5] if stamp is not None else None,
        )
    new_state = SdsLoraState(
        count=count,
        num_refreshes=jnp.where(
            any_refresh, optax.safe_increment(state.num_refreshes), state.num_refreshes
        ),
        inner_state=inner_state,
    )
    return treedef.unflatten(result), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["SdsLoraState", "sds_lora", "trainable_params"]
