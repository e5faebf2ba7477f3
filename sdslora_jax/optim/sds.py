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
   factors (``refresh_bases``, signs aligned to the previous bases) on a
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
plain Optax optimizer, makes the next backward pass raise a ``ValueError``
that says so.

NNX. ``nnx.Optimizer(model, sds_lora(...), wrt=AdapterVariable)`` works: the
inner optimizer is initialised on the values of the ``Variable`` nodes, so its
state holds ``Adapter`` nodes that NNX can update in place. (A plain Optax
optimizer initialised by ``nnx.Optimizer`` on ``AdapterVariable`` state holds
the ``Adapter`` inside NNX's ``OptVariable`` and fails on its second update;
wrap it in ``sds_lora``, which passes LoRA adapters through unchanged.)

Moment reset rule (structural). A subtree of the inner state "mirrors" the
parameters when it has the containers of the tree the inner optimizer sees,
with an ``Adapter`` wherever that tree has one (``optax.MaskedNode`` may stand
for any subtree): Adam's ``mu`` and ``nu``, the masked copies inside
``optax.partition``, factored second moments, stored parameter copies, ... In
such a subtree, the ``a`` and ``b`` entries of every adapter that switches are
replaced by their values in a freshly initialised inner state, ``inner.init``
of the switched parameters, with one exception below. The state of every other
leaf carries on unchanged.

Step counts. A state node whose direct children include both mirroring
subtrees and an integer scalar (``ScaleByAdamState(count, mu, nu)``, Lion,
AMSGrad, Novograd, ...) keeps that scalar as its per-parameter statistics'
step count (Adam's bias correction). Such a count is restarted (set to its
fresh value) together with the moments iff every trainable leaf its mirroring
subtrees cover (``MaskedNode`` entries excluded) is a factor of an SDS adapter
that switches at this update: the factors then restart exactly like a fresh
optimizer, with no post-switch step-size spike. Otherwise (the node also
covers, e.g., a head, a LoRA adapter, or an SDS adapter that is not switching
now) the count continues for the other leaves and, for the switching factors,
only the non-second-moment entries are reset: the second moments (fields
``nu``, ``nu_max``) are kept, so that bias correction at the continued count
is not applied to freshly zeroed second moments (which would scale the first
post-switch updates up to ``~5 x`` the learning rate after a 1000-step warm-up;
kept second moments only enlarge Adam's denominator, so the steps are never
larger than with zeroed ones for the same gradients).
Counts that do not sit next to mirroring subtrees (``ScaleByScheduleState``,
``inject_hyperparams``' count, ``sds_lora``'s own count, ...) always continue,
so learning-rate schedules run on across the switch. An optimizer that stores
per-parameter state in another layout (e.g. a flat list) is not reset.

Composition. ``optax.MultiSteps`` and ``optax.apply_if_finite`` must wrap
``sds_lora``, not sit inside it (inside, the warm-up would count micro-steps
and the switch could land mid-accumulation); ``init`` raises a ``ValueError``
when it finds their state in the inner optimizer.

References:
  Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
  Low-Rank Adaptation", arXiv 2606.16454, 2026.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sdslora_jax import _trees
from sdslora_jax.adapter import adapter_stamp, is_adapter, per_layer
from sdslora_jax.basis import BASIS_METHODS, refresh_bases
from sdslora_jax.optim.schedules import RefreshSchedule, make_refresh_schedule
from sdslora_jax.reparam import activate_sds

_F32 = jnp.float32


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


def _bcast(flag: jax.Array, x: jax.Array) -> jax.Array:
  """A per-layer flag (shape ``L``) broadcast against a per-layer array (``(*L, ...)``)."""
  flag = jnp.asarray(flag)
  return flag.reshape(flag.shape + (1,) * (jnp.ndim(x) - flag.ndim))


def _update_dtype(p: jax.Array, u: jax.Array) -> Any:
  """Factor updates of low-precision factors are float32 (the switch stays exact)."""
  return jnp.promote_types(jnp.asarray(u).dtype, _F32) if jnp.finfo(
      jnp.asarray(p).dtype).bits < 32 else jnp.asarray(u).dtype


def _apply(p: jax.Array, u: jax.Array) -> jax.Array:
  """``optax.apply_updates`` for one leaf."""
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)




# Per-parameter fields kept (not zeroed) for switching factors when the step
# count next to them cannot be restarted: second-moment estimates.
_SECOND_MOMENTS = frozenset({"nu", "nu_max"})

# Wrappers that must sit outside ``sds_lora``.
_OUTER_ONLY = (
    (optax.MultiStepsState, "optax.MultiSteps"),
    (optax.ApplyIfFiniteState, "optax.apply_if_finite"),
)


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


def _reset_mirror(ref: Any, old: Any, fresh: Any, flags: dict[int, jax.Array]) -> Any:
  """Resets the factors of flagged adapters inside a per-parameter subtree."""
  if isinstance(old, optax.MaskedNode):
    return old
  if is_adapter(ref):
    flag = flags.get(id(ref))
    if flag is None:
      return old

    def select(f, o):
      return jax.tree.map(lambda fl, ol: jnp.where(_bcast(flag, ol), fl, ol).astype(ol.dtype),
                          f, o)

    return dataclasses.replace(old, a=select(fresh.a, old.a), b=select(fresh.b, old.b))
  ref_children, ref_def = _trees.children(ref)
  if _trees.is_leaf_def(ref_def):
    return old
  old_children, old_def = _trees.children(old)
  fresh_children, _ = _trees.children(fresh)
  return old_def.unflatten(
      [_reset_mirror(r, o, f, flags) for r, o, f in zip(ref_children, old_children, fresh_children)]
  )


def _coverage(ref: Any, node: Any, flags: dict[int, jax.Array], sw: list[jax.Array]) -> bool:
  """Appends the switch flags of covered SDS factors; whether other leaves are covered."""
  if isinstance(node, optax.MaskedNode):
    return False
  if is_adapter(ref):
    covered = [not isinstance(x, optax.MaskedNode) for x in (node.a, node.b)]
    if id(ref) not in flags:
      return any(covered)
    sw.extend(flags[id(ref)] for c in covered if c)
    return False
  ref_children, ref_def = _trees.children(ref)
  if _trees.is_leaf_def(ref_def):
    return True
  node_children, _ = _trees.children(node)
  other = [_coverage(r, n, flags, sw) for r, n in zip(ref_children, node_children)]
  return any(other)


def _is_count(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.ndim(x) == 0 and jnp.issubdtype(dtype, jnp.integer)


def _key_name(path: tuple[Any, ...]) -> Any:
  key = path[-1]
  return getattr(key, "name", getattr(key, "key", None))


def _reset_state(ref: Any, old: Any, fresh: Any, flags: dict[int, jax.Array]) -> Any:
  """Walks the inner state; applies the moment-reset rule (see the module docs)."""
  if _trees.mirrors(ref, old):
    return _reset_mirror(ref, old, fresh, flags)
  with_path, old_def = jax.tree_util.tree_flatten_with_path(old, is_leaf=lambda y: y is not old)
  if not with_path or _trees.is_leaf_def(old_def):
    return old
  names = [_key_name(path) for path, _ in with_path]
  old_children = [c for _, c in with_path]
  fresh_children, _ = _trees.children(fresh)
  mirror = [not isinstance(c, optax.MaskedNode) and _trees.mirrors(ref, c) for c in old_children]
  count = [_is_count(c) for c in old_children]
  restart = None  # None: no count next to mirrors; else a bool (array): restart it
  if any(mirror) and any(count):
    sw = []  # every covered leaf visited (no short-circuit): it collects all flags
    other = [_coverage(ref, c, flags, sw) for c, m in zip(old_children, mirror) if m]
    restart = False if any(other) or not sw else jnp.all(jnp.stack([jnp.all(f) for f in sw]))
  kept_flags = flags
  if restart is not None:
    kept_flags = {} if restart is False else {k: v & restart for k, v in flags.items()}
  out = []
  for name, o, f, m, c in zip(names, old_children, fresh_children, mirror, count):
    if m:
      out.append(_reset_mirror(ref, o, f, kept_flags if name in _SECOND_MOMENTS else flags))
    elif c and restart is not None and restart is not False:  # a traced restart flag
      out.append(jnp.where(restart, f, o).astype(o.dtype))
    else:
      out.append(_reset_state(ref, o, f, flags))
  return old_def.unflatten(out)


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
      the warm-up are refreshed after every warm-up update.
    phases: the number of phases for ``refresh="phases"`` (default 5).
    total_steps: the total number of updates, warm-up included; needed by
      ``refresh="phases"``.
    basis: how the switch and the refreshes compute bases: ``"gram"``
      (default: Cholesky-QR on ``r x r`` Gram matrices, so a sharded factor is
      never gathered) or ``"householder"`` (LAPACK / XLA QR).

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
  should_refresh = make_refresh_schedule(
      refresh, warmup_steps=warmup_steps, phases=phases, total_steps=total_steps
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
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
    old = {i: leaves[i] for i in sds_idx}
    was_on = {i: jnp.asarray(p.sds_on) > 0.5 for i, p in old.items()}
    switch = {i: (count >= warmup_steps) & ~on for i, on in was_on.items()}

    # Switch: activate_sds on the updated factors, reset their moments.
    def do_switch(operand):
      step, istate = operand
      out, new_view = {}, {}
      for i, p in old.items():
        a1, b1 = _apply(p.a, step[i][0]), _apply(p.b, step[i][1])
        activate = functools.partial(activate_sds, scale=p.scale, method=basis)
        a2, b2, qa2, qb2 = per_layer(activate, p)(a1, b1)
        sw = _bcast(switch[i], a1)
        # float32 differences of values rounded once: p + u is exactly a2 in
        # float32, so apply_updates rounds it back to a2 (no second rounding
        # of a low-precision difference).
        ua = jnp.where(sw, a2.astype(_F32) - p.a.astype(_F32), step[i][0].astype(_F32))
        ub = jnp.where(sw, b2.astype(_F32) - p.b.astype(_F32), step[i][1].astype(_F32))
        out[i] = (
            ua.astype(_update_dtype(p.a, step[i][0])),
            ub.astype(_update_dtype(p.b, step[i][1])),
            jnp.where(_bcast(switch[i], qa2), qa2, p.qa).astype(p.qa.dtype),
            jnp.where(_bcast(switch[i], qb2), qb2, p.qb).astype(p.qb.dtype),
            jnp.where(switch[i], 1.0, p.sds_on).astype(jnp.asarray(p.sds_on).dtype),
        )
        new_view[i] = dataclasses.replace(
            view_leaves[i], a=_apply(p.a, out[i][0]), b=_apply(p.b, out[i][1])
        )
      fresh_leaves = [new_view.get(i, v) for i, v in enumerate(view_leaves)]
      fresh = inner.init(plain_def.unflatten(fresh_leaves))
      flags = {id(view_leaves[i]): switch[i] for i in sds_idx}
      return out, _reset_state(view, istate, fresh, flags)

    def no_switch(operand):
      step, istate = operand
      return {
          i: (step[i][0].astype(_update_dtype(p.a, step[i][0])),
              step[i][1].astype(_update_dtype(p.b, step[i][1])),
              jnp.asarray(p.qa), jnp.asarray(p.qb), jnp.asarray(p.sds_on))
          for i, p in old.items()
      }, istate

    step = {i: (upd_leaves[i].a, upd_leaves[i].b) for i in sds_idx}
    any_switch = jnp.any(jnp.stack([jnp.any(switch[i]) for i in sds_idx]))
    out, inner_state = jax.lax.cond(any_switch, do_switch, no_switch, (step, inner_state))

    # Refresh the bases of adapters that were already in SDS mode.
    j = count - warmup_steps
    refresh_now = jnp.where(j <= 0, True, jnp.asarray(should_refresh(jnp.maximum(j, 1))))
    any_refresh = refresh_now & jnp.any(jnp.stack([jnp.any(was_on[i]) for i in sds_idx]))

    def do_refresh(bases):
      new = {}
      for i, p in old.items():
        a1, b1 = _apply(p.a, out[i][0]), _apply(p.b, out[i][1])
        qa, qb = bases[i]
        qa2, qb2 = per_layer(functools.partial(refresh_bases, method=basis), p)(a1, b1, qa, qb)
        new[i] = (
            jnp.where(_bcast(was_on[i], qa2), qa2, qa).astype(qa.dtype),
            jnp.where(_bcast(was_on[i], qb2), qb2, qb).astype(qb.dtype),
        )
      return new

    bases = {i: (out[i][2], out[i][3]) for i in sds_idx}
    bases = jax.lax.cond(any_refresh, do_refresh, lambda b: b, bases)

    result = list(upd_leaves)
    for i, p in old.items():
      ua, ub, _, _, on = out[i]
      qa, qb = bases[i]
      stamp = None
      if p.stamp is not None:  # the stamp of the arrays exactly as apply_updates leaves them
        stamp = per_layer(adapter_stamp, p)(
            _apply(p.a, ua), _apply(p.b, ub), _apply(p.qa, qa - p.qa), _apply(p.qb, qb - p.qb),
            _apply(p.sds_on, on - p.sds_on))
        stamp = stamp - p.stamp
      result[i] = dataclasses.replace(
          p, a=ua, b=ub, qa=qa - p.qa, qb=qb - p.qb, sds_on=on - p.sds_on, stamp=stamp
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
