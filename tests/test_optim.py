"""Tests of ``sdslora_jax.optim.sds_lora`` and its refresh schedules."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sdslora_jax as sl
from sdslora_jax.adapter import restamp, with_fresh_bases
from sdslora_jax.optim import SdsLoraState, sds_lora, trainable_params
from sdslora_jax.optim.schedules import make_refresh_schedule, refresh_phases, refresh_steps
from testing_utils import assert_bases_consistent, random_normal

D_IN, D_OUT, RANK = 12, 10, 3


def _sds(key, d_in=D_IN, d_out=D_OUT, rank=RANK, scale=0.5, on=False):
  return sl.init_adapter(key, d_in, d_out, rank=rank, scale=scale, method="sds", sds_on=on)


def _tree(seed=0, on=False):
  """Two SDS adapters, one LoRA adapter, a head: a small model's trainable tree."""
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "layer0": {"kernel": _sds(k[0], on=on)},
      "layer1": {"kernel": _sds(k[1], d_in=D_OUT, d_out=6, rank=2, scale=2.0, on=on)},
      "lora": sl.init_adapter(k[2], D_IN, 6, rank=2, scale=1.0, method="lora"),
      "head": random_normal(k[3], (6, 4)) * 0.1,
  }


def _data(seed=1, n=32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return random_normal(kx, (n, D_IN)), random_normal(ky, (n, 4))


def _forward(params, x):
  h = sl.adapter_matmul(x, params["layer0"]["kernel"])
  h = jnp.tanh(h + x[:, :D_OUT])
  h = (
      sl.adapter_matmul(h, params["layer1"]["kernel"])
      + sl.adapter_matmul(x, params["lora"])
      + h[:, :6]
  )
  return h @ params["head"]


def _loss(params, x, y):
  return jnp.mean((_forward(params, x) - y) ** 2)


def _make_step(tx, counter=None):
  @jax.jit
  def step(params, state, x, y):
    if counter is not None:
      counter.append(1)
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def _no_stamps(tree):
  return jax.tree.map(lambda x: dataclasses.replace(x, stamp=None) if sl.is_adapter(x) else x,
                      tree, is_leaf=sl.is_adapter)


def _sds_adapters(tree):
  leaves = jax.tree.leaves(tree, is_leaf=sl.is_adapter)
  return [x for x in leaves if sl.is_adapter(x) and x.method == "sds"]


# ----------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": -1},
        {"warmup_steps": 1.5},
        {"warmup_steps": True},
        {"refresh": "sometimes"},
        {"refresh": 0},
        {"refresh": "phases"},  # needs total_steps
        {"refresh": "phases", "total_steps": 10, "warmup_steps": 10},
        {"phases": 0},
        {"total_steps": 0},
    ],
)
def test_factory_validates_arguments(kwargs):
  with pytest.raises(ValueError):
    sds_lora(optax.sgd(0.1), **kwargs)


def test_factory_rejects_non_transform():
  with pytest.raises(TypeError):
    sds_lora(0.1)


def test_update_needs_params():
  params = _tree()
  tx = sds_lora(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)


# --------------------------------------------------------------------------- schedules


def test_refresh_every_k():
  assert refresh_steps(make_refresh_schedule(3, warmup_steps=0), 10) == [3, 6, 9]
  assert refresh_steps(make_refresh_schedule("every_step", warmup_steps=0), 4) == [1, 2, 3, 4]


def test_refresh_phases_growing_intervals():
  # P = 3 phases over T = 12 steps: interval ceil(3 j / 12) = 1 (j <= 4), 2, 3.
  steps = refresh_steps(refresh_phases(3, 12), 15)
  assert steps == [1, 2, 3, 4, 6, 8, 9, 12, 15]
  # Beyond T the interval stays P; the same as a direct evaluation of the rule.
  expected = [j for j in range(1, 13) if j % -(-3 * j // 12) == 0]
  assert steps[: len(expected)] == expected
  # total_steps counts the warm-up: T = total_steps - warmup_steps.
  sched = make_refresh_schedule("phases", warmup_steps=5, phases=3, total_steps=17)
  assert refresh_steps(sched, 12) == expected


# ---------------------------------------------------------------------------- behaviour


def test_inner_optimizer_sees_only_trainable_leaves():
  params = _tree()
  tx = sds_lora(optax.adamw(1e-2, weight_decay=0.5), warmup_steps=2)
  state = tx.init(params)
  adam = optax.tree_utils.tree_get(state, "mu")
  # The moments mirror the trainable view: no entries for qa, qb, sds_on.
  assert jax.tree.structure(adam) == jax.tree.structure(trainable_params(params))
  mu0 = adam["layer0"]["kernel"]
  assert mu0.qa is None and mu0.qb is None and mu0.sds_on is None
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable_params(params)))
  assert sum(x.size for x in jax.tree.leaves(adam)) == n_trainable


def test_warmup_is_plain_inner_optimizer_then_switch_preserves_function():
  params = _tree()
  x, y = _data()
  inner = optax.adam(3e-2)
  tx = sds_lora(inner, warmup_steps=4)
  step = _make_step(tx)
  state = tx.init(params)
  # Reference: the inner optimizer on the trainable leaves, adapters never switched.
  ref_params = params
  ref_state = inner.init(trainable_params(params))

  @jax.jit
  def ref_step(p, s):
    g = jax.grad(_loss)(p, x, y)
    u, s = inner.update(trainable_params(g), s, trainable_params(p))
    return optax.apply_updates(trainable_params(p), u), s

  for t in range(1, 5):
    prev = params
    params, state, _ = step(params, state, x, y)
    new_view, ref_state = ref_step(ref_params, ref_state)
    ref_params = jax.tree.map(
        lambda p, v: restamp(dataclasses.replace(p, a=v.a, b=v.b)) if sl.is_adapter(p) else v,
        ref_params, new_view, is_leaf=sl.is_adapter)
    if t < 4:  # warm-up: the inner updates (to XLA fusion round-off), bases untouched
      chex.assert_trees_all_close(_no_stamps(params), _no_stamps(ref_params), rtol=1e-5,
                                  atol=1e-7)  # stamps hash bits: compared in test_misuse.py
      for ad, old in zip(_sds_adapters(params), _sds_adapters(prev)):
        assert float(ad.sds_on) == 0.0
        chex.assert_trees_all_equal((ad.qa, ad.qb), (old.qa, old.qb))
  # Update 4 is the switch: SDS mode, consistent bases, same function.
  for ad, ref in zip(_sds_adapters(params), _sds_adapters(ref_params)):
    assert float(ad.sds_on) == 1.0
    assert_bases_consistent(ad)
    want = sl.lora_delta(ref.a, ref.b, scale=ref.scale)
    np.testing.assert_allclose(sl.kernel_delta(ad), want, atol=1e-5 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(_forward(params, x), _forward(ref_params, x), rtol=1e-5, atol=1e-6)
  # Non-SDS leaves are untouched by the switch.
  chex.assert_trees_all_close(params["head"], ref_params["head"], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(params["lora"], ref_params["lora"], rtol=1e-5, atol=1e-7)


def test_moments_reset_at_switch_counts_continue():
  """A head shares Adam's state: its count continues, switching factors keep ``nu``."""
  params = _tree()
  x, y = _data()
  tx = sds_lora(optax.adamw(1e-2), warmup_steps=3)
  step = _make_step(tx)
  state = tx.init(params)
  for _ in range(2):
    params, state, _ = step(params, state, x, y)
  before = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert jnp.any(before.mu["layer0"]["kernel"].a != 0)  # so the reset below means something
  params, state, _ = step(params, state, x, y)  # the switch
  adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert int(adam.count) == 3 and int(state.count) == 3  # counts continue
  for name in ("layer0", "layer1"):
    for f in ("a", "b"):
      assert not jnp.any(getattr(adam.mu[name]["kernel"], f))  # first moments reset
      assert jnp.all(getattr(adam.nu[name]["kernel"], f) > 0)  # second moments kept
  # Moments of the head and of the LoRA adapter continue (non-zero).
  for moments, old in ((adam.mu, before.mu), (adam.nu, before.nu)):
    assert jnp.all(moments["head"] != 0) and jnp.any(moments["lora"].b != 0)
    assert not jnp.allclose(moments["head"], old["head"])
  # Next update: Adam runs again from the fresh moments.
  params, state, _ = step(params, state, x, y)
  adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert jnp.any(adam.mu["layer0"]["kernel"].a != 0)


def _sds_only(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"q": _sds(k[0]), "v": _sds(k[1], d_in=D_OUT, d_out=6, rank=2, scale=2.0)}


def _const_grads(params):
  return jax.tree.map(lambda v: jnp.full(jnp.shape(v), 0.3, jnp.asarray(v).dtype), params)


def _max_post_switch_update(params, tx, warm, post):
  """Largest |factor update| over ``post`` updates after the switch, and the last state."""
  update = jax.jit(tx.update)
  state, worst = tx.init(params), 0.0
  for t in range(1, warm + post + 1):
    u, state = update(_const_grads(params), state, params)
    params = optax.apply_updates(params, u)
    if t > warm:
      steps = [float(jnp.abs(v).max()) for ad in _sds_adapters(u) for v in (ad.a, ad.b)]
      worst = max(worst, *steps)
  return worst, state


@pytest.mark.parametrize("with_head", [False, True])
def test_no_step_size_spike_after_long_warmup(with_head):
  """Constant gradients: post-switch AdamW updates stay at lr (fresh Adam: exactly lr)."""
  lr, warm = 1e-3, 200
  params = _sds_only()
  if with_head:
    params["head"] = jnp.ones((6, 4))
  tx = sds_lora(optax.adamw(lr, weight_decay=0.0), warmup_steps=warm)
  worst, state = _max_post_switch_update(params, tx, warm, 30)
  assert worst <= 1.05 * lr, worst / lr
  adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  # SDS adapters only: Adam's bias-correction count restarted at the switch.
  assert int(adam.count) == (warm + 30 if with_head else 30)
  assert int(state.count) == warm + 30


def test_sds_only_tree_restarts_adam_exactly():
  """Without other leaves, post-switch updates are a fresh Adam's on the same gradients."""
  lr, warm = 1e-2, 200
  params = _sds_only()
  tx = sds_lora(optax.adamw(lr, weight_decay=0.0), warmup_steps=warm, step_scale=1.0,
                rewarmup_steps=0)
  x = random_normal(jax.random.key(3), (16, D_IN))
  y = random_normal(jax.random.key(4), (16, 6))

  def loss(p):
    h = jnp.tanh(sl.adapter_matmul(x, p["q"]) + x[:, :D_OUT])
    return jnp.mean((sl.adapter_matmul(h, p["v"]) - y) ** 2)

  grad = jax.jit(jax.grad(loss))
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(warm):
    u, state = update(grad(params), state, params)
    params = optax.apply_updates(params, u)
  adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert int(adam.count) == 0
  for moments in (adam.mu, adam.nu):
    assert not any(jnp.any(v) for v in jax.tree.leaves(moments))
  ref = optax.adam(lr)
  ref_state = ref.init(trainable_params(params))
  ref_update = jax.jit(ref.update)
  for _ in range(5):
    g = grad(params)
    u, state = update(g, state, params)
    want, ref_state = ref_update(trainable_params(g), ref_state)
    for got, exp in zip(_sds_adapters(u), _sds_adapters(want)):
      chex.assert_trees_all_close((got.a, got.b), (exp.a, exp.b), rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, u)


def test_schedule_continues_when_adam_count_restarts():
  warm, lr = 5, 1e-2
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, 3, 40, end_value=1e-4)
  tx = sds_lora(optax.adamw(sched, weight_decay=0.0), warmup_steps=warm, step_scale=1.0,
                rewarmup_steps=0)
  params = _sds_only()
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(1, warm + 3):
    u, state = update(_const_grads(params), state, params)
    params = optax.apply_updates(params, u)
    if t > warm:  # fresh Adam on constant gradients: |update| = lr(t - 1) exactly
      for ad in _sds_adapters(u):
        np.testing.assert_allclose(ad.a, -sched(t - 1), rtol=1e-4)
  assert float(sched(warm)) > 2 * float(sched(1))  # not the schedule restarted
  assert int(optax.tree_utils.tree_get(state, "ScaleByScheduleState").count) == warm + 2
  assert int(optax.tree_utils.tree_get(state, "ScaleByAdamState").count) == 2


@pytest.mark.parametrize(
    "inner, name",
    [
        (optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2).gradient_transformation(),
         "MultiSteps"),
        (optax.chain(optax.clip(1.0), optax.apply_if_finite(optax.adam(1e-2), 3)),
         "apply_if_finite"),
    ],
)
def test_outer_only_wrappers_rejected_inside(inner, name):
  params = _tree()
  tx = sds_lora(inner)
  with pytest.raises(ValueError, match=f"{name}.*outside sds_lora"):
    tx.init(params)
  with pytest.raises(ValueError, match=f"{name}.*outside sds_lora"):
    jax.jit(tx.init)(params)


@pytest.mark.parametrize("refresh", ["every_step", 3, "phases"])
def test_bases_after_every_refresh(refresh):
  params = with_fresh_bases(_tree(), refresh == "every_step")
  x, y = _data()
  warm, total = 3, 20
  inner = optax.adamw(2e-2, weight_decay=0.5)  # decay must never reach the bases
  tx = sds_lora(inner, warmup_steps=warm, refresh=refresh, phases=3, total_steps=total)
  sched = make_refresh_schedule(refresh, warmup_steps=warm, phases=3, total_steps=total)
  expected = set(refresh_steps(sched, total - warm))
  step = _make_step(tx)
  state = tx.init(params)
  seen = set()
  for t in range(1, total + 1):
    prev = params
    params, state, _ = step(params, state, x, y)
    j = t - warm
    for ad, old in zip(_sds_adapters(params), _sds_adapters(prev)):
      # Fresh: a lies in the span of qa (what the rank-r op of fresh_bases adapters needs).
      fresh = bool(jnp.linalg.norm(ad.a - ad.qa @ (ad.qa.T @ ad.a))
                   <= 1e-4 * jnp.linalg.norm(ad.a))
      if j == 0:
        assert_bases_consistent(ad)  # the switch
        assert fresh
      elif j > 0 and j in expected:
        assert_bases_consistent(ad)
        assert not jnp.array_equal(ad.qa, old.qa)
        assert fresh
        seen.add(j)
      elif j > 0:  # no refresh: bases exactly unchanged, stale for the moved factors
        chex.assert_trees_all_equal((ad.qa, ad.qb, ad.sds_on), (old.qa, old.qb, old.sds_on))
        assert not fresh
  assert seen == expected
  assert int(state.num_refreshes) == len(expected)


def _updates_and_inner_reference(tx, inner, num_steps):
  """Steps ``tx``; yields (updates after the switch, the inner optimizer's own updates from
  the same parameters and inner state), from the first update after the switch on."""
  params = with_fresh_bases(_tree(), False)  # the schedules here keep the bases between refreshes
  x, y = _data()
  step = _make_step(tx)
  state = tx.init(params)
  inner_update = jax.jit(
      lambda p, s: inner.update(trainable_params(jax.grad(_loss)(p, x, y)), s, trainable_params(p))
  )
  for _ in range(num_steps):
    want, _ = inner_update(params, state.inner_state)
    params, state, updates = step(params, state, x, y)
    j = int(state.count) - 1
    if j >= 1:
      yield j, updates, want


def test_factor_updates_bit_exact_between_events():
  """After the switch, factors move by exactly the inner optimizer's updates."""
  inner = optax.sgd(0.05, momentum=0.9)
  tx = sds_lora(inner, warmup_steps=1, refresh=4, step_scale=1.0, rewarmup_steps=0)
  seen = 0
  for _, updates, want in _updates_and_inner_reference(tx, inner, 3):
    seen += 1
    for got, ref in zip(_sds_adapters(updates), _sds_adapters(want)):
      chex.assert_trees_all_close((got.a, got.b), (ref.a, ref.b), rtol=1e-6, atol=1e-7)
      assert not jnp.any(got.qa) and not jnp.any(got.sds_on)
  assert seen == 2


def test_one_trace_for_warmup_switch_and_refreshes():
  params = _tree()
  x, y = _data()
  traces = []
  params = with_fresh_bases(params, False)
  tx = sds_lora(optax.adamw(1e-2), warmup_steps=3, refresh="phases", phases=2, total_steps=12)
  step = _make_step(tx, traces)
  state = tx.init(params)
  for _ in range(12):
    params, state, _ = step(params, state, x, y)
  assert int(state.count) == 12 and int(state.num_refreshes) > 0
  assert len(traces) == 1


def test_init_with_shape_dtype_structs_and_stable_state():
  params = _tree()
  x, y = _data()
  tx = sds_lora(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), warmup_steps=1)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
  s_abstract = tx.init(abstract)
  s0 = tx.init(params)
  s_jit = jax.jit(tx.init)(params)
  step = _make_step(tx)
  params1, s1, _ = step(params, s0, x, y)  # the switch
  _, s2, _ = step(params1, s1, x, y)  # a refresh
  grads = jax.eval_shape(jax.grad(_loss), params, x, y)
  u_abstract, s_update = jax.eval_shape(tx.update, grads, s0, params)  # un-jitted update
  assert isinstance(s1, SdsLoraState)
  for s in (s_abstract, s_jit, s1, s2, s_update):
    assert jax.tree.structure(s) == jax.tree.structure(s0)
    chex.assert_trees_all_equal_shapes_and_dtypes(s, s0)
  assert s0.count.dtype == jnp.int32
  chex.assert_trees_all_equal_shapes_and_dtypes(u_abstract, params)


def test_warmup_zero():
  """sds_on=1 adapters train as SDS from update 1; sds_on=0 ones switch after update 1."""
  x, y = _data()
  tx = sds_lora(optax.adam(1e-2), warmup_steps=0)
  step = _make_step(tx)  # sds_on is data: one compiled step serves both trees
  for on in (True, False):
    params = _tree(on=on)
    state = tx.init(params)
    new, state, updates = step(params, state, x, y)
    for ad, old, u in zip(_sds_adapters(new), _sds_adapters(params), _sds_adapters(updates)):
      assert float(ad.sds_on) == 1.0
      assert_bases_consistent(ad)
      if on:  # no reparameterization: the factors took the plain inner step
        chex.assert_trees_all_equal(ad.a, optax.apply_updates(old.a, u.a))
        assert int(state.num_refreshes) == 1
      else:
        assert int(state.num_refreshes) == 0
        adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
        assert not jnp.any(adam.mu["layer0"]["kernel"].a)


def test_tree_without_sds_adapters_is_plain_inner():
  params = {"lora": sl.init_adapter(jax.random.key(0), 5, 4, rank=2, scale=1.0, method="lora"),
            "w": jnp.ones(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  inner = optax.adam(0.1)
  tx = sds_lora(inner)
  u, s = tx.update(grads, tx.init(params), params)
  want, _ = inner.update(grads, inner.init(params), params)
  chex.assert_trees_all_equal(u, want)
  assert int(s.count) == 1


def _alike_tree(n, seed=0):
  k = jax.random.split(jax.random.key(seed), n + 1)
  tree = {f"l{i}": _sds(k[i], d_in=16, d_out=16, rank=4, scale=2.0) for i in range(n)}
  tree["odd"] = _sds(k[n], d_in=16, d_out=8, rank=2, scale=0.5)  # another group
  return tree


def test_grouped_update_equals_each_adapter_alone():
  # The optimizer stacks alike adapters to switch and refresh them together; each
  # adapter must still follow exactly the trajectory it follows on its own.
  tree = _alike_tree(3)
  # Gradients that leave b at full rank after the warm-up (cos(2 b + s) alone is constant
  # for b = 0: b would be rank 1, and in a direction the warm-up left at zero the switch's
  # basis vector is any orthonormal completion, chosen by rounding noise).
  noise = lambda x: 0.5 * random_normal(jax.random.key(x.size), x.shape)
  grads_at = lambda t, s: jax.tree.map(
      lambda ad: dataclasses.replace(ad, a=jnp.sin(ad.a * 3.0 + s),
                                     b=jnp.cos(ad.b * 2.0 + s) + noise(ad.b)),
      t, is_leaf=sl.is_adapter)
  tx = sds_lora(optax.adam(1e-2), warmup_steps=2)

  def run(params):
    state = tx.init(params)
    step = jax.jit(lambda p, st, s: tx.update(_no_stamps(grads_at(p, s)), st, p))
    for s in range(5):  # warm-up, switch at update 2, refreshes after
      updates, state = step(params, state, float(s))
      params = optax.apply_updates(params, updates)
    return params

  together = run(tree)
  for name in ("l1", "odd"):  # a member of the stacked group, and a group of its own
    alone = run({name: tree[name]})[name]
    # Same trajectory up to float32 rounding: the group's QRs run as batched matmuls,
    # one adapter's as single ones, and these round differently (2e-7 seen, entries O(1)).
    for f in ("a", "b", "qa", "qb", "sds_on"):
      np.testing.assert_allclose(getattr(together[name], f), getattr(alone, f), rtol=1e-6,
                                 atol=1e-6, err_msg=f"{name}.{f}")
    # A stamp hashes its arrays' bits (batched and single matmuls may round differently):
    # each must match its own arrays.
    for got in (together[name], alone):
      assert float(got.stamp) == float(sl.adapter.restamp(got).stamp)


@pytest.mark.slow
def test_update_program_grows_little_per_adapter():
  # Switch, refresh and stamps run once per group of alike adapters: adding an
  # adapter adds only its per-leaf work (the inner optimizer, stacking and slicing),
  # not another QR / SVD / basis computation: about 330 HLO instructions per extra
  # adapter here (optax.adam alone: 90), against about 6,100 when every adapter had
  # its own.
  def size(n):
    tree = _alike_tree(n)
    tx = sds_lora(optax.adam(1e-3), warmup_steps=2)
    compiled = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(
        tree, tx.init(tree), tree).compile()
    return sum(" = " in line for line in compiled.as_text().splitlines())

  small, large = size(2), size(10)
  assert (large - small) / 8 < 600, (small, large)


def test_switch_state_keep_carries_the_moments_on():
  """``switch_state="keep"``: the inner state after the switch is the inner update's own."""
  params = _tree()
  x, y = _data()
  inner = optax.adamw(1e-2)
  tx = sds_lora(inner, warmup_steps=3, switch_state="keep")
  step = _make_step(tx)
  state = tx.init(params)
  for _ in range(2):
    params, state, _ = step(params, state, x, y)
  _, want = jax.jit(lambda p, s: inner.update(trainable_params(jax.grad(_loss)(p, x, y)), s,
                                              trainable_params(p)))(params, state.inner_state)
  params, state, _ = step(params, state, x, y)  # the switch
  assert all(float(ad.sds_on) == 1.0 for ad in _sds_adapters(params))
  chex.assert_trees_all_close(state.inner_state, want, rtol=1e-5, atol=1e-10)
  adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert jnp.any(adam.mu["layer0"]["kernel"].a != 0)  # not reset (the default would zero it)


@pytest.mark.parametrize("kwargs,k,c", [
    ({"rewarmup_steps": 3, "step_scale": 1.0}, 3, 1.0),
    ({}, 10, 6.0**-0.5),  # the defaults: a 10-update ramp of steps scaled by 1/sqrt(6)
])
def test_rewarmup_ramps_the_sds_factor_updates_only(kwargs, k, c):
  """``rewarmup_steps=k``: post-switch update j of SDS factors is c min(1, j/k) x the inner's."""
  inner = optax.sgd(0.05, momentum=0.9)
  tx = sds_lora(inner, warmup_steps=1, refresh=100, **kwargs)
  seen = []
  for j, updates, want in _updates_and_inner_reference(tx, inner, k + 3):
    seen.append(j)
    f = c * min(1.0, j / k)
    for got, ref in zip(_sds_adapters(updates), _sds_adapters(want)):
      chex.assert_trees_all_close((got.a, got.b), (f * ref.a, f * ref.b), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(updates["head"], want["head"], rtol=1e-6)  # not scaled
    chex.assert_trees_all_close(updates["lora"].b, want["lora"].b, rtol=1e-6)
  assert seen == list(range(1, k + 3))


def test_step_scale_scales_the_sds_factor_updates_only():
  """``step_scale=c``: after the switch SDS factors move by c x the inner update."""
  inner, c = optax.sgd(0.05, momentum=0.9), 0.4
  tx = sds_lora(inner, warmup_steps=1, refresh=100, step_scale=c, rewarmup_steps=0)
  seen = 0
  for _, updates, want in _updates_and_inner_reference(tx, inner, 4):
    seen += 1
    for got, ref in zip(_sds_adapters(updates), _sds_adapters(want)):
      chex.assert_trees_all_close((got.a, got.b), (c * ref.a, c * ref.b), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(updates["head"], want["head"], rtol=1e-6)  # not scaled
    chex.assert_trees_all_close(updates["lora"].b, want["lora"].b, rtol=1e-6)
  assert seen == 3


def _dense_sds(ad):
  """The update of an SDS adapter with its stored bases (two branches), in numpy."""
  a, b, qa, qb = (np.asarray(v, np.float64) for v in (ad.a, ad.b, ad.qa, ad.qb))
  return ad.scale * (qa @ b + a @ qb.T)


def test_retract_refresh_moves_to_the_best_rank_r_update():
  """``refresh_rule="retract"``: the switch keeps the function; each refresh lands on the
  best rank-r approximation (dense SVD) of the update the step produced with the old bases."""
  params = _tree()
  x, y = _data()
  inner = optax.adam(3e-2)
  retracting = sds_lora(inner, warmup_steps=2, refresh_rule="retract",
                        step_scale=1.0, rewarmup_steps=0)
  grad, update = jax.jit(jax.grad(_loss)), jax.jit(retracting.update)
  inner_update = jax.jit(lambda g, s, p: inner.update(trainable_params(g), s, trainable_params(p)))
  state = retracting.init(params)
  discarded = []
  for step in range(8):
    g = grad(params, x, y)
    updates, new_state = update(g, state, params)
    new = optax.apply_updates(params, updates)
    # The inner optimizer's own step, before the switch or the refresh acts on it.
    plain, _ = inner_update(g, state.inner_state, params)
    for old, ad, pl in zip(_sds_adapters(params), _sds_adapters(new), _sds_adapters(plain)):
      r = ad.a.shape[1]
      if step == 1:  # the switch: LoRA's update, exactly
        want = old.scale * (np.asarray(old.a + pl.a, np.float64) @ np.asarray(old.b + pl.b))
        np.testing.assert_allclose(_dense_sds(ad), want, atol=1e-5)
      elif step >= 2:
        moved = dataclasses.replace(old, a=old.a + pl.a, b=old.b + pl.b)
        u, sv, vt = np.linalg.svd(_dense_sds(moved))
        np.testing.assert_allclose(_dense_sds(ad), (u[:, :r] * sv[:r]) @ vt[:r], atol=2e-5)
        discarded.append(sv[r] / sv[0])
        assert_bases_consistent(ad)
        # The adapter's own (rank-r) forward agrees with the two branches.
        np.testing.assert_allclose(sl.kernel_delta(ad), _dense_sds(ad), atol=2e-5)
    params, state = new, new_state
  assert max(discarded) > 1e-3  # the steps left the rank-r matrices: truncation was exercised


@pytest.mark.parametrize("kwargs, match", [
    ({"switch_state": "rescale"}, "unknown switch_state"),
    ({"rewarmup_steps": -1}, "rewarmup_steps"),
    ({"refresh_rule": "qr"}, "unknown refresh_rule"),
    ({"step_scale": 0.0}, "step_scale"),
    ({"step_scale": float("nan")}, "step_scale"),
    ({"step_scale": True}, "step_scale"),
])
def test_switch_options_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sds_lora(optax.adam(1e-3), **kwargs)
