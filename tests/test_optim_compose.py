"""``sds_lora`` composed with Optax wrappers: chain, schedules, inject_hyperparams,
MultiSteps, apply_if_finite, partition (LoRA+) and a frozen base."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sdslora_jax as sl
from sdslora_jax.optim import factor_labels, loraplus, sds_lora
from sdslora_jax.adapter import with_fresh_bases
from testing_utils import assert_bases_consistent, random_normal

D_IN, D_OUT, RANK = 12, 8, 3


def _tree(seed=0):
  """A frozen base kernel, two SDS adapters and a trainable bias."""
  k = jax.random.split(jax.random.key(seed), 3)
  return {
      "base": {"kernel": random_normal(k[0], (D_IN, D_OUT)) / np.sqrt(D_IN)},
      "adapters": {
          "q": sl.init_adapter(k[1], D_IN, D_OUT, rank=RANK, scale=0.5, method="sds"),
          "v": sl.init_adapter(k[2], D_IN, D_OUT, rank=2, scale=1.0, method="sds"),
          "bias": jnp.zeros((D_OUT,)),
      },
  }


def _forward(params, x):
  ad = params["adapters"]
  y = x @ params["base"]["kernel"] + ad["bias"]
  return y + sl.adapter_matmul(x, ad["q"]) + jnp.tanh(sl.adapter_matmul(x, ad["v"]))


def _data(seed=1, n=32):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = random_normal(kx, (n, D_IN))
  return x, jnp.sin(x @ random_normal(kw, (D_IN, D_OUT)))


def _loss(params, x, y):
  return jnp.mean((_forward(params, x) - y) ** 2)


def _make_step(tx, traces=None, grad_fn=None):
  @jax.jit
  def step(params, state, x, y):
    if traces is not None:
      traces.append(1)
    grads = jax.grad(_loss)(params, x, y)
    if grad_fn is not None:
      grads = grad_fn(grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _adapters(params):
  return [params["adapters"]["q"], params["adapters"]["v"]]


_FREEZE_BASE = {"base": True, "adapters": False}


def _train_base_frozen(inner, **kw):
  return sds_lora(optax.selective_transform(inner, freeze_mask=_FREEZE_BASE), **kw)


def test_chain_clip_adamw_warmup_cosine():
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 3, 30, end_value=3e-4)
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-2))
  # step_scale=1, no re-warm-up: the loss threshold below was set for the inner optimizer's
  # own steps.
  tx = _train_base_frozen(inner, warmup_steps=5, step_scale=1.0, rewarmup_steps=0)
  traces = []
  step = _make_step(tx, traces)
  params = _tree()
  x, y = _data()
  state = tx.init(params)
  loss0 = _loss(params, x, y)
  for t in range(1, 31):
    params, state = step(params, state, x, y)
    if t == 5:
      for ad in _adapters(params):
        assert float(ad.sds_on) == 1.0
        assert_bases_consistent(ad)
  assert len(traces) == 1
  assert float(_loss(params, x, y)) < 0.5 * float(loss0)
  chex.assert_trees_all_equal(params["base"], _tree()["base"])
  for ad in _adapters(params):
    assert_bases_consistent(ad)


def test_switch_preserves_output_inside_chain():
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, 20)
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched))
  warm = 4
  sds_tx = _train_base_frozen(inner, warmup_steps=warm)
  ref_tx = _train_base_frozen(inner, warmup_steps=10**6)  # never switches
  params = _tree()
  x, y = _data()
  s_sds, s_ref = sds_tx.init(params), ref_tx.init(params)
  p_sds, p_ref = params, params
  step_sds, step_ref = _make_step(sds_tx), _make_step(ref_tx)
  for _ in range(warm):
    p_sds, s_sds = step_sds(p_sds, s_sds, x, y)
    p_ref, s_ref = step_ref(p_ref, s_ref, x, y)
  for ad, ref in zip(_adapters(p_sds), _adapters(p_ref)):
    assert float(ad.sds_on) == 1.0 and float(ref.sds_on) == 0.0
  np.testing.assert_allclose(_forward(p_sds, x), _forward(p_ref, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # schedules across the switch: test_optim (Adam count restarts)
def test_inject_hyperparams_continue_across_switch():
  sched = optax.linear_schedule(1e-2, 1e-3, 20)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=sched, weight_decay=1e-3)
  tx = _train_base_frozen(inner, warmup_steps=3)
  step = _make_step(tx)
  params = _tree()
  x, y = _data()
  state = tx.init(params)
  for t in range(1, 7):
    params, state = step(params, state, x, y)
    hp = optax.tree_utils.tree_get(state, "hyperparams")
    # The injected schedule value is the one for update t (recorded before it).
    np.testing.assert_allclose(hp["learning_rate"], sched(t - 1), rtol=1e-6)
    np.testing.assert_allclose(hp["weight_decay"], 1e-3, rtol=1e-6)
  assert int(optax.tree_utils.tree_get(state, "InjectStatefulHyperparamsState").count) == 6
  # A constant injected learning rate stays editable in the state after the switch.
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=1e-3)
  tx = _train_base_frozen(inner, warmup_steps=1)
  step = _make_step(tx)
  params, state = step(_tree(), tx.init(_tree()), x, y)
  state = optax.tree_utils.tree_set(state, learning_rate=jnp.zeros(()))
  new, state = step(params, state, x, y)
  for ad, old in zip(_adapters(new), _adapters(params)):
    chex.assert_trees_all_equal((ad.a, ad.b), (old.a, old.b))
  assert float(optax.tree_utils.tree_get(state, "learning_rate")) == 0.0


def test_multi_steps_switch_and_refresh_only_on_real_updates():
  k, warm = 3, 2
  tx = optax.MultiSteps(_train_base_frozen(optax.adam(1e-2), warmup_steps=warm), every_k_schedule=k)
  traces = []
  params = _tree()
  x, y = _data()
  state = tx.init(params)

  @jax.jit
  def micro(params, state, x, y):
    traces.append(1)
    updates, state = tx.update(jax.grad(_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for t in range(1, 4 * k + 1):
    prev, prev_state = params, state
    params, state = micro(params, state, x, y)
    inner = state.inner_opt_state
    if t % k:  # accumulation micro-step: nothing moves, inner state untouched
      chex.assert_trees_all_equal(params, prev)
      chex.assert_trees_all_equal(inner, prev_state.inner_opt_state)
    else:
      real = t // k
      assert int(inner.count) == real
      for ad in _adapters(params):
        assert float(ad.sds_on) == float(real >= warm)
        if real >= warm:
          assert_bases_consistent(ad)
      assert int(inner.num_refreshes) == max(0, real - warm)
  assert len(traces) == 1


@pytest.mark.slow
def test_apply_if_finite_skipped_step_changes_nothing():
  warm = 2
  tx = optax.apply_if_finite(
      _train_base_frozen(optax.adam(1e-2), warmup_steps=warm), max_consecutive_errors=3
  )
  params = _tree()
  x, y = _data()
  step = _make_step(tx)
  nan_step = _make_step(tx, grad_fn=lambda g: jax.tree.map(lambda v: v * jnp.nan, g))
  state = tx.init(params)
  params, state = step(params, state, x, y)
  # A non-finite step where the switch would happen: skipped, switch deferred.
  p1, s1 = nan_step(params, state, x, y)
  chex.assert_trees_all_equal(p1, params)
  chex.assert_trees_all_equal(s1.inner_state, state.inner_state)
  assert int(s1.total_notfinite) == 1
  p2, s2 = step(p1, s1, x, y)
  for ad in _adapters(p2):
    assert float(ad.sds_on) == 1.0
  # In the SDS phase a skipped step refreshes nothing and changes nothing.
  p3, s3 = nan_step(p2, s2, x, y)
  chex.assert_trees_all_equal(p3, p2)
  chex.assert_trees_all_equal(s3.inner_state, s2.inner_state)
  _, s4 = step(p3, s3, x, y)
  assert int(s4.inner_state.num_refreshes) == int(s3.inner_state.num_refreshes) + 1
  assert int(s4.inner_state.count) == 3


@pytest.mark.slow
def test_loraplus_partition_learning_rates():
  lr, ratio = 1e-2, 16.0
  tx = sds_lora(loraplus(lr, ratio=ratio, optimizer=optax.sgd), warmup_steps=2)
  params = {"adapters": _tree()["adapters"]}
  x, y = _data()

  def loss(p):
    return _loss({"base": _tree()["base"], **p}, x, y)

  state = tx.init(params)
  for _ in range(2):
    g = jax.grad(loss)(params)
    u, state = jax.jit(tx.update)(g, state, params)
    if int(state.count) == 1:  # warm-up: plain SGD per label
      for ug, gg in zip(_adapters(u), _adapters(g)):
        np.testing.assert_allclose(ug.a, -lr * gg.a, rtol=1e-6)
        np.testing.assert_allclose(ug.b, -ratio * lr * gg.b, rtol=1e-6)
      np.testing.assert_allclose(u["adapters"]["bias"], -lr * g["adapters"]["bias"], rtol=1e-6)
    params = optax.apply_updates(params, u)
  for ad in _adapters(params):
    assert float(ad.sds_on) == 1.0
    assert_bases_consistent(ad)


def test_loraplus_adam_moments_reset_inside_partition():
  tx = _train_base_frozen(loraplus(1e-2, optimizer=optax.adam), warmup_steps=2)
  params = _tree()
  x, y = _data()
  step = _make_step(tx)
  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state, x, y)
  # sds_lora -> selective_transform (partition) -> loraplus (partition) -> adam.
  inner_groups = state.inner_state.inner_states["train"].inner_state.inner_states
  mu_a = optax.tree_utils.tree_get(inner_groups["a"], "mu")
  mu_b = optax.tree_utils.tree_get(inner_groups["b"], "mu")
  mu_other = optax.tree_utils.tree_get(inner_groups["other"], "mu")
  for name in ("q", "v"):
    assert isinstance(mu_a["adapters"][name].b, optax.MaskedNode)
    assert not jnp.any(mu_a["adapters"][name].a)
    assert not jnp.any(mu_b["adapters"][name].b)
  assert jnp.any(mu_other["adapters"]["bias"] != 0)  # other leaves keep their moments
  # Groups of switching factors only restart Adam's count; the bias group's continues.
  count = lambda group: int(optax.tree_utils.tree_get(inner_groups[group], "count"))
  assert (count("a"), count("b"), count("other")) == (0, 0, 2)


def test_frozen_base_has_no_optimizer_state():
  params = _tree()
  tx = _train_base_frozen(optax.adamw(1e-2), warmup_steps=1)
  state = tx.init(params)
  base_size = params["base"]["kernel"].size
  trainable = sum(
      v.size for ad in _adapters(params) for v in (ad.a, ad.b)
  ) + params["adapters"]["bias"].size
  arrays = [v for v in jax.tree.leaves(state) if jnp.ndim(v) > 0]
  assert sum(v.size for v in arrays) == 2 * trainable  # mu and nu, nothing for base
  assert all(v.size != base_size for v in arrays)
  x, y = _data()
  step = _make_step(tx)
  for _ in range(3):
    params, state = step(params, state, x, y)
  chex.assert_trees_all_equal(params["base"], _tree()["base"])
  labels = factor_labels(params)
  assert labels["adapters"]["q"].a == "a" and labels["adapters"]["q"].qa == "frozen"
  assert labels["base"]["kernel"] == "other"


@pytest.mark.parametrize("refresh", [pytest.param(2, marks=pytest.mark.slow), "phases"])
def test_compose_with_refresh_schedules_single_trace(refresh):
  traces = []
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 16)
  tx = optax.MultiSteps(
      optax.apply_if_finite(
          _train_base_frozen(
              optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched)),
              warmup_steps=2, refresh=refresh, total_steps=8, phases=2,
          ),
          max_consecutive_errors=2,
      ),
      every_k_schedule=2,
  )
  step = _make_step(tx, traces)
  params = with_fresh_bases(_tree(), False)
  x, y = _data()
  state = tx.init(params)
  for _ in range(16):
    params, state = step(params, state, x, y)
  assert len(traces) == 1
  for ad in _adapters(params):
    assert float(ad.sds_on) == 1.0


def test_nnx_state_tree():
  nnx = pytest.importorskip("flax.nnx")
  from sdslora_jax.nnx import AdapterVariable

  class Model(nnx.Module):
    def __init__(self):
      k = jax.random.split(jax.random.key(0), 2)
      self.q = AdapterVariable(sl.init_adapter(k[0], D_IN, D_OUT, rank=RANK, scale=1.0))
      self.v = AdapterVariable(sl.init_adapter(k[1], D_IN, D_OUT, rank=2, scale=0.5))
      self.bias = nnx.Param(jnp.zeros((D_OUT,)))

    def __call__(self, x):
      y = sl.adapter_matmul(x, self.q.get_value()) + sl.adapter_matmul(x, self.v.get_value())
      return y + self.bias.get_value()

  graphdef, adapters, rest = nnx.split(Model(), AdapterVariable, ...)
  x, y = _data()
  tx = sds_lora(optax.adamw(1e-2), warmup_steps=2)
  traces = []

  @jax.jit
  def step(adapters, state):
    traces.append(1)
    loss = lambda a: jnp.mean((nnx.merge(graphdef, a, rest)(x) - y) ** 2)
    updates, state = tx.update(jax.grad(loss)(adapters), state, adapters)
    return optax.apply_updates(adapters, updates), state

  state = tx.init(adapters)
  for _ in range(2):
    adapters, state = step(adapters, state)
  mu = jax.tree.leaves(optax.tree_utils.tree_get(state, "mu"), is_leaf=sl.is_adapter)
  assert len(mu) == 2 and all(sl.is_adapter(m) for m in mu)
  assert all(not jnp.any(m.a) and not jnp.any(m.b) for m in mu)  # reset at the switch
  for _ in range(2):
    adapters, state = step(adapters, state)
  for ad in jax.tree.leaves(adapters, is_leaf=sl.is_adapter):
    assert float(ad.sds_on) == 1.0
    assert_bases_consistent(ad)
  assert int(state.num_refreshes) == 2 and len(traces) == 1
