"""The merged op (``fused.fused_call``): base matmul and adapter as one op.

Checked against the dense reference (the update merged into the kernel by ``tree.merge``,
differentiated by autodiff, which keeps the SDS-LoRA bases constant) for values, the
adapters' gradients and the base's own gradients, on the three frontends, and against
full fine-tuning for memory (XLA's ``memory_analysis()``).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdslora_jax import fused, intercept, tree
from sdslora_jax import linen as sl
from sdslora_jax import nnx as snnx
from sdslora_jax.adapter import is_adapter
from sdslora_jax.targets import rule
from testing_utils import random_normal, randomize

D, HIDDEN, TOKENS, RANK = 32, 48, 64, 4
PHASES = {"lora": ("lora", 0.0), "sds_warmup": ("sds", 0.0), "sds": ("sds", 1.0)}


@contextlib.contextmanager
def _counting():
  """Counts the merged ops traced inside the block."""
  with mock.patch.object(fused, "fused_call", wraps=fused.fused_call) as spy:
    yield spy


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _factor_grads(g):
  return [(x.a, x.b) for x in jax.tree.leaves(g, is_leaf=is_adapter) if is_adapter(x)]


def _assert_close_grads(got, want, tol=2e-5):
  got, want = _factor_grads(got), _factor_grads(want)
  assert len(got) == len(want) > 0
  for (ga, gb), (wa, wb) in zip(got, want):
    assert _rel(ga, wa) < tol and _rel(gb, wb) < tol, (_rel(ga, wa), _rel(gb, wb))


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(HIDDEN, name="up")(x))
    return nn.Dense(D, name="down")(h)


def _linen_case(phase):
  method, sds_on = PHASES[phase]
  model = _Mlp()
  x = random_normal(jax.random.key(0), (2, TOKENS // 2, D))
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * random_normal(jax.random.key(7), p.shape), params)
  extra = {"sds_on": True} if method == "sds" else {}
  ads = sl.init_adapters(jax.random.key(2), model, params,
                         [rule(r".*kernel", rank=RANK, method=method)], x, **extra)
  ads = randomize(ads, jax.random.key(3), sds_on=sds_on)
  ours = lambda a, p: sl.apply(model, {"params": p}, a, x)  # noqa: E731
  ref = lambda a, p: model.apply({"params": tree.merge(p, a)}, x)  # noqa: E731
  return ours, ref, ads, params


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("mode", ["always", "never"])
def test_linen_merged_op_equals_the_dense_reference(mode, phase):
  ours, ref, ads, params = _linen_case(phase)
  loss = lambda f: lambda a, p: jnp.sum(jnp.sin(f(a, p)))  # noqa: E731
  with fused.merging(mode), _counting() as spy:
    y = ours(ads, params)
    g_ads, g_params = jax.grad(loss(ours), argnums=(0, 1))(ads, params)
  assert spy.call_count == (4 if mode == "always" else 0)  # 2 layers: forward, then grad
  assert _rel(y, jax.jit(ref)(ads, params)) < 1e-5  # the reference, jitted: one program
  want_ads, want_params = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(ads, params)
  _assert_close_grads(g_ads, want_ads)
  # The frozen base's own gradients, when asked for (kernel and bias of both layers).
  for got, want in zip(jax.tree.leaves(g_params), jax.tree.leaves(want_params)):
    assert _rel(got, want) < 2e-5


def test_nnx_merged_op_equals_the_dense_reference():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
      self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x)))

  x = random_normal(jax.random.key(0), (TOKENS, D))
  model = Mlp(nnx.Rngs(0))
  fn, pure, _ = snnx.as_function(model)  # the plain model, for the reference
  snnx.adapt(model, [rule(r".*kernel", rank=RANK, method="sds")], key=jax.random.key(1),
             sds_on=True)
  ads = randomize(snnx.adapters(model), jax.random.key(3))
  snnx.attach(snnx.unwrap(model), ads)
  graphdef, ad_state, rest = nnx.split(model, snnx.AdapterVariable, ...)

  def loss(s):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, s, rest)(x)))

  with fused.merging("always"), _counting() as spy:
    y = nnx.merge(graphdef, ad_state, rest)(x)
    got = nnx.to_pure_dict(jax.grad(loss)(ad_state))
  assert spy.call_count == 4
  assert _rel(y, fn(tree.merge(pure, ads), x)) < 1e-5
  want = jax.grad(lambda a: jnp.sum(jnp.sin(fn(tree.merge(pure, a), x))))(ads)
  for name in ("up", "down"):
    _assert_close_grads(got[name]["adapter"], want[name]["kernel"])


def _op_level_model():
  """Weights named and shaped as LLM codebases do: a head-split einsum weight ``(N, D, H)``,
  a projection used twice (the second time transposed, as a tied embedding's logits), and a
  layer stack scanned along axis 1 (as MaxText stores it)."""
  n, h, layers = 2, 24, 3
  ks = jax.random.split(jax.random.key(0), 4)
  params = {"w": random_normal(ks[0], (n, D, h)) / D**0.5,
            "o": random_normal(ks[1], (n * h, D)) / (n * h)**0.5,
            "s": random_normal(ks[2], (D, layers, D)) / D**0.5}

  def fn(p, x):
    q = jnp.tanh(jnp.einsum("btd,ndh->btnh", x, p["w"]))
    y = q.reshape(*x.shape[:2], n * h) @ p["o"]
    y, _ = jax.lax.scan(lambda c, k: (jnp.tanh(c @ k), None), y, jnp.moveaxis(p["s"], 1, 0))
    return y @ p["o"].T

  x = random_normal(ks[3], (2, TOKENS // 2, D))
  return fn, params, x


@pytest.mark.parametrize("method", ["lora", "sds"])
@pytest.mark.parametrize("mode", ["always", "never"])
def test_op_level_merged_op_equals_the_dense_reference(mode, method):
  fn, params, x = _op_level_model()
  extra = {"sds_on": True} if method == "sds" else {}
  ads = intercept.init_adapters(jax.random.key(1), fn, params,
                                [rule("w|o|s", rank=RANK, method=method)], x, **extra)
  ads = randomize(ads, jax.random.key(2))
  loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)))  # noqa: E731
  ours = lambda a: intercept.apply(fn, params, a, x)  # noqa: E731
  ref = lambda a: fn(tree.merge(params, a), x)  # noqa: E731
  with fused.merging(mode), _counting() as spy:
    y = jax.jit(ours)(ads)
    got = jax.jit(jax.grad(loss(ours)))(ads)
  assert (spy.call_count >= 8) if mode == "always" else (spy.call_count == 0), spy.call_count
  assert _rel(y, ref(ads)) < 1e-5
  _assert_close_grads(got, jax.grad(loss(ref))(ads))


def test_merging_is_chosen_by_size_dtype_and_precision():
  x, w = jnp.zeros((64, 32)), jnp.zeros((32, 48))
  assert fused.use_merged(x[:20], w, 32, 48)  # 20 rows: 20 * (32 + 48) >= 32 * 48
  assert not fused.use_merged(x[:19], w, 32, 48)  # fewer rows: the rank-r op
  assert not fused.use_merged(x.astype(jnp.bfloat16), w, 32, 48)  # would round the update
  assert not fused.use_merged(x, w.astype(jnp.bfloat16), 32, 48)
  with fused.merging("always"):
    assert fused.use_merged(x[:2], w, 32, 48)
    assert not fused.use_merged(x.astype(jnp.bfloat16), w, 32, 48)
  with fused.merging("never"):
    assert not fused.use_merged(x, w, 32, 48)
  with pytest.raises(ValueError, match="merging mode must be one of"):
    with fused.merging("sometimes"):
      pass


def test_linen_under_another_method_interceptor_is_not_merged():
  """Another interceptor (qwix's quantization providers are ones) would see the merged
  kernel, update included: the rank-r op runs instead, with the same values."""
  ours, ref, ads, params = _linen_case("sds")

  def passthrough(next_fun, args, kwargs, context):
    return next_fun(*args, **kwargs)

  with fused.merging("always"), _counting() as spy, nn.intercept_methods(passthrough):
    y = ours(ads, params)
  assert spy.call_count == 0
  assert _rel(y, ref(ads, params)) < 1e-5


def _kernel_gradient_dots(jaxpr, kernel_shapes, rank):
  """``dot_general``s with a kernel's output shape that contract more than the rank:
  ``x.T @ g``, the kernel's own gradient."""
  wanted = {tuple(sorted(s)) for s in kernel_shapes}
  found = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shape = tuple(eqn.outvars[0].aval.shape)
      (lc, _), _ = eqn.params["dimension_numbers"]
      contracted = int(np.prod([eqn.invars[0].aval.shape[d] for d in lc]))
      if tuple(sorted(shape)) in wanted and contracted not in (rank, 2 * rank):
        found += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _kernel_gradient_dots(sub, kernel_shapes, rank)
  return found


def test_a_frozen_base_gets_no_kernel_gradient_in_the_merged_backward():
  ours, _, ads, params = _linen_case("sds")
  shapes = [(D, HIDDEN), (HIDDEN, D)]
  loss = lambda a, p: jnp.sum(jnp.sin(ours(a, p)))  # noqa: E731
  with fused.merging("always"):
    adapters_only = jax.make_jaxpr(jax.grad(loss))(ads, params).jaxpr
    with_base = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(ads, params).jaxpr
  assert _kernel_gradient_dots(adapters_only, shapes, RANK) == 0
  assert _kernel_gradient_dots(with_base, shapes, RANK) == 2  # the check can fail


def _dense_stack_step_temps(layers=4, d=256, tokens=1024):
  """XLA's temporary bytes of one AdamW train step (state donated) on a ReLU stack: full
  fine-tuning, and LoRA adapters with the rank-r op and with the merged op (Linen
  ``Dense``, float32)."""
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, h):
      for _ in range(layers):
        h = jax.nn.relu(nn.Dense(d)(h))
      return h

  model = Stack()
  x = random_normal(jax.random.key(0), (tokens, d))
  params = model.init(jax.random.key(1), x)["params"]
  ads = randomize(sl.init_adapters(jax.random.key(2), model, params,
                                   [rule(r".*kernel", rank=8, method="lora")], x),
                  jax.random.key(3))
  tx = optax.adamw(1e-3)

  def temp(loss, trainable):
    def step(t, state):
      g = jax.grad(loss)(t)
      u, state = tx.update(g, state, t)
      return optax.apply_updates(t, u), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, tx.init(trainable)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  out = {"full": temp(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2), params)}
  for mode in ("never", "always"):
    with fused.merging(mode):
      out[mode] = temp(lambda a: jnp.mean(sl.apply(model, {"params": params}, a, x) ** 2), ads)
  return out


def test_merged_adapters_step_needs_less_temporary_memory_than_full_fine_tuning():
  temps = _dense_stack_step_temps()
  act = 1024 * 256 * 4
  # The merged op saves what full fine-tuning saves (each layer's input) and no second
  # summand; the step forms no kernel gradients and no AdamW update for the kernels...
  assert temps["always"] < temps["full"], temps
  # ...where the rank-r op keeps about one more activation per layer (the check can fail).
  assert temps["never"] >= temps["full"] + act, temps


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_adapted_matmul_is_the_layer_with_its_adapter(mode):
  import sdslora_jax as sl_top
  kernel = random_normal(jax.random.key(0), (D, HIDDEN)) / D**0.5
  ad = randomize(sl_top.init_adapter(jax.random.key(1), D, HIDDEN, rank=RANK, scale=0.5,
                                     method="sds", sds_on=True), jax.random.key(2))
  x = random_normal(jax.random.key(3), (TOKENS, D))  # 64 rows: merged
  f = lambda a: jnp.sum(jnp.sin(sl_top.adapted_matmul(x, kernel, a)))  # noqa: E731
  ref = lambda a: jnp.sum(jnp.sin(x @ (kernel + sl_top.kernel_delta(a))))  # noqa: E731
  with fused.merging(mode), _counting() as spy:
    got, grad = jax.value_and_grad(f)(ad)
  assert spy.call_count == (1 if mode == "auto" else 0)
  assert abs(float(got - ref(ad))) < 1e-4 * abs(float(ref(ad)))
  _assert_close_grads(grad, jax.grad(ref)(ad))
  with pytest.raises(ValueError, match=r"kernel has shape \(48, 32\), the adapter is for a "
                                       r"\(32, 48\) kernel"):
    sl_top.adapted_matmul(x, kernel.T, ad)
