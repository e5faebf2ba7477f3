"""The op-level path on a frozen base quantized by qwix (int8, int4, nf4), weight-only.

qwix's PTQ model dequantizes each kernel inside its own computation (codes, then
scale, then the kernel's float value into the dot_general); the op-level path follows
that chain and adds the adapter at the op. The reference is the float model on the
dequantized weights with the dense update merged in (``tree.merge``), differentiated
by autodiff.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from sdslora_jax import intercept, tree
from sdslora_jax.targets import rule
from testing_utils import randomize, train_adapters

RULES = [rule(r"Dense_\d/kernel", method="sds", rank=4)]


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, use_bias=False)(nn.relu(nn.Dense(32, use_bias=False)(x)))


def _quantized(qtype, tile):
  model = Mlp()
  x = jax.random.normal(jax.random.key(5), (8, 16))
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
  np.testing.assert_array_equal(
      jax.jit(lambda p, a: intercept.apply(fn, p, a, x))(qparams, ads), jax.jit(fn)(qparams, x))
  ads = randomize(ads, jax.random.key(2))
  got = jax.jit(lambda p, a: intercept.apply(fn, p, a, x))(qparams, ads)
  want = model.apply({"params": tree.merge(dequantized, ads)}, x)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
  g_ops = jax.grad(lambda a: jnp.sum(jnp.sin(intercept.apply(fn, qparams, a, x))))(ads)
  g_ref = jax.grad(lambda a: jnp.sum(jnp.sin(model.apply({"params": tree.merge(dequantized, a)},
                                                          x))))(ads)
  for u, v in zip(jax.tree.leaves(g_ops), jax.tree.leaves(g_ref)):
    if np.linalg.norm(np.asarray(v)) > 0:
      assert float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v)) < 1e-5


def test_quantized_base_trains_through_the_switch_in_one_trace():
  _, fn, qparams, _, x = _quantized("nf4", 8)
  target = jnp.sin(jax.random.normal(jax.random.key(7), (8, 64)))
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
