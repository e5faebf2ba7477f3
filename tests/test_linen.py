"""Linen frontend on a model with every supported layer type, and the jaxpr check."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdslora_jax import linen as sl
from sdslora_jax import fused, tree
from sdslora_jax.adapter import is_adapter
from sdslora_jax.targets import rule
from testing_utils import big_intermediates, random_normal, randomize


class Zoo(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(40, 16, name="emb")
    x = emb(ids)
    q = nn.DenseGeneral((4, 4), name="q")(x)
    o = nn.DenseGeneral(16, axis=(-2, -1), name="o")(q)
    e = nn.Einsum((16, 2, 8), "btd,dhk->bthk", name="ein")(o)
    c = nn.Conv(16, (3,), name="conv")(e.reshape(e.shape[:2] + (16,)))
    h = nn.Dense(16, name="head")(nn.relu(c))
    return emb.attend(h)


RULES = [rule(r"(q|o|ein|conv)/kernel|emb/embedding", rank=2, alpha=3.0), rule(r"head/kernel", rank=3, method="lora")]


@pytest.fixture(scope="module")
def setup():
  model = Zoo()
  ids = jnp.arange(12).reshape(2, 6) % 40
  params = model.init(jax.random.key(0), ids)["params"]
  ads = sl.init_adapters(jax.random.key(1), model, params, RULES, ids)
  return model, ids, params, ads


def test_layouts_from_module_types(setup):
  _, _, _, ads = setup
  assert ads["conv"]["kernel"].kind == "conv" and ads["conv"]["kernel"].in_axes == (0, 1)
  assert ads["o"]["kernel"].in_axes == (0, 1) and ads["q"]["kernel"].in_axes == (0,)
  assert ads["emb"]["embedding"].kind == "embed"
  assert ads["head"]["kernel"].method == "lora" and ads["q"]["kernel"].scale == 1.5


def test_exact_at_init(setup):
  model, ids, params, ads = setup
  np.testing.assert_array_equal(sl.apply(model, {"params": params}, ads, ids),
                                model.apply({"params": params}, ids))


@pytest.mark.parametrize("sds_on", [0.0, 1.0])
def test_forward_and_grads_match_merged(setup, sds_on):
  model, ids, params, ads = setup
  ads = randomize(ads, jax.random.key(2), sds_on)

  def fast(a):
    return jnp.mean(jnp.tanh(sl.apply(model, {"params": params}, a, ids)))

  def dense(a):
    return jnp.mean(jnp.tanh(model.apply({"params": tree.merge(params, a)}, ids)))

  y1 = sl.apply(model, {"params": params}, ads, ids)
  y2 = model.apply({"params": tree.merge(params, ads)}, ids)
  assert float(jnp.abs(y1 - model.apply({"params": params}, ids)).max()) > 1e-2
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
  g1, g2 = jax.jit(jax.grad(fast))(ads), jax.jit(jax.grad(dense))(ads)
  for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(u, v, rtol=1e-3, atol=2e-5)


def test_intercept_context_manager(setup):
  model, ids, params, ads = setup
  ads = randomize(ads, jax.random.key(3))
  with sl.intercept(ads) as used:
    y = model.apply({"params": params}, ids)
  assert len(used) == 6
  np.testing.assert_allclose(y, model.apply({"params": tree.merge(params, ads)}, ids), rtol=1e-4, atol=1e-4)


def test_base_gets_no_gradient_and_no_optimizer_state(setup):
  model, ids, params, ads = setup
  opt = optax.adam(1e-3)
  state = opt.init(ads)
  base_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim >= 2}
  n_adapter_arrays = len(jax.tree.leaves(ads))
  assert len(jax.tree.leaves(state)) == 1 + 2 * n_adapter_arrays  # count + mu + nu
  assert not base_shapes & {tuple(x.shape) for x in jax.tree.leaves(state)}

  def loss(a, p):
    return jnp.mean(sl.apply(model, {"params": p}, a, ids) ** 2)

  grads = jax.jit(jax.grad(loss))(ads, params)
  assert jax.tree.structure(grads) == jax.tree.structure(ads)
  updates, _ = jax.jit(opt.update)(grads, state, ads)
  new = jax.jit(optax.apply_updates)(ads, updates)
  assert all(is_adapter(x) for x in jax.tree.leaves(new, is_leaf=is_adapter))


def test_unused_adapter_is_an_error(setup):
  model, ids, params, ads = setup
  extra = dict(ads, missing={"kernel": ads["head"]["kernel"]})
  with pytest.raises(ValueError, match=r"adapters at \['missing/kernel'\] were not applied"):
    sl.apply(model, {"params": params}, extra, ids)


def test_training_step_jaxpr_has_no_kernel_sized_intermediate():
  class Big(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1024, name="proj")(x)

  model = Big()
  x = jax.ShapeDtypeStruct((4, 16, 1024), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  ads = jax.eval_shape(lambda: tree.init_adapters(jax.random.key(0), params, [rule("proj/kernel", rank=8)]))

  def loss(a, p, x):
    return jnp.mean(sl.apply(model, {"params": p}, a, x) ** 2)

  with fused.merging("never"):  # the rank-r op (a merged op forms K + dK: tests/test_fused.py)
    closed = jax.make_jaxpr(jax.grad(loss))(ads, params, x)
  kernel_size = 1024 * 1024
  big, largest = big_intermediates(closed, kernel_size)
  assert big == [], big
  assert largest <= 4 * 16 * 1024
  # The dense reference does form kernel-sized values: the check can fail.
  dense = jax.make_jaxpr(jax.grad(lambda a, p, x: jnp.mean(
      model.apply({"params": tree.merge(p, a)}, x) ** 2)))(ads, params, x)
  assert big_intermediates(dense, kernel_size)[0]


@pytest.mark.parametrize("x_shape", [(3, 4, 4), (2, 3, 4)], ids=["equal_sizes", "different_sizes"])
def test_dense_general_unsorted_axis(x_shape):
  # Flax contracts sorted(axis): kernel input axis i pairs with sorted(axis)[i].
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(5, axis=(-1, -2), name="dg")(x)

  model = M()
  x = random_normal(jax.random.key(0), x_shape)
  params = model.init(jax.random.key(1), x)["params"]
  assert params["dg"]["kernel"].shape == (*x_shape[1:], 5)
  ads = sl.init_adapters(jax.random.key(2), model, params, [rule("dg/kernel", rank=2)], x)
  ads = randomize(ads, jax.random.key(3))
  y = sl.apply(model, {"params": params}, ads, x)
  y_merged = model.apply({"params": tree.merge(params, ads)}, x)
  diff = float(jnp.abs(y - y_merged).max())
  print(f"DenseGeneral axis=(-1, -2), x {x_shape}: max |adapted - merged| = {diff:.2e}")
  assert float(jnp.abs(y_merged - model.apply({"params": params}, x)).max()) > 1e-1
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5)


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.relu(nn.Dense(8, name="fc")(h)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = stack(name="layers")(x, None)
    return nn.Dense(2, name="head")(h)


@pytest.mark.slow  # tests/test_scan.py covers stacked adapters by default
def test_scanned_stacked_kernel_gets_one_adapter_per_layer():
  model, x = Scanned(), jnp.ones((2, 8))
  params = model.init(jax.random.key(0), x)["params"]
  assert params["layers"]["fc"]["kernel"].shape == (3, 8, 8)
  ads = sl.init_adapters(jax.random.key(1), model, params, [rule(r".*/kernel", rank=2)], x)
  assert ads["layers"]["fc"]["kernel"].layer_axes == (0,)
  ads = randomize(ads, jax.random.key(2))
  np.testing.assert_allclose(sl.apply(model, {"params": params}, ads, x),
                             model.apply({"params": tree.merge(params, ads)}, x), rtol=1e-5, atol=1e-5)
  # The interceptor alone cannot reach the layers: a clear error, not a broadcasting failure.
  with pytest.raises(ValueError, match="did not reach its layer"):
    with sl.intercept(ads):
      model.apply({"params": params}, x)


class Convs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3,), name="conv")(x)
    x = nn.Conv(4, (3,), feature_group_count=2, name="grouped")(x)
    x = nn.ConvTranspose(4, (3,), name="transpose")(x)
    return nn.ConvLocal(3, (3,), name="local")(x)


def test_conv_kinds_forward_and_export(tmp_path):
  from sdslora_jax import peft

  model = Convs()
  x = random_normal(jax.random.key(0), (2, 6, 4))
  params = model.init(jax.random.key(1), x)["params"]
  ads = sl.init_adapters(jax.random.key(2), model, params, [rule(r".*/kernel", rank=2)], x)
  kinds = {k: v["kernel"].kind for k, v in ads.items()}
  assert kinds == {"conv": "conv", "grouped": "conv_grouped", "transpose": "conv_transpose",
                   "local": "conv_local"}
  ads = randomize(ads, jax.random.key(3))
  np.testing.assert_allclose(sl.apply(model, {"params": params}, ads, x),
                             model.apply({"params": tree.merge(params, ads)}, x), rtol=1e-5, atol=1e-5)
  names = lambda p: p
  peft.export_peft(tmp_path / "ok", {"conv": ads["conv"]}, module_names=names)
  for mod, what in [("grouped", r"grouped convolution \(feature_group_count > 1\)"),
                    ("transpose", "ConvTranspose"), ("local", "ConvLocal")]:
    shape = re.escape(str(tuple(params[mod]["kernel"].shape)))
    with pytest.raises(NotImplementedError, match=rf"cannot export the adapter at '{mod}/kernel' "
                       rf"\(kernel shape {shape}\): it is on (a )?{what}"):
      peft.export_peft(tmp_path / mod, {mod: ads[mod]}, module_names=names)
    assert not (tmp_path / mod).exists()


def test_root_module_layouts():
  x = jnp.ones((2, 3, 4))
  assert set(sl.module_layouts(nn.DenseGeneral(5, axis=(-1, -2)), x)) == {"kernel"}
  model = nn.Conv(4, (3,), feature_group_count=2)
  params = model.init(jax.random.key(0), x[..., :2].repeat(2, -1))["params"]
  ads = sl.init_adapters(jax.random.key(1), model, params, [rule("kernel", rank=2)], x)
  assert ads["kernel"].kind == "conv_grouped"
  ads = randomize(ads, jax.random.key(2))
  np.testing.assert_allclose(sl.apply(model, {"params": params}, ads, x),
                             model.apply({"params": tree.merge(params, ads)}, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "sds"])
def test_pointwise_conv_takes_the_rank_r_path_and_matches_the_merged_kernel(method):
  # A 1x1 convolution at stride 1 is a matmul over channels: its adapter is applied as
  # (x @ a) @ b (no kernel-sized merge in the program); a 3x3 one is merged per call.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(12, (1, 1), name="pw")(x))
      return nn.Conv(6, (3, 3), name="full")(h)

  model = Net()
  x = random_normal(jax.random.key(0), (2, 5, 5, 8))
  params = model.init(jax.random.key(1), x)["params"]
  ads = sl.init_adapters(jax.random.key(2), model, params,
                         [rule(r".*kernel", method=method, rank=3, alpha=3.0)], x)
  ads = randomize(ads, jax.random.key(3))

  def adapted(ad):
    return jnp.sum(jnp.sin(sl.apply(model, {"params": params}, ad, x)))

  def merged(ad):  # the reference: kernels with their updates folded in, plain autodiff
    return jnp.sum(jnp.sin(model.apply({"params": tree.merge(params, ad)}, x)))

  np.testing.assert_allclose(jax.jit(adapted)(ads), jax.jit(merged)(ads), rtol=1e-5)
  got, want = jax.jit(jax.grad(adapted))(ads), jax.jit(jax.grad(merged))(ads)
  for k in ("pw", "full"):
    np.testing.assert_allclose(got[k]["kernel"].a, want[k]["kernel"].a, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got[k]["kernel"].b, want[k]["kernel"].b, rtol=2e-4, atol=1e-5)
  # The 1x1 conv's gradient program forms no (1, 1, 8, 12) kernel-sized update.
  found, _ = big_intermediates(jax.make_jaxpr(jax.grad(adapted))(ads), 1)
  assert not [f for f in found if tuple(f[1]) == (1, 1, 8, 12)], found
  assert [f for f in found if tuple(f[1]) == (3, 3, 12, 6)]  # the check can fail: 3x3 merges
