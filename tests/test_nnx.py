"""NNX frontend: model surgery, adapter state, merge, unwrap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdslora_jax import nnx as snnx
from sdslora_jax import tree
from sdslora_jax.adapter import Adapter, is_adapter
from sdslora_jax.targets import rule
from testing_utils import nnx_mse_step, random_normal, randomize_adapter


class Zoo(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(40, 16, rngs=rngs)
    self.q = nnx.LinearGeneral(16, (4, 4), rngs=rngs)
    self.o = nnx.LinearGeneral((4, 4), 16, axis=(-2, -1), rngs=rngs)
    self.ein = nnx.Einsum("btd,dhk->bthk", (16, 2, 8), (2, 8), rngs=rngs)
    self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
    self.norm = nnx.LayerNorm(16, rngs=rngs)

  def __call__(self, ids):
    x = self.emb(ids)
    e = self.ein(self.o(self.q(x)))
    h = self.conv(e.reshape(e.shape[:2] + (16,)))
    for blk in self.blocks:
      h = nnx.relu(blk(h))
    return self.emb.attend(self.norm(h))


RULES = [rule(r"(q|o|ein|conv)/kernel|emb/embedding", rank=2, alpha=3.0),
         rule(r"blocks/\d/kernel", rank=3, method="lora")]
IDS = jnp.arange(12).reshape(2, 6) % 40


def randomize(model, key, sds_on=1.0):
  for i, (_, m) in enumerate(sorted(((p, m) for p, m in nnx.iter_graph(model)
                                     if isinstance(m, snnx.Adapted)), key=lambda t: str(t[0]))):
    m.adapter.set_value(
        randomize_adapter(m.adapter.get_value(), jax.random.fold_in(key, i), sds_on)
    )
  return model


def test_surgery_exact_at_init_and_state():
  model = Zoo(nnx.Rngs(0))
  y0 = model(IDS)
  originals = {"q": model.q, "blk1": model.blocks[1]}
  snnx.adapt(model, RULES, key=jax.random.key(1))
  assert isinstance(model.q, snnx.Adapted) and model.q.base is originals["q"]
  assert isinstance(model.blocks[1], snnx.Adapted) and isinstance(model.norm, nnx.LayerNorm)
  np.testing.assert_array_equal(model(IDS), y0)
  state = snnx.adapter_state(model)
  found = jax.tree.leaves(state, is_leaf=is_adapter)
  assert len(found) == 7 and all(isinstance(a, Adapter) for a in found)
  params = nnx.state(model, nnx.Param)
  assert not jax.tree.leaves(params, is_leaf=is_adapter) or not any(
      is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter))
  assert "base" in params["q"]
  assert snnx.adapters(model)["o"]["kernel"].in_axes == (0, 1)
  assert snnx.adapters(model)["conv"]["kernel"].kind == "conv"
  # optax works directly on the adapter state.
  new = optax.apply_updates(state, jax.tree.map(jnp.ones_like, state))
  nnx.update(model, new)
  assert float(model.q.adapter.get_value().b[0, 0]) == 1.0
  snnx.unwrap(model)
  assert model.q is originals["q"] and model.blocks[1] is originals["blk1"]
  assert not snnx.is_adapted(model)
  np.testing.assert_array_equal(model(IDS), y0)


@pytest.mark.parametrize("sds_on", [0.0, 1.0])
def test_forward_and_grads_match_dense_reference(sds_on):
  model = Zoo(nnx.Rngs(0))
  snnx.adapt(model, RULES, key=jax.random.key(1))
  randomize(model, jax.random.key(2), sds_on)
  y_merged = snnx.merged(model)(IDS)
  assert isinstance(model.q, snnx.Adapted)  # merged() leaves the model alone
  y = model(IDS)
  np.testing.assert_allclose(y, y_merged, rtol=1e-4, atol=1e-4)

  graphdef, ad_state, rest = nnx.split(model, snnx.AdapterVariable, ...)
  ref_model = snnx.unwrap(nnx.clone(model))
  ref_graph, base_params, ref_rest = nnx.split(ref_model, nnx.Param, ...)
  base_dict = nnx.to_pure_dict(base_params)

  @jax.jit
  def fast(ad_state):
    return jnp.mean(jnp.tanh(nnx.merge(graphdef, ad_state, rest)(IDS)))

  @jax.jit
  def dense(ads):
    params = nnx.clone(base_params)
    nnx.replace_by_pure_dict(params, tree.merge(base_dict, ads))
    return jnp.mean(jnp.tanh(nnx.merge(ref_graph, params, ref_rest)(IDS)))

  g_state = jax.grad(fast)(ad_state)
  g_dense = jax.grad(dense)(snnx.adapters(model))
  got = {tuple(str(k) for k in p[:-1]): v for p, v in
         jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(g_state), is_leaf=is_adapter)[0]}
  want = {tuple(str(k) for k in p[:-1]): v for p, v in
          jax.tree_util.tree_flatten_with_path(g_dense, is_leaf=is_adapter)[0]}
  assert len(got) == len(want) == 7
  for (pg, g), (pw, w) in zip(sorted(got.items()), sorted(want.items())):
    np.testing.assert_allclose(g.a, w.a, rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(g.b, w.b, rtol=1e-3, atol=2e-5)


def test_attach_errors():
  model = Zoo(nnx.Rngs(0))
  snnx.adapt(model, [rule("q/kernel", rank=2)], key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"cannot attach the adapter at 'q/kernel': q is already adapted"):
    snnx.attach(model, snnx.adapters(model))
  with pytest.raises(ValueError, match=r"rule 'norm/scale' matches 'norm/scale'"):
    snnx.adapt(Zoo(nnx.Rngs(0)), [rule("norm/scale")], key=jax.random.key(1))

  class Custom(nnx.Module):
    def __init__(self):
      self.inner = nnx.Module()
      self.inner.kernel = nnx.Param(jnp.ones((4, 4)))

  with pytest.raises(ValueError, match=r"selects 'inner/kernel', which does not belong to a supported module"):
    snnx.adapt(Custom(), [rule("inner/kernel", rank=2)], key=jax.random.key(1))


@pytest.mark.parametrize("x_shape", [(3, 4, 4), (2, 3, 4)], ids=["equal_sizes", "different_sizes"])
def test_linear_general_unsorted_axis(x_shape):
  # Flax contracts sorted(axis): kernel input axis i pairs with sorted(axis)[i].
  class M(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.LinearGeneral(x_shape[1:], 5, axis=(-1, -2), rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  x = random_normal(jax.random.key(0), x_shape)
  model = M(nnx.Rngs(0))
  y0 = model(x)
  snnx.adapt(model, [rule("lin/kernel", rank=2)], key=jax.random.key(1))
  randomize(model, jax.random.key(2))
  y, y_merged = model(x), snnx.merged(model)(x)
  diff = float(jnp.abs(y - y_merged).max())
  print(f"LinearGeneral axis=(-1, -2), x {x_shape}: max |adapted - merged| = {diff:.2e}")
  assert float(jnp.abs(y_merged - y0).max()) > 1e-1
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5)


class Stacked(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return nnx.relu(block.fc(h))

    return self.head(body(x, self.layers))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(8, 8, rngs=rngs)


@pytest.mark.slow
def test_vmapped_stacked_kernel_gets_one_adapter_per_layer():
  model, x = Stacked(nnx.Rngs(0)), jnp.ones((2, 8))
  assert model.layers.fc.kernel.shape == (3, 8, 8)
  snnx.adapt(model, [rule(r".*/kernel", rank=2)], key=jax.random.key(1))
  ad = snnx.adapters(model)["layers"]["fc"]["kernel"]
  assert ad.layer_axes == (0,) and ad.a.shape == (3, 8, 2) and ad.sds_on.shape == (3,)
  randomize(model, jax.random.key(2))
  np.testing.assert_allclose(model(x), snnx.merged(model)(x), rtol=1e-5, atol=1e-5)
  # An adapter whose layer axes do not fit the module is refused.
  snnx.unwrap(model)
  wrong = Adapter(a=jnp.zeros((3, 2)), b=jnp.zeros((2, 64)), kernel_shape=(3, 8, 8), in_axes=(0,))
  with pytest.raises(ValueError, match=r"cannot adapt a Linear whose kernel has shape \(3, 8, 8\) but "
                     r"which uses a kernel of shape \(8, 8\) per call"):
    snnx.attach(model, {"layers": {"fc": {"kernel": wrong}}})


def test_conv_kinds_forward_and_export(tmp_path):
  from sdslora_jax import peft

  class Convs(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 4, (3,), rngs=rngs)
      self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
      self.transpose = nnx.ConvTranspose(4, 3, (3,), rngs=rngs)

    def __call__(self, x):
      return self.transpose(self.grouped(self.conv(x)))

  x = random_normal(jax.random.key(0), (2, 6, 4))
  model = Convs(nnx.Rngs(0))
  snnx.adapt(model, [rule(r".*/kernel", rank=2)], key=jax.random.key(1))
  randomize(model, jax.random.key(2))
  ads = snnx.adapters(model)
  assert {k: v["kernel"].kind for k, v in ads.items()} == {
      "conv": "conv", "grouped": "conv_grouped", "transpose": "conv_transpose"}
  np.testing.assert_allclose(model(x), snnx.merged(model)(x), rtol=1e-5, atol=1e-5)
  peft.export_peft(tmp_path / "ok", {"conv": ads["conv"]}, module_names=lambda p: p)
  for mod, what in [("grouped", "grouped convolution"), ("transpose", "ConvTranspose")]:
    with pytest.raises(NotImplementedError, match=rf"cannot export the adapter at '{mod}/kernel'.*{what}"):
      peft.export_peft(tmp_path / mod, {mod: ads[mod]}, module_names=lambda p: p)


class _TwoLayers(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


@pytest.mark.parametrize("method", ["sds", "lora"])
def test_nnx_optimizer_many_steps_one_trace_matches_split_state(method):
  from sdslora_jax.optim import sds_lora

  x = random_normal(jax.random.key(5), (6, 8))
  y = random_normal(jax.random.key(6), (6, 4))
  rules = [rule(r".*kernel", rank=2, method=method)]
  make_tx = lambda: sds_lora(optax.adamw(1e-2), warmup_steps=3)

  model = _TwoLayers(nnx.Rngs(0))
  snnx.adapt(model, rules, key=jax.random.key(1))
  opt = nnx.Optimizer(model, make_tx(), wrt=snnx.AdapterVariable)
  traces = []
  step = nnx_mse_step(x, y, traces)

  # The split-state pattern on an identical model.
  ref = _TwoLayers(nnx.Rngs(0))
  snnx.adapt(ref, rules, key=jax.random.key(1))
  graphdef, ads, rest = nnx.split(ref, snnx.AdapterVariable, ...)
  tx = make_tx()
  state = tx.init(ads)

  @jax.jit
  def ref_step(ads, state):
    loss = lambda a: jnp.mean((nnx.merge(graphdef, a, rest)(x) - y) ** 2)
    value, grads = jax.value_and_grad(loss)(ads)
    updates, state = tx.update(grads, state, ads)
    return optax.apply_updates(ads, updates), state, value

  for _ in range(8):  # warm-up, switch at update 3, refreshes after
    value = step(model, opt)
    ads, state, ref_value = ref_step(ads, state)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-7)
  assert len(traces) == 1
  no_stamp = lambda t: jax.tree.map(lambda a: dataclasses.replace(a, stamp=None), t,
                                    is_leaf=is_adapter)  # stamps hash bits, not values
  for got, want in zip(jax.tree.leaves(no_stamp(snnx.adapters(model))), jax.tree.leaves(
      no_stamp(snnx.adapters(nnx.merge(graphdef, ads, rest))))):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-5)  # Adam amplifies fusion round-off
  if method == "sds":
    assert all(float(a.sds_on) == 1.0 for a in jax.tree.leaves(snnx.adapters(model),
                                                                  is_leaf=is_adapter))


def test_pointwise_conv_matches_the_merged_model():
  # An NNX 1x1 Conv goes through the rank-r path; the merged copy is the reference.
  from sdslora_jax.targets import rule
  from testing_utils import randomize

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.pw = nnx.Conv(8, 12, (1, 1), rngs=rngs)
      self.full = nnx.Conv(12, 6, (3, 3), rngs=rngs)

    def __call__(self, x):
      return self.full(nnx.relu(self.pw(x)))

  model = snnx.adapt(Net(nnx.Rngs(0)), [rule(r".*kernel", method="sds", rank=3, alpha=3.0)],
                     key=jax.random.key(1))
  fresh = randomize(snnx.adapters(model), jax.random.key(2))
  for name in ("pw", "full"):
    getattr(model, name).adapter.set_value(fresh[name]["kernel"])
  x = random_normal(jax.random.key(3), (2, 5, 5, 8))
  np.testing.assert_allclose(model(x), snnx.merged(model)(x), rtol=1e-5, atol=1e-6)
