"""NNX frontend: model surgery, adapter state, merge, unwrap."""


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
from testing_utils import randomize_adapter


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
