"""Stacked (scanned) layers: one adapter per layer, against the same model unrolled."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sdslora_jax as sds
from sdslora_jax import linen as slinen
from sdslora_jax import nnx as snnx
from sdslora_jax import tree
from sdslora_jax.adapter import is_adapter, kernel_delta, take_layer
from sdslora_jax.optim import sds_lora
from sdslora_jax.targets import rule
from testing_utils import linen_mse_step, nnx_mse_step, random_normal, randomize

L, D, H, K = 3, 16, 2, 4


class Block(nn.Module):
  """A pre-norm decoder block: DenseGeneral attention projections and an MLP."""

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm(name="norm")(x)
    q = nn.DenseGeneral((H, K), name="query")(h)
    k = nn.DenseGeneral((H, K), name="key")(h)
    v = nn.DenseGeneral((H, K), name="value")(h)
    w = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(K), axis=-1)
    o = nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhqs,bshk->bqhk", w, v))
    x = x + o
    x = x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(2 * D, name="up")(x)))
    return x, None


class Scanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L)(name="layers")(x, None)
    return nn.Dense(4, name="head")(x)


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x, _ = Block(name=f"layer_{i}")(x)
    return nn.Dense(4, name="head")(x)


RULES = [rule(r"layers/(query|key|value|out)/kernel", rank=2, alpha=4.0),
         rule(r"layers/(up|down)/kernel", rank=3, method="lora"),
         rule(r"head/kernel", rank=2)]


def _unrolled_params(params):
  out = {"head": params["head"]}
  for i in range(L):
    out[f"layer_{i}"] = jax.tree.map(lambda p: p[i], params["layers"])
  return out


def _unrolled_adapters(ads):
  out = {"head": ads["head"]}
  for i in range(L):
    out[f"layer_{i}"] = jax.tree.map(lambda ad: take_layer(ad, i), ads["layers"],
                                     is_leaf=is_adapter)
  return out


@pytest.fixture(scope="module", params=[False, True], ids=["scan", "scan+remat"])
def setup(request):
  model = Scanned(remat=request.param)
  x = random_normal(jax.random.key(0), (2, 5, D))
  params = model.init(jax.random.key(1), x)["params"]
  ads = slinen.init_adapters(jax.random.key(2), model, params, RULES, x)
  return model, x, params, ads


def test_stacked_adapters_have_layer_axes(setup):
  _, _, params, ads = setup
  q = ads["layers"]["query"]["kernel"]
  assert params["layers"]["query"]["kernel"].shape == (L, D, H, K)
  assert q.layer_axes == (0,) and q.in_axes == (1,) and q.kernel_shape == (L, D, H, K)
  assert q.a.shape == (L, D, 2) and q.b.shape == (L, 2, H * K) and q.qb.shape == (L, H * K, 2)
  assert q.sds_on.shape == (L,) and q.stamp.shape == (L,)
  assert ads["layers"]["out"]["kernel"].in_axes == (1, 2)
  assert ads["head"]["kernel"].layer_axes == ()
  assert not np.allclose(q.a[0], q.a[1])  # each layer its own initialisation


# Plain scan is opt-in where the scan+remat variant of the same test covers its code path.
_REMAT_COVERS_SCAN = pytest.mark.parametrize(
    "setup", [pytest.param(False, id="scan", marks=pytest.mark.slow),
              pytest.param(True, id="scan+remat")], indirect=True)


# sds_on = 0 (the warm-up, LoRA's path) is opt-in: the SDS path covers the scan plumbing.
@_REMAT_COVERS_SCAN
@pytest.mark.parametrize("sds_on", [pytest.param(0.0, marks=pytest.mark.slow), 1.0])
def test_scanned_matches_unrolled_outputs_and_gradients(setup, sds_on):
  model, x, params, ads = setup
  ads = randomize(ads, jax.random.key(3), sds_on)
  unrolled = Unrolled()
  u_params = _unrolled_params(params)
  u_ads = _unrolled_adapters(ads)
  # Jitted: one program each instead of some 270 eager op-by-op programs.
  y = jax.jit(lambda a: slinen.apply(model, {"params": params}, a, x))(ads)
  y_u = jax.jit(lambda a: slinen.apply(unrolled, {"params": u_params}, a, x))(u_ads)
  # |y| reaches ~160 after three layers of randomised adapters; the scanned and the unrolled
  # programs round differently (1.5e-5 relative seen). A wrong layer's adapter is O(1) off.
  np.testing.assert_allclose(y, y_u, rtol=5e-5, atol=1e-5)
  print(f"scanned vs unrolled (sds_on={sds_on}): max |dy| {float(jnp.abs(y - y_u).max()):.1e}")
  # The dense reference: the merged stacked kernels.
  np.testing.assert_allclose(
      y, jax.jit(lambda a: model.apply({"params": tree.merge(params, a)}, x))(ads),
      rtol=1e-4, atol=1e-4)

  loss = lambda a: jnp.sum(jnp.sin(slinen.apply(model, {"params": params}, a, x)))
  loss_u = lambda a: jnp.sum(jnp.sin(slinen.apply(unrolled, {"params": u_params}, a, x)))
  g = jax.jit(jax.grad(loss))(ads)
  g_u = jax.jit(jax.grad(loss_u))(u_ads)
  for name in ("query", "out", "up"):
    for f in ("a", "b"):
      got = getattr(g["layers"][name]["kernel"], f)
      want = jnp.stack([getattr(g_u[f"layer_{i}"][name]["kernel"], f) for i in range(L)])
      # Entries up to ~80 through sin(y), |y| ~ 160: one entry in 96 may differ by 1e-2 (XLA
      # at optimisation level 0, JAX 0.12.1; see conftest.py); the whole gradient by ~1e-4.
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))
      rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
      print(f"  grad {name}.{f}: relative difference {rel:.1e}")
      assert rel < 1e-3, (name, f, rel)


@_REMAT_COVERS_SCAN
def test_scanned_trains_with_sds_lora_one_trace(setup):
  model, x, params, ads = setup
  target = random_normal(jax.random.key(4), (2, 5, 4))
  tx = sds_lora(optax.adam(1e-2), warmup_steps=2)
  state = tx.init(ads)
  traces = []
  step = linen_mse_step(model, tx, x, target, traces)

  losses = []
  for _ in range(6):
    ads, state, value = step(ads, state, params)
    losses.append(float(value))
  assert len(traces) == 1 and losses[-1] < losses[0]
  q = ads["layers"]["query"]["kernel"]
  np.testing.assert_array_equal(q.sds_on, jnp.ones(L))
  for i in range(L):  # each layer's own bases, orthonormal and spanning its own factors
    qa, a = q.qa[i], q.a[i]
    np.testing.assert_allclose(qa.T @ qa, jnp.eye(2), atol=1e-5)
    np.testing.assert_allclose(qa @ (qa.T @ a), a, atol=1e-5)


@pytest.mark.parametrize("rewarmup", [0, 4])
def test_step_scale_and_rewarmup_act_per_layer_of_a_stack(setup, rewarmup):
  """Layers of one stacked adapter in different phases: only those in SDS mode are scaled."""
  _, _, _, ads = setup
  ads = sds.with_fresh_bases(ads, False)
  q = ads["layers"]["query"]["kernel"]
  on = jnp.zeros(L).at[0].set(1.0)  # layer 0 already in SDS mode, the others warming up
  ads["layers"]["query"]["kernel"] = sds.restamp(dataclasses.replace(q, sds_on=on))
  tx = sds_lora(optax.sgd(0.1), warmup_steps=3, refresh=100, step_scale=0.5,
                rewarmup_steps=rewarmup)
  state = tx.init(ads)
  grads = jax.tree.map(jnp.ones_like, ads)
  for count in range(2):  # before the switch at update 3: the ramp is 0 (rewarmup) or 1
    updates, state = jax.jit(tx.update)(grads, state, ads)
    ua = updates["layers"]["query"]["kernel"].a
    layer0 = 0.0 if rewarmup else -0.05
    np.testing.assert_allclose(ua[0], jnp.full_like(ua[0], layer0), atol=1e-7)
    np.testing.assert_allclose(ua[1:], jnp.full_like(ua[1:], -0.1), atol=1e-7)
    ads = optax.apply_updates(ads, updates)


def test_layer_axes_rule_without_example_inputs(setup):
  model, x, params, _ = setup
  ads = slinen.init_adapters(jax.random.key(2), model, params,
                             [rule("layers/up/kernel", rank=2, layer_axes=(0,))])
  up = ads["layers"]["up"]["kernel"]
  assert up.layer_axes == (0,) and up.a.shape == (L, D, 2)
  y = slinen.apply(model, {"params": params}, randomize(ads, jax.random.key(5)), x)
  assert y.shape == (2, 5, 4)


# --- NNX: nnx.vmap-created layers run by nnx.scan --------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.down = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


class NnxScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


def test_nnx_scanned_matches_unrolled_and_trains():
  model = NnxScanned(nnx.Rngs(0))
  x = random_normal(jax.random.key(1), (6, D))
  y0 = model(x)
  snnx.adapt(model, [rule(r"blocks/(up|down)/kernel", rank=2)], key=jax.random.key(2))
  np.testing.assert_array_equal(model(x), y0)
  ad = snnx.adapters(model)["blocks"]["up"]["kernel"]
  assert ad.layer_axes == (0,) and ad.a.shape == (L, D, 2)
  # Random per-layer factors, then: scanned == unrolled by hand with each layer's adapter.
  for name in ("up", "down"):
    wrapped = getattr(model.blocks, name)
    wrapped.adapter.set_value(randomize(wrapped.adapter.get_value(), jax.random.key(3)))
  y = model(x)
  ads = snnx.adapters(model)["blocks"]
  base = nnx.state(model.blocks, nnx.Param)

  def unrolled(up, down):  # the hidden state before the head, each layer with its adapter
    h = x
    for i in range(L):
      up_k = base["up"]["base"]["kernel"][...][i] + kernel_delta(take_layer(up, i))
      up_b = base["up"]["base"]["bias"][...][i]
      dn_k = base["down"]["base"]["kernel"][...][i] + kernel_delta(take_layer(down, i))
      dn_b = base["down"]["base"]["bias"][...][i]
      h = h + nnx.gelu(h @ up_k + up_b) @ dn_k + dn_b
    return h

  h = jax.jit(unrolled)(ads["up"]["kernel"], ads["down"]["kernel"])
  np.testing.assert_allclose(y, model.head(h), rtol=1e-4, atol=1e-5)
  print(f"NNX scanned vs unrolled: max |dy| {float(jnp.abs(y - model.head(h)).max()):.1e}")

  # Adapter gradients: nnx.grad through the scan vs jax.grad of the unrolled computation.
  def unrolled_loss(up, down):
    return jnp.sum(jnp.sin(model.head(unrolled(up, down))))

  g_u = jax.jit(jax.grad(unrolled_loss, argnums=(0, 1)))(ads["up"]["kernel"],
                                                          ads["down"]["kernel"])
  g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, snnx.AdapterVariable))(
      model)
  for (name, want) in zip(("up", "down"), g_u):
    got = g["blocks"][name]["adapter"].get_value()
    for f in ("a", "b"):
      w, gv = getattr(want, f), getattr(got, f)
      np.testing.assert_allclose(gv, w, rtol=1e-3, atol=1e-4 * float(jnp.abs(w).max()))

  target = random_normal(jax.random.key(4), (6, 4))
  opt = nnx.Optimizer(model, sds_lora(optax.adam(1e-2), warmup_steps=2), wrt=snnx.AdapterVariable)
  traces = []
  step = nnx_mse_step(x, target, traces)

  losses = [float(step(model, opt)) for _ in range(6)]
  assert len(traces) == 1 and losses[-1] < losses[0]
  up = snnx.adapters(model)["blocks"]["up"]["kernel"]
  np.testing.assert_array_equal(up.sds_on, jnp.ones(L))


def test_stacked_peft_round_trip_one_module_per_layer(setup, tmp_path):
  import json

  from sdslora_jax import peft

  model, x, params, ads = setup
  ads = randomize(ads, jax.random.key(6))
  names = lambda mod, layer=None: (
      "model.head" if layer is None else f"model.layers.{layer}.{mod.split('/')[-1]}")
  peft.export_peft(tmp_path, ads, module_names=names)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert "model.layers.2.query" in cfg["target_modules"] and "model.head" in cfg["target_modules"]
  assert len(cfg["target_modules"]) == 6 * L + 1
  back = peft.import_peft(tmp_path, params, module_names=names,
                          layouts=slinen.module_layouts(model, x))
  for name in ("query", "out", "up"):
    src, dst = ads["layers"][name]["kernel"], back["layers"][name]["kernel"]
    assert dst.layer_axes == (0,) and dst.kernel_shape == src.kernel_shape
    np.testing.assert_allclose(kernel_delta(dst), kernel_delta(src), rtol=1e-5, atol=1e-5)
  # The same as one PEFT module per layer of the unrolled model.
  want = slinen.apply(model, {"params": params}, ads, x)  # entries up to ~100: float32 rounding
  np.testing.assert_allclose(slinen.apply(model, {"params": params}, back, x), want,
                             rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))
  # A dict mapping needs a '{layer}' placeholder for stacked kernels.
  with pytest.raises(ValueError, match=r"must contain '\{layer\}'"):
    peft.export_peft(tmp_path / "d", {"layers": {"up": ads["layers"]["up"]}},
                     module_names={"layers/up": "model.up"})


class LogicalBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    h = nn.gelu(nn.Dense(2 * D, kernel_init=init, name="up")(x))
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
    return x + nn.Dense(D, kernel_init=init, name="down")(h), None


class LogicalScanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(nn.remat(LogicalBlock), variable_axes={"params": 0},
                   split_rngs={"params": True}, length=L,
                   metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(x, None)
    return x


def test_scan_with_layer_axis_named_in_partitioning_metadata():
  model, x = LogicalScanned(), random_normal(jax.random.key(0), (2, D))
  boxed = model.init(jax.random.key(1), x)["params"]
  assert isinstance(boxed["layers"]["up"]["kernel"], nn.LogicallyPartitioned)
  assert boxed["layers"]["up"]["kernel"].names == ("layers", "embed", "mlp")
  ads = slinen.init_adapters(jax.random.key(2), model, boxed, [rule("layers/(up|down)/kernel",
                                                                     rank=2)], x)
  assert ads["layers"]["up"]["kernel"].layer_axes == (0,)
  ads = randomize(ads, jax.random.key(3))
  params = nn.meta.unbox(boxed)
  y = slinen.apply(model, {"params": params}, ads, x)
  np.testing.assert_allclose(y, model.apply({"params": tree.merge(params, ads)}, x),
                             rtol=1e-4, atol=1e-5)
