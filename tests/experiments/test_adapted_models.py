"""Adapters on real architectures: a MiniLM-layout BERT encoder and a ConvNet, Linen and NNX."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sdslora_jax
from sdslora_jax import linen as sl
from sdslora_jax import nnx as snnx
from sdslora_jax import fused, peft, tree
from sdslora_jax.adapter import is_adapter
from experiments.models import bert, convnet
from sdslora_jax.optim import sds_lora
from sdslora_jax.targets import rule
from testing_utils import big_intermediates, linen_mse_step, randomize

BERT_RULES = [
    rule(r".*attention/(query|key|value|output)/kernel", rank=4, alpha=8.0),
    rule(r".*layer_?\d*/?(intermediate|output)/kernel|.*layers/\d+/(intermediate|output)/kernel",
         rank=4, method="lora", rslora=True),
]
CONV_RULES = [rule(r".*conv.*kernel", rank=2), rule(r"head/kernel", rank=2, method="lora")]


def assert_trees_close(t1, t2, rtol=1e-3, atol=2e-5):
  l1, l2 = jax.tree.leaves(t1), jax.tree.leaves(t2)
  assert len(l1) == len(l2) > 0
  for u, v in zip(l1, l2):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def hf_name(module_path: str) -> str:
  """Flax BERT module path -> Hugging Face BertModel module name."""
  m = re.fullmatch(r"encoder/layers?_?/?(\d+)/(.*)", module_path)
  if m is None:
    return None
  i, rest = m.group(1), m.group(2)
  rest = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
          "attention/value": "attention.self.value", "attention/output": "attention.output.dense",
          "intermediate": "intermediate.dense", "output": "output.dense"}[rest]
  return f"encoder.layer.{i}.{rest}"


IDS = (jnp.arange(16).reshape(2, 8) * 7) % 100
MASK = jnp.array([[1] * 8, [1] * 5 + [0] * 3])


@pytest.fixture(scope="module")
def linen_bert():
  model = bert.BertEncoder(bert.tiny_config())
  params = jax.jit(model.init)(jax.random.key(0), IDS, MASK)["params"]
  ads = sl.init_adapters(jax.random.key(1), model, params, BERT_RULES, IDS, MASK)
  return model, params, ads


def test_bert_linen_exact_forward_grads(linen_bert, tmp_path):
  model, params, ads = linen_bert
  assert len(jax.tree.leaves(ads, is_leaf=is_adapter)) == 12
  assert ads["encoder"]["layer_0"]["attention"]["output"]["kernel"].in_axes == (0, 1)
  y0 = model.apply({"params": params}, IDS, MASK)
  np.testing.assert_array_equal(sl.apply(model, {"params": params}, ads, IDS, MASK), y0)
  ads = randomize(ads, jax.random.key(2))

  def fast(a):
    return jnp.mean(jnp.sin(sl.apply(model, {"params": params}, a, IDS, MASK)))

  def dense(a):
    return jnp.mean(jnp.sin(model.apply({"params": tree.merge(params, a)}, IDS, MASK)))

  y = sl.apply(model, {"params": params}, ads, IDS, MASK)
  np.testing.assert_allclose(y, model.apply({"params": tree.merge(params, ads)}, IDS, MASK),
                             rtol=1e-4, atol=1e-4)
  assert_trees_close(jax.jit(jax.grad(fast))(ads), jax.jit(jax.grad(dense))(ads))
  # PEFT round trip with Hugging Face module names.
  peft.export_peft(tmp_path, ads, module_names=hf_name)
  back = peft.import_peft(tmp_path, params, module_names=hf_name)
  np.testing.assert_allclose(model.apply({"params": tree.merge(params, back)}, IDS, MASK),
                             model.apply({"params": tree.merge(params, ads)}, IDS, MASK),
                             rtol=1e-4, atol=1e-4)


def test_bert_nnx_matches_linen(linen_bert):
  l_model, params, l_ads = linen_bert
  model = bert.BertEncoderNNX(bert.tiny_config(), rngs=nnx.Rngs(0))
  bert.load_linen_params_into_nnx(model, params)
  y0 = model(IDS, MASK)
  np.testing.assert_allclose(y0, l_model.apply({"params": params}, IDS, MASK), atol=1e-5)
  snnx.adapt(model, BERT_RULES, key=jax.random.key(1))
  np.testing.assert_array_equal(model(IDS, MASK), y0)
  # Same random adapters in both frontends (paths translated).
  l_ads = randomize(l_ads, jax.random.key(3))
  n_ads = snnx.adapters(model)
  for i in range(2):
    for keys in [("attention", "query"), ("attention", "output"), ("intermediate",), ("output",)]:
      node_l, node_n = l_ads["encoder"][f"layer_{i}"], n_ads["encoder"]["layers"][i]
      for k in keys:
        node_l, node_n = node_l[k], node_n[k]
      src = node_l["kernel"]
      assert node_n["kernel"].kernel_shape == src.kernel_shape
      assert node_n["kernel"].in_axes == src.in_axes
  snnx.attach(snnx.unwrap(model), _nnx_paths(l_ads))
  y_lin = sl.apply(l_model, {"params": params}, l_ads, IDS, MASK)
  np.testing.assert_allclose(model(IDS, MASK), y_lin, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(snnx.merged(model)(IDS, MASK), y_lin, rtol=1e-4, atol=1e-4)
  graphdef, state, rest = nnx.split(model, snnx.AdapterVariable, ...)

  @jax.jit
  def fast(state):
    return jnp.mean(jnp.sin(nnx.merge(graphdef, state, rest)(IDS, MASK)))

  def dense(a):
    return jnp.mean(jnp.sin(l_model.apply({"params": tree.merge(params, a)}, IDS, MASK)))

  g_nnx = snnx.adapters(nnx.merge(graphdef, jax.grad(fast)(state), rest))
  assert_trees_close(_nnx_paths(jax.jit(jax.grad(dense))(l_ads)), g_nnx)


def _nnx_paths(linen_tree):
  """Linen BERT adapter tree (encoder/layer_i) -> NNX paths (encoder/layers/i)."""
  return {"encoder": {"layers": {int(k.split("_")[1]): v for k, v in linen_tree["encoder"].items()}}}


# The Linen conv paths are covered by tests/test_linen.py by default.
@pytest.mark.slow  # conv adapters: test_linen (pointwise, conv kinds), test_nnx
@pytest.mark.parametrize("frontend", ["linen", "nnx"])
def test_convnet(frontend):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  if frontend == "linen":
    model = convnet.ConvNet(num_classes=3, features=(4, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    ads = sl.init_adapters(jax.random.key(1), model, params, CONV_RULES, x)
    assert ads["conv_0"]["kernel"].kind == "conv"
    np.testing.assert_array_equal(sl.apply(model, {"params": params}, ads, x), model.apply({"params": params}, x))
    ads = randomize(ads, jax.random.key(2))
    fast = lambda a: jnp.sum(sl.apply(model, {"params": params}, a, x) ** 2)
    dense = lambda a: jnp.sum(model.apply({"params": tree.merge(params, a)}, x) ** 2)
    np.testing.assert_allclose(sl.apply(model, {"params": params}, ads, x),
                               model.apply({"params": tree.merge(params, ads)}, x), rtol=1e-5, atol=1e-5)
    assert_trees_close(jax.jit(jax.grad(fast))(ads), jax.jit(jax.grad(dense))(ads))
    return
  model = convnet.ConvNetNNX(num_classes=3, features=(4, 8), rngs=nnx.Rngs(0))
  y0 = model(x)
  snnx.adapt(model, CONV_RULES, key=jax.random.key(1))
  np.testing.assert_array_equal(model(x), y0)
  ads = randomize(snnx.adapters(model), jax.random.key(2))
  snnx.attach(snnx.unwrap(model), ads)
  np.testing.assert_allclose(model(x), snnx.merged(model)(x), rtol=1e-5, atol=1e-5)
  graphdef, state, rest = nnx.split(model, snnx.AdapterVariable, ...)
  fast = lambda s: jnp.sum(nnx.merge(graphdef, s, rest)(x) ** 2)
  base = snnx.unwrap(nnx.clone(model))
  bg, bparams, brest = nnx.split(base, nnx.Param, ...)
  pure = nnx.to_pure_dict(bparams)

  def dense(a):
    p = nnx.clone(bparams)
    nnx.replace_by_pure_dict(p, tree.merge(pure, a))
    return jnp.sum(nnx.merge(bg, p, brest)(x) ** 2)

  g_fast = snnx.adapters(nnx.merge(graphdef, jax.grad(fast)(state), rest))
  assert_trees_close(g_fast, jax.grad(dense)(ads))


@pytest.mark.parametrize("frontend", ["linen", "nnx"])
def test_bert_layer_384_training_step_jaxpr(frontend):
  """A whole training step (loss, grads, ``sds_lora(adamw)`` update, apply) stays rank-r."""
  cfg = bert.BertConfig(vocab_size=64, hidden_size=384, num_layers=1, num_heads=12,
                        intermediate_size=1536, max_position_embeddings=64)
  ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  tx = sds_lora(optax.adamw(1e-3))
  if frontend == "linen":
    model = bert.BertEncoder(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    layouts = sl.module_layouts(model, ids)
    ads = jax.eval_shape(lambda: tree.init_adapters(jax.random.key(0), params, BERT_RULES, layouts=layouts))
    loss = lambda a, p, i: jnp.mean(sl.apply(model, {"params": p}, a, i) ** 2)
  else:
    def build():
      m = bert.BertEncoderNNX(cfg, rngs=nnx.Rngs(0))
      return snnx.adapt(m, BERT_RULES, key=jax.random.key(1))

    graphdef, ads, params = nnx.split(nnx.eval_shape(build), snnx.AdapterVariable, ...)
    loss = lambda s, r, i: jnp.mean(nnx.merge(graphdef, s, r)(i) ** 2)

  def training_step(loss):
    def step(ads, opt_state, params, ids):
      grads = jax.grad(loss)(ads, params, ids)
      updates, opt_state = tx.update(grads, opt_state, ads)
      return optax.apply_updates(ads, updates), opt_state

    return step

  opt_state = jax.eval_shape(tx.init, ads)
  with fused.merging("never"):  # the rank-r op (merged ops form K + dK: tests/test_fused.py)
    closed = jax.make_jaxpr(training_step(loss))(ads, opt_state, params, ids)
  kernels = [ad.kernel_shape for ad in jax.tree.leaves(ads, is_leaf=is_adapter) if is_adapter(ad)]
  assert len(kernels) == 6
  smallest_kernel = min(math.prod(s) for s in kernels)
  assert smallest_kernel == 384 * 384  # query/key/value/output; FFN kernels are 384 x 1536
  prims = {e.primitive.name for e in closed.jaxpr.eqns}
  assert "cond" in prims  # the optimizer's switch / refresh logic is in the traced step
  big, largest = big_intermediates(closed, smallest_kernel)
  print(f"{frontend}: largest intermediate {largest} elements, smallest targeted kernel "
        f"{smallest_kernel}")
  assert big == [], big
  assert largest < smallest_kernel
  if frontend == "linen":  # the same step through the dense merge does form kernel-sized values
    dense_loss = lambda a, p, i: jnp.mean(model.apply({"params": tree.merge(p, a)}, i) ** 2)
    dense = jax.make_jaxpr(training_step(dense_loss))(ads, opt_state, params, ids)
    assert big_intermediates(dense, smallest_kernel)[0]


@pytest.mark.slow  # the sds_on init is covered on small adapters and NNX by default
def test_bert_sds_on_exact_at_init_and_trains_without_warmup():
  model = bert.BertEncoder(bert.tiny_config())
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 100)
  params = model.init(jax.random.key(1), ids)["params"]
  rules = [rule(r".*attention/(query|key|value|output)/kernel", rank=4, alpha=8.0)]
  ads = sdslora_jax.init_adapters(jax.random.key(2), model, params, rules, ids, sds_on=True)
  y0 = model.apply({"params": params}, ids)
  np.testing.assert_array_equal(sdslora_jax.apply(model, {"params": params}, ads, ids), y0)
  target = jax.random.normal(jax.random.key(3), y0.shape)
  tx = sds_lora(optax.adam(1e-2), warmup_steps=0)
  state = tx.init(ads)

  step = linen_mse_step(model, tx, ids, target)
  losses = []
  for _ in range(5):
    ads, state, value = step(ads, state, params)
    losses.append(float(value))
  assert losses[-1] < 0.9 * losses[0]
  for ad in jax.tree.leaves(ads, is_leaf=is_adapter):
    assert float(ad.sds_on) == 1.0
    np.testing.assert_allclose(ad.qa.T @ ad.qa, jnp.eye(4), atol=1e-5)
