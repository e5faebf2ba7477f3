"""Misuse that used to give wrong results silently: it must now be exact, or loud.

Each test here failed (or passed a wrong result) on the library before the
corresponding fix: SDS initialisation in the SDS phase, non-floating dtypes,
transformations chained after ``sds_lora``, plain Optax on SDS adapters, the
bfloat16 switch, adapting an adapted NNX model, rank checks and scanned kernels.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sdslora_jax as sds
from sdslora_jax.basis import factor_bases
from sdslora_jax import linen as sl
from sdslora_jax import nnx as snnx
from sdslora_jax.adapter import adapter_stamp, restamp, verify_stamps, with_fresh_bases
from sdslora_jax.optim import sds_lora, trainable_params
from sdslora_jax.targets import rule
from testing_utils import random_normal

MISUSE = "trained without|outside sdslora_jax.optim.sds_lora|without sdslora_jax.optim.sds_lora"


# --- 1. SDS adapters initialised in the SDS phase: exactly zero, SDS gradients ----------------


@pytest.mark.parametrize("d_in,d_out,rank", [(16, 8, 3), (5, 40, 5)])
def test_sds_on_init_is_zero_update_with_sds_gradients(d_in, d_out, rank):
  ad = sds.init_adapter(jax.random.key(0), d_in, d_out, rank=rank, scale=2.0, sds_on=True)
  x = random_normal(jax.random.key(1), (7, d_in))
  np.testing.assert_array_equal(sds.adapter_matmul(x, ad), jnp.zeros((7, d_out)))
  np.testing.assert_array_equal(sds.kernel_delta(ad), jnp.zeros((d_in, d_out)))
  np.testing.assert_allclose(ad.qa.T @ ad.qa, jnp.eye(rank), atol=1e-6)
  np.testing.assert_allclose(ad.qb.T @ ad.qb, jnp.eye(rank), atol=1e-6)
  # Gradients: the SDS rule dL/db = s qa.T G, dL/da = s G qb, with G = dL/dK of the dense model.
  target = random_normal(jax.random.key(2), (7, d_out))
  loss = lambda a: jnp.sum((sds.adapter_matmul(x, a) - target) ** 2)
  g = jax.grad(loss)(ad)
  big_g = jax.grad(lambda k: jnp.sum((x @ k - target) ** 2))(jnp.zeros((d_in, d_out)))
  np.testing.assert_allclose(g.b, 2.0 * ad.qa.T @ big_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g.a, 2.0 * big_g @ ad.qb, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0


def test_nnx_adapt_sds_on_is_exact():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  m = M(nnx.Rngs(0))
  x = random_normal(jax.random.key(1), (3, 8))
  y0 = m(x)
  snnx.adapt(m, [rule(r".*kernel", rank=2)], key=jax.random.key(2), sds_on=True)
  np.testing.assert_array_equal(m(x), y0)


def test_sds_on_requires_sds_method():
  with pytest.raises(ValueError, match="sds_on=True needs method='sds'"):
    sds.init_adapter(jax.random.key(0), 8, 8, rank=2, scale=1.0, method="lora", sds_on=True)


# --- 2. Non-floating dtypes are refused before tracing ----------------------------------------


def _factors(dtype=jnp.float32):
  a = random_normal(jax.random.key(0), (6, 2)).astype(dtype)
  b = random_normal(jax.random.key(1), (2, 5)).astype(dtype)
  return a, b


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.complex64])
def test_non_float_activations_are_refused(dtype):
  a, b = _factors()
  x = jnp.ones((3, 6), dtype)
  ad = sds.init_adapter(jax.random.key(0), 6, 5, rank=2, scale=1.0)
  qa, qb = factor_bases(a, b)
  calls = [
      lambda: sds.lora_matmul(x, a, b, scale=1.0),
      lambda: sds.sds_matmul(x, a, b, scale=1.0),
      lambda: sds.warmup_sds_matmul(x, a, b, qa, qb, jnp.float32(1.0), scale=1.0),
      lambda: sds.adapter_matmul(x, ad),
      lambda: jax.jit(sds.adapter_matmul)(x, ad),  # raised while tracing, not a zero result
  ]
  for call in calls:
    with pytest.raises(ValueError, match="must have a real floating dtype"):
      call()


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_non_float_factors_are_refused(dtype):
  a, b = _factors(dtype) if dtype != jnp.complex64 else (
      _factors()[0] * (1 + 1j), _factors()[1] * (1 + 1j))
  x = jnp.ones((3, 6))
  for call in (lambda: sds.lora_matmul(x, a, b, scale=1.0),
               lambda: sds.sds_matmul(x, a, b, scale=1.0),
               lambda: sds.lora_delta(a, b, scale=1.0),
               lambda: sds.sds_delta(a, b, scale=1.0),
               lambda: sds.activate_sds(a, b, scale=1.0),
               lambda: sds.orthonormal_basis(a)):
    with pytest.raises(ValueError, match="must have a real floating dtype"):
      call()


def test_integer_dtype_in_init_and_rules_is_refused():
  with pytest.raises(ValueError, match="dtype must have a real floating dtype"):
    sds.init_adapter(jax.random.key(0), 8, 8, rank=2, scale=1.0, dtype=jnp.int32)
  with pytest.raises(ValueError, match="rule '.\\*kernel': dtype must have a real floating"):
    rule(".*kernel", rank=2, dtype=jnp.int32)


def test_low_precision_floats_still_work():
  a, b = _factors(jnp.bfloat16)
  x = jnp.ones((3, 6), jnp.float16)
  assert sds.sds_matmul(x, a, b, scale=1.0).dtype == jnp.float16


# --- 3 and 8. sds_lora must be outermost; plain Optax on SDS adapters is loud -----------------


def _problem(sds_on=False):
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": sds.init_adapter(k[0], 12, 10, rank=3, scale=1.0, sds_on=sds_on)}
  x = random_normal(k[1], (32, 12))
  y = random_normal(k[2], (32, 10))
  loss = lambda p: jnp.mean((sds.adapter_matmul(x, p["w"]) - y) ** 2)
  return params, loss


def _train(tx, steps, sds_on=False):
  params, loss = _problem(sds_on)
  return _train_params(tx, params, loss, steps)


@pytest.mark.parametrize("after", [optax.scale(-1e-2), optax.add_decayed_weights(1e-3),
                                   optax.scale_by_learning_rate(1e-2)])
def test_transform_after_sds_lora_is_loud(after):
  tx = optax.chain(sds_lora(optax.scale_by_adam(), warmup_steps=2), after)
  _assert_caught(_train(tx, 6))


def _assert_caught(params):
  """Misuse turns the adapter's gradients, hence its factors, into NaN; verify_stamps names it."""
  ad = params["w"]
  assert bool(jnp.isnan(ad.a).all()) and bool(jnp.isnan(ad.b).all())
  with pytest.raises(ValueError, match=MISUSE + r".*Stale stamps: \['w'\]"):
    verify_stamps(params)


def test_same_chain_inside_sds_lora_trains():
  tx = sds_lora(optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-3),
                            optax.scale(-1e-2)), warmup_steps=2)
  params = _train(tx, 6)
  ad = params["w"]
  assert float(ad.sds_on) == 1.0
  np.testing.assert_allclose(ad.qa.T @ ad.qa, jnp.eye(3), atol=1e-5)
  assert float(ad.stamp) == float(adapter_stamp(ad.a, ad.b, ad.qa, ad.qb, ad.sds_on))


@pytest.mark.parametrize("tx", [optax.adamw(1e-3), optax.sgd(1e-3), optax.adam(1e-5)])
@pytest.mark.parametrize("sds_on", [False, True])
def test_plain_optax_on_sds_adapters_is_loud(tx, sds_on):
  _assert_caught(_train(tx, 2, sds_on=sds_on))


def test_plain_optax_on_lora_adapters_is_fine():
  params = {"w": sds.init_adapter(jax.random.key(0), 12, 10, rank=3, scale=1.0, method="lora")}
  x = random_normal(jax.random.key(1), (4, 12))
  tx = optax.adamw(1e-2)
  state = tx.init(params)
  for _ in range(3):
    g = jax.grad(lambda p: jnp.sum((sds.adapter_matmul(x, p["w"]) - 1.0) ** 2))(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  assert float(jnp.abs(params["w"].b).max()) > 0 and float(jnp.abs(params["w"].a).max()) > 0


def test_hand_edited_factors_need_restamp():
  params, loss = _problem()
  ad = params["w"]
  edited = dataclasses.replace(ad, b=jnp.ones_like(ad.b))
  g = jax.grad(loss)({"w": edited})["w"]
  assert bool(jnp.isnan(g.a).all()) and bool(jnp.isnan(g.b).all())
  with pytest.raises(ValueError, match=MISUSE):
    verify_stamps({"w": edited})
  g = jax.grad(loss)({"w": restamp(edited)})["w"]
  assert bool(jnp.isfinite(g.a).all()) and bool(jnp.isfinite(g.b).all())
  verify_stamps({"w": restamp(edited)})  # no error


# --- 6. The bfloat16 switch is computed in float32 and rounded once ---------------------------


@pytest.mark.slow
def test_bfloat16_switch_is_rounding_limited():
  """The adapted function moves by bfloat16 rounding only, and the bases fit the new factors."""
  k = jax.random.split(jax.random.key(0), 3)
  d_in, d_out, r, s = 64, 48, 8, 2.0
  ad = sds.init_adapter(k[0], d_in, d_out, rank=r, scale=s, dtype=jnp.bfloat16)
  x = random_normal(k[1], (256, d_in))
  y = random_normal(k[2], (256, d_out))
  loss = lambda p: jnp.mean((sds.adapter_matmul(x, p["w"]).astype(jnp.float32) - y) ** 2)
  params = with_fresh_bases({"w": ad}, False)
  inner = optax.adam(3e-2)
  tx = sds_lora(inner, warmup_steps=1, refresh=10**6)  # the first update switches
  u, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  after = optax.apply_updates(params, u)["w"]
  assert float(after.sds_on) == 1.0 and after.a.dtype == jnp.bfloat16
  # Reference: the plain-LoRA factors after the same inner update, as bfloat16 parameters.
  view = trainable_params(params)
  ref_u, _ = inner.update(trainable_params(jax.grad(loss)(params)), inner.init(view), view)
  lora = optax.apply_updates(view, ref_u)["w"]
  want = sds.lora_delta(lora.a.astype(jnp.float32), lora.b.astype(jnp.float32), scale=s)
  got = sds.sds_delta(after.a.astype(jnp.float32), after.b.astype(jnp.float32), scale=s,
                      qa=after.qa, qb=after.qb)
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert rel < 5e-3, rel  # bfloat16 keeps 8 bits: one rounding of the factors is ~2-4e-3
  qa_new = sds.orthonormal_basis(after.a)
  assert float(jnp.abs(after.qa - qa_new).max()) < 1e-2


# --- 9. Adapting an adapted NNX model is refused up front -------------------------------------


def test_adapting_an_adapted_nnx_model_is_refused():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.q = nnx.Linear(8, 8, rngs=rngs)
      self.v = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return self.v(self.q(x))

  m = M(nnx.Rngs(0))
  snnx.adapt(m, [rule("q/kernel", rank=2)], key=jax.random.key(1))
  for rules in ([rule("v/kernel", rank=2)], [rule("q/base/kernel", rank=2)]):
    with pytest.raises(ValueError, match=r"already adapted \(1 adapted layers, e.g. \['q'\]\)"):
      snnx.adapt(m, rules, key=jax.random.key(2))
  assert isinstance(m.q.base, nnx.Linear) and isinstance(m.v, nnx.Linear)  # nothing nested
  m(jnp.ones((2, 8)))
  snnx.unwrap(m)
  snnx.adapt(m, [rule("(q|v)/kernel", rank=2)], key=jax.random.key(2))  # after unwrap: fine


# --- 10. Rank checks; a stacked kernel forced through in_axes fails early ---------------------


@pytest.mark.parametrize("rank", [True, 2.0, 2.5, "2", 0, -1, np.bool_(True)])
def test_bad_ranks_are_value_errors(rank):
  with pytest.raises(ValueError, match="rank must be a positive int"):
    sds.init_adapter(jax.random.key(0), 8, 8, rank=rank, scale=1.0)
  with pytest.raises(ValueError, match="rank must be a positive int"):
    rule(".*kernel", rank=rank)


def test_numpy_integer_rank_is_accepted():
  ad = sds.init_adapter(jax.random.key(0), 8, 8, rank=np.int64(2), scale=1.0)
  assert ad.rank == 2 and rule(".*", rank=np.int32(3)).rank == 3


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(8, name="fc")(h)), None

    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="layers")(x, None)
    return h


def test_stacked_kernel_with_in_axes_and_no_example_inputs_fails_clearly():
  model, x = _Scanned(), jnp.ones((2, 8))
  params = model.init(jax.random.key(0), x)["params"]
  ads = sl.init_adapters(jax.random.key(1), model, params,
                         [rule("layers/fc/kernel", rank=2, in_axes=(1,))])  # no example inputs
  with pytest.raises(ValueError, match=r"is for a kernel of shape \(3, 8, 8\).*uses a kernel of "
                     r"shape \(8, 8\) per call"):
    sl.apply(model, {"params": params}, ads, x)


def test_tree_cast_for_compute_is_not_flagged():
  """Casting the whole adapter tree (stamp included) for bfloat16 compute is a view, not misuse."""
  params, _ = _problem()
  x = random_normal(jax.random.key(9), (4, 12))
  cast = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  loss = lambda p: jnp.sum(sds.adapter_matmul(x.astype(jnp.bfloat16), p["w"]).astype(jnp.float32))
  g = jax.block_until_ready(jax.grad(loss)(cast))
  assert g["w"].a.dtype == jnp.bfloat16


def _linen_two_layer():
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name="out")(nn.relu(nn.Dense(8, name="hid")(x)))

  model = Mlp()
  x = random_normal(jax.random.key(3), (5, 8))
  params = model.init(jax.random.key(0), x)["params"]
  rules = [rule(".*kernel", method="sds", rank=2, alpha=2.0)]
  adapters = sl.init_adapters(jax.random.key(1), model, params, rules, x)
  loss = lambda ad: jnp.mean(sl.apply(model, {"params": params}, ad, x) ** 2)
  return adapters, loss, params, x


def test_linen_apply_checks_the_whole_tree_once():
  # linen.apply guards all adapters together (one batched stamp check); a plain
  # optimizer on any of them is caught, and unchanged adapters pass.
  adapters, loss, params, x = _linen_two_layer()
  jax.block_until_ready(jax.jit(jax.grad(loss))(adapters))  # fresh adapters: no error
  tampered = jax.tree.map(lambda x: x, adapters, is_leaf=sds.is_adapter)
  hid = tampered["hid"]["kernel"]
  tampered["hid"]["kernel"] = dataclasses.replace(hid, a=hid.a * 1.01)
  g = jax.jit(jax.grad(loss))(tampered)
  for k in ("hid", "out"):  # the tree is checked as one: every adapter's gradients are NaN
    assert bool(jnp.isnan(g[k]["kernel"].a).all())
  with pytest.raises(ValueError, match=MISUSE + r".*Stale stamps: \['hid'\]\['kernel'\]\.$"):
    verify_stamps(tampered)
  # Same gradients as the layers written out with the per-call path (adapter_matmul).
  def by_hand(ad, params=params, x=x):
    h = x @ params["hid"]["kernel"] + params["hid"]["bias"] + sds.adapter_matmul(
        x, ad["hid"]["kernel"])
    h = jax.nn.relu(h)
    out = h @ params["out"]["kernel"] + params["out"]["bias"] + sds.adapter_matmul(
        h, ad["out"]["kernel"])
    return jnp.mean(out ** 2)

  got, want = jax.jit(jax.grad(loss))(adapters), jax.jit(jax.grad(by_hand))(adapters)
  for k in ("hid", "out"):
    for f in ("a", "b"):
      np.testing.assert_allclose(getattr(got[k]["kernel"], f), getattr(want[k]["kernel"], f),
                                 rtol=1e-5, atol=1e-7)


# --- 9. Bases kept between refreshes need fresh_bases=False; no host callback in a step -------


def test_sparse_refresh_with_fresh_bases_adapters_is_refused():
  params, loss = _problem()
  for refresh in (3, "phases", lambda j: j % 2 == 0):
    tx = sds_lora(optax.adam(1e-2), warmup_steps=1, refresh=refresh, total_steps=10)
    with pytest.raises(ValueError, match=r"keeps the bases between refreshes.*\['w'\].*"
                                         r"fresh_bases=False"):
      tx.init(params)
    with pytest.raises(ValueError, match="keeps the bases between refreshes"):
      jax.eval_shape(tx.update, params, tx.init(with_fresh_bases(params, False)), params)
  # Marked adapters train, with the exact two-branch op between refreshes.
  tx = sds_lora(optax.adam(1e-2), warmup_steps=1, refresh=3)
  stale_ok = _train_params(tx, with_fresh_bases(params, False), loss, 4)
  assert float(stale_ok["w"].sds_on) == 1.0 and bool(jnp.isfinite(stale_ok["w"].a).all())


def _train_params(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
    jax.block_until_ready(params)
  return params


def test_a_guarded_train_step_has_no_host_callback():
  # The misuse check is data in the step: a host callback would cost 5-7 % of every step on
  # CPU (measured with experiments/step_overhead.py) even when it never fires.
  params, loss = _problem()
  tx = sds_lora(optax.adam(1e-2), warmup_steps=1)

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step).lower(params, tx.init(params)).as_text()
  assert "callback" not in hlo.lower(), "a host callback in the SDS train step"
