"""Linen frontend on a model with every supported layer type, and the jaxpr check."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdslora_jax import linen as sl
from sdslora_jax import tree
from sdslora_jax.adapter import is_adapter
from sdslora_jax.targets import rule
from testing_utils import big_intermediates, randomize


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
  y2 = model.apply({"params": sl.merge(params, ads)}, ids)
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

  grads = jax.grad(loss)(ads, params)
  assert jax.tree.structure(grads) == jax.tree.structure(ads)
  updates, _ = opt.update(grads, state, ads)
  new = optax.apply_updates(ads, updates)
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

  closed = jax.make_jaxpr(jax.grad(loss))(ads, params, x)
  kernel_size = 1024 * 1024
  big, largest = big_intermediates(closed, kernel_size)
  assert big == [], big
  assert largest <= 4 * 16 * 1024
  # The dense reference does form kernel-sized values: the check can fail.
  dense = jax.make_jaxpr(jax.grad(lambda a, p, x: jnp.mean(
      model.apply({"params": tree.merge(p, a)}, x) ** 2)))(ads, params, x)
  assert big_intermediates(dense, kernel_size)[0]
