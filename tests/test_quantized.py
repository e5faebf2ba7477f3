"""The op-level path on a frozen base quantized by qwix (int8, int4, nf4), weight-only.

qwix's PTQ model dequantizes each kernel inside its own computation (codes, then
scale, then the kernel's float value into the dot_general); the op-level path follows
that chain and adds the adapter at the op. The reference is the float model on the
dequantized weights with the dense update merged in (``tree.merge``), differentiated
by autodiff.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
import qwix

from sdslora_jax import intercept, quantized, tree
from sdslora_jax.targets import rule
from testing_utils import random_normal, randomize, train_adapters

RULES = [rule(r"Dense_\d/kernel", method="sds", rank=4)]


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, use_bias=False)(nn.relu(nn.Dense(32, use_bias=False)(x)))


def _quantized(qtype, tile):
  model = Mlp()
  x = random_normal(jax.random.key(5), (8, 16))
  params = model.init(jax.random.key(0), x)["params"]
  provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype=qtype,
                                                     tile_size=tile)])
  qmodel = qwix.quantize_model(model, provider)
  qparams = qwix.quantize_params(params, qmodel.init(jax.random.key(0), x)["params"])
  dequantized = jax.tree.map(lambda w: qwix.dequantize(w.array), qparams,
                             is_leaf=lambda z: hasattr(z, "how"))
  fn = lambda p, x: qmodel.apply({"params": p}, x)
  return model, fn, qparams, dequantized, x


@pytest.mark.parametrize("qtype,tile", [("int8", None), ("int4", 8), ("nf4", 8)])
def test_quantized_base_matches_dequantized_reference(qtype, tile):
  model, fn, qparams, dequantized, x = _quantized(qtype, tile)
  assert set(intercept.quantized_weights(qparams)) == {"Dense_0/kernel", "Dense_1/kernel"}
  ads = intercept.init_adapters(jax.random.key(1), fn, qparams, RULES, x)
  assert ads["Dense_0"]["kernel"].a.dtype == jnp.float32  # adapters in full precision
  # Blocks of the kernel are multiplied separately: equal up to float summation order.
  np.testing.assert_allclose(
      jax.jit(lambda p, a: intercept.apply(fn, p, a, x))(qparams, ads), jax.jit(fn)(qparams, x),
      rtol=1e-5, atol=1e-6)
  ads = randomize(ads, jax.random.key(2))
  got = jax.jit(lambda p, a: intercept.apply(fn, p, a, x))(qparams, ads)
  want = jax.jit(lambda a: model.apply({"params": tree.merge(dequantized, a)}, x))(ads)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
  g_ops = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(intercept.apply(fn, qparams, a, x)))))(ads)
  g_ref = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(
      model.apply({"params": tree.merge(dequantized, a)}, x)))))(ads)
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_ref))
  for u, v in zip(jax.tree.leaves(g_ops), jax.tree.leaves(g_ref)):  # zero ones too
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6 * scale)


def test_quantized_base_trains_through_the_switch_in_one_trace():
  _, fn, qparams, _, x = _quantized("nf4", 8)
  target = jnp.sin(random_normal(jax.random.key(7), (8, 64)))
  ads = intercept.init_adapters(jax.random.key(1), fn, qparams, RULES, x)
  loss = lambda a, qparams: jnp.mean((intercept.apply(fn, qparams, a, x) - target) ** 2)
  ads, losses, traces = train_adapters(loss, ads, qparams)
  assert len(traces) == 1 and losses[-1] < 0.5 * losses[0]
  assert float(ads["Dense_1"]["kernel"].sds_on) == 1.0


def test_quantized_weight_outside_a_matmul_is_refused():
  model, fn, qparams, _, x = _quantized("int8", None)
  # A regulariser on the dequantized kernel: an elementwise use after the chain.
  reg = lambda p, x: fn(p, x).sum() + jnp.sum(
      jnp.abs(qwix.dequantize(p["Dense_0"]["kernel"].array)))
  with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*`abs`"):
    intercept.layouts(reg, qparams, RULES, x)


# --- the block-by-block base matmul --------------------------------------------------


@pytest.mark.parametrize("qtype,tile,asym", [("int8", None, False), ("int4", 8, False),
                                             ("nf4", 8, False), ("int8", 4, True)])
def test_dequantize_matches_qwix(qtype, tile, asym):
  w = random_normal(jax.random.key(0), (32, 24))
  qa = qwix.quantize(w, qtype, channelwise_axes=[1], tiled_axes={0: tile} if tile else None,
                     calibration_method="minmax" if asym else "absmax")
  assert (qa.zero_point is not None) == asym
  table = jnp.asarray([float(v) for v in quantized_table()]) if qtype == "nf4" else None
  got = quantized.dequantize(qa.qvalue, qa.scale, qa.zero_point, table)
  np.testing.assert_array_equal(got, qwix.dequantize(qa))


def quantized_table():
  from qwix._src.core import numerics  # the nf4 table, as qwix defines it
  return numerics.get_nf4_buckets()


@pytest.mark.parametrize("dn,w_shape,x_shape,w_side", [
    ((((1,), (0,)), ((), ())), (16, 40), (3, 16), 1),            # x @ W
    ((((1,), (1,)), ((), ())), (40, 16), (3, 16), 1),            # x @ W.T (logits)
    ((((0,), (1,)), ((), ())), (16, 40), (5, 16), 0),            # W on the left
    ((((2,), (1,)), ((0,), (0,))), (4, 16, 24), (4, 3, 16), 1),  # batched (stacked heads)
    ((((1, 2), (0, 1)), ((), ())), (4, 8, 24), (3, 4, 8), 1),    # two contracted axes
])
def test_blocked_dot_general_matches_dense(dn, w_shape, x_shape, w_side):
  w = random_normal(jax.random.key(1), w_shape)
  x = random_normal(jax.random.key(2), x_shape)
  qa = qwix.quantize(w, "int8", channelwise_axes=[len(w_shape) - 1],
                     tiled_axes={len(w_shape) - 2: 4})
  dense = qwix.dequantize(qa)
  ref = lambda x: (lax.dot_general(x, dense, dn) if w_side else lax.dot_general(dense, x, dn))
  got = lambda x: quantized.blocked_dot_general(
      x, {"qvalue": qa.qvalue, "scale": qa.scale}, w_side=w_side, dimension_numbers=dn,
      dtype=jnp.float32)
  np.testing.assert_allclose(got(x), ref(x), rtol=1e-5, atol=1e-5)
  ct = random_normal(jax.random.key(3), ref(x).shape)
  np.testing.assert_allclose(jax.vjp(got, x)[1](ct)[0], jax.vjp(ref, x)[1](ct)[0],
                             rtol=1e-5, atol=1e-5)


def _walk_avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _walk_avals(sub)


def test_no_float_copy_of_a_quantized_kernel_in_the_step():
  """int8 1024 x 4096 kernel: its float32 value would be 16 MiB."""
  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4096, use_bias=False)(x)

  x = random_normal(jax.random.key(0), (8, 1024))
  model = Wide()
  params = model.init(jax.random.key(0), x)["params"]
  provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8")])
  qmodel = qwix.quantize_model(model, provider)
  qparams = qwix.quantize_params(params, qmodel.init(jax.random.key(0), x)["params"])
  fn = lambda p, x: qmodel.apply({"params": p}, x)
  ads = intercept.init_adapters(jax.random.key(1), fn, qparams, [rule("Dense_0/kernel", rank=8)], x)
  kernel_f32 = 1024 * 4096 * 4

  def step(ads, qparams, x):
    return jax.grad(lambda a: jnp.mean(intercept.apply(fn, qparams, a, x) ** 2))(ads)

  def plain_step(qparams, x):  # what the quantized model costs on its own: the kernel in full
    return jax.grad(lambda x: jnp.mean(fn(qparams, x) ** 2))(x)

  big = [a for a in _walk_avals(jax.make_jaxpr(step)(ads, qparams, x).jaxpr)
         if jnp.issubdtype(a.dtype, jnp.floating) and a.size * a.dtype.itemsize >= kernel_f32 // 2]
  assert big == []
  plain_big = [a for a in _walk_avals(jax.make_jaxpr(plain_step)(qparams, x).jaxpr)
               if jnp.issubdtype(a.dtype, jnp.floating) and a.size * 4 >= kernel_f32]
  assert plain_big  # the check above can see a full copy
  temp = jax.jit(step).lower(ads, qparams, x).compile().memory_analysis().temp_size_in_bytes
  plain = jax.jit(plain_step).lower(qparams, x).compile().memory_analysis().temp_size_in_bytes
  assert plain >= kernel_f32 and temp < kernel_f32 // 2, (temp, plain)


@pytest.mark.parametrize("qtype,tile", [("int8", None), ("nf4", 8)])
def test_merge_into_the_dequantized_kernel(qtype, tile):
  model, fn, qparams, dequantized, x = _quantized(qtype, tile)
  ads = randomize(intercept.init_adapters(jax.random.key(1), fn, qparams, RULES, x),
                  jax.random.key(2))
  merged = tree.merge(qparams, ads)  # quantized nodes become float kernels
  assert jax.tree.structure(merged) == jax.tree.structure(dequantized)
  np.testing.assert_allclose(model.apply({"params": merged}, x),
                             model.apply({"params": tree.merge(dequantized, ads)}, x),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.apply({"params": merged}, x),
                             intercept.apply(fn, qparams, ads, x), rtol=1e-4, atol=1e-5)


def test_peft_export_import_and_checkpoint_on_a_quantized_base(tmp_path):
  """Adapters trained on a quantized base export, import and checkpoint as on a float
  base; the quantized base itself is never written."""
  from sdslora_jax import checkpoint, peft
  model, fn, qparams, dequantized, x = _quantized("int4", 8)
  ads = randomize(intercept.init_adapters(jax.random.key(1), fn, qparams, RULES, x),
                  jax.random.key(2))
  names = {"Dense_0/kernel": "fc1", "Dense_1/kernel": "fc2"}
  peft.export_peft(tmp_path / "peft", ads, module_names=names)
  imported = peft.import_peft(tmp_path / "peft", qparams, module_names=names)
  assert imported["Dense_0"]["kernel"].method == "lora"
  np.testing.assert_allclose(intercept.apply(fn, qparams, imported, x),
                             intercept.apply(fn, qparams, ads, x), rtol=1e-5, atol=1e-5)
  before = jax.tree.map(np.asarray, qparams)
  checkpoint.save_adapters(tmp_path / "ck", ads)
  restored = checkpoint.restore_adapters(tmp_path / "ck", ads)
  np.testing.assert_array_equal(intercept.apply(fn, qparams, restored, x),
                                intercept.apply(fn, qparams, ads, x))
  written = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
  adapter_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(ads))
  assert written < 4 * adapter_bytes + 65536  # the adapters and metadata, no base
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(u, v)


def test_scanned_quantized_stack_dequantizes_per_layer_in_blocks():
  """A layer stack stored quantized and sliced by ``lax.scan`` (as ``nn.scan`` does):
  per-layer adapters; the float stack and a float layer never appear in the step."""
  stack = random_normal(jax.random.key(0), (3, 16, 32)) / 4
  qa = qwix.quantize(stack, "int8", channelwise_axes=[0, 2])
  params = {"w": qa}

  def fn(p, x):
    def layer(h, q):
      return jnp.tanh(h @ qwix.dequantize(q))[:, :16], None
    return lax.scan(layer, x, p["w"])[0]

  x = random_normal(jax.random.key(1), (4, 16))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w", rank=4)], x)
  assert ads["w"].layer_axes == (0,) and ads["w"].kernel_shape == (3, 16, 32)
  ads = randomize(ads, jax.random.key(3))
  dense = {"w": qwix.dequantize(qa)}
  np.testing.assert_allclose(intercept.apply(fn, params, ads, x),
                             _dense_scan(tree.merge(dense, ads)["w"], x), rtol=1e-5, atol=1e-5)
  step = lambda a: jax.grad(lambda a: jnp.sum(intercept.apply(fn, params, a, x) ** 2))(a)
  ref = jax.grad(lambda a: jnp.sum(_dense_scan(tree.merge(dense, a)["w"], x) ** 2))(ads)
  for u, v in zip(jax.tree.leaves(step(ads)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
  floats = [a.shape for a in _walk_avals(jax.make_jaxpr(step)(ads).jaxpr)
            if jnp.issubdtype(a.dtype, jnp.floating) and a.shape[-2:] == (16, 32)]
  assert floats == []


def _dense_scan(w, x):
  return lax.scan(lambda h, k: (jnp.tanh(h @ k)[:, :16], None), x, w)[0]


def test_unreadable_quantized_type_is_refused_by_name():
  qa = qwix.quantize(random_normal(jax.random.key(0), (16, 32)), "int8",
                     channelwise_axes=[1])
  odd = dataclasses.replace(qa, qtype="mxfp4")
  fn = lambda p, x: x @ p["w"].qvalue.astype(jnp.float32)
  with pytest.raises(intercept.OpLevelError, match=r"'w' is quantized as 'mxfp4'"):
    intercept.init_adapters(jax.random.key(0), fn, {"w": odd}, [rule("w", rank=4)],
                            jnp.ones((2, 16)))
