"""The op-level path (``sdslora_jax.intercept``) against the dense reference.

The reference is ``fn(tree.merge(params, adapters))``: the naive dense update
folded into every kernel, differentiated by autodiff (``matrix_delta`` keeps the
bases constant, so its gradients are SDS-LoRA's). The op-level path must give the
same outputs and gradients without forming a kernel-sized array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdslora_jax import fused, intercept, tree
from sdslora_jax.targets import rule
from testing_utils import big_intermediates, random_normal, randomize, train_adapters


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def _check_against_merge(fn, params, adapters, *args, tol=1e-5):
  """Forward and adapter gradients of the op-level path equal the dense reference."""
  got = jax.jit(lambda p, a, *x: intercept.apply(fn, p, a, *x))(params, adapters, *args)
  want = jax.jit(lambda p, a, *x: fn(tree.merge(p, a), *x))(params, adapters, *args)
  assert _rel(got, want) < tol

  def loss(a, via_ops):
    y = intercept.apply(fn, params, a, *args) if via_ops else fn(tree.merge(params, a), *args)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  g_ops = jax.jit(jax.grad(lambda a: loss(a, True)))(adapters)
  g_ref = jax.jit(jax.grad(lambda a: loss(a, False)))(adapters)
  for (path, g1), g2 in zip(jax.tree_util.tree_flatten_with_path(g_ops)[0],
                            jax.tree.leaves(g_ref)):
    assert g1.shape == g2.shape
    if np.linalg.norm(np.asarray(g2)) > 0:
      assert _rel(g1, g2) < 10 * tol, jax.tree_util.keystr(path)


# --- the ops a weight can meet --------------------------------------------------------


def _ops_fn(p, x, ids):
  h = jnp.einsum("btd,dnh->btnh", x, p["wq"])                 # einsum, two output axes
  h = h.reshape(h.shape[:2] + (-1,))
  h = jnp.tanh(h @ p["mlp"]["up"])                            # @
  h = jax.lax.dot_general(p["mlp"]["down"], h, (((0,), (2,)), ((), ())))  # weight on the lhs
  h = jnp.moveaxis(h, 0, -1)
  h = h + jnp.take(p["emb"], ids, axis=0)                      # embedding lookup
  z = jnp.dot(h, p["emb"].T)                                   # tied logits: transposed use
  w = jnp.transpose(p["wo"], (0, 2, 1)).reshape(12, 8)         # transposes and merges followed
  return z + jnp.sum(h @ w, axis=-1, keepdims=True)


def _ops_params():
  k = jax.random.split(jax.random.key(0), 5)
  return {"wq": random_normal(k[0], (16, 2, 8)) / 4,
          "mlp": {"up": random_normal(k[1], (16, 24)) / 4,
                  "down": random_normal(k[2], (24, 12)) / 5},
          "emb": random_normal(k[3], (30, 12)),
          "wo": random_normal(k[4], (12, 2, 4)) / 3}


@pytest.mark.parametrize("method", ["sds", "lora"])
def test_every_supported_op_matches_dense_reference(method):
  params = _ops_params()
  x = random_normal(jax.random.key(1), (2, 5, 16))
  ids = jnp.array([[1, 2, 3, 4, 29], [0, 7, 7, 8, 9]])
  rules = [rule(r"wq|mlp/up|mlp/down|emb|wo", method=method, rank=3)]
  lay = intercept.layouts(_ops_fn, params, rules, x, ids)
  assert lay["wq"].in_axes == (0,) and lay["wq"].out_axes == (1, 2)
  assert lay["mlp/down"].in_axes == (0,)
  assert lay["emb"].kind == "embed" and lay["emb"].in_axes == (0,)
  ads = intercept.init_adapters(jax.random.key(2), _ops_fn, params, rules, x, ids)
  # At init the adapted function is the base function, bit for bit.
  np.testing.assert_array_equal(jax.jit(lambda p, a: intercept.apply(_ops_fn, p, a, x, ids))(
      params, ads), jax.jit(_ops_fn)(params, x, ids))
  ads = randomize(ads, jax.random.key(3))
  _check_against_merge(_ops_fn, params, ads, x, ids)


def test_batched_weight_gets_one_adapter_per_batch_index():
  # A weight whose leading axis is a dot_general batch axis (per-head or per-expert).
  params = {"experts": random_normal(jax.random.key(0), (3, 16, 8)) / 4}
  fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["experts"])
  x = random_normal(jax.random.key(1), (3, 4, 16))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("experts", rank=2)], x)
  assert ads["experts"].layer_axes == (0,) and ads["experts"].a.shape == (3, 16, 2)
  _check_against_merge(fn, params, randomize(ads, jax.random.key(3)), x)


# --- scanned layers on any axis, remat ----------------------------------------------------


def _scanned(layer_axis, remat):
  def fn(p, x):
    def body(h, w):
      w1, w2 = w
      return h + jnp.tanh(h @ w1) @ w2, None

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable) if remat else body
    w1 = jnp.moveaxis(p["w1"], layer_axis, 0)
    w2 = jnp.moveaxis(p["w2"], layer_axis, 0)
    return jax.lax.scan(body, x, (w1, w2))[0]

  shape1 = [16, 32]
  shape1.insert(layer_axis, 3)
  shape2 = [32, 16]
  shape2.insert(layer_axis, 3)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": random_normal(k1, shape1) / 4, "w2": random_normal(k2, shape2) / 6}
  return fn, params


@pytest.mark.parametrize("layer_axis,remat", [(0, False), (1, True), (2, False)])
def test_scanned_layers_on_any_axis_get_their_own_adapters(layer_axis, remat):
  fn, params = _scanned(layer_axis, remat)
  x = random_normal(jax.random.key(1), (4, 16))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w1|w2", rank=4)], x)
  assert ads["w1"].layer_axes == (layer_axis,) and ads["w1"].a.shape == (3, 16, 4)
  ads = randomize(ads, jax.random.key(3))
  _check_against_merge(fn, params, ads, x)
  # Layers differ: the merged kernel of each layer has its own update.
  delta = np.asarray(tree.merge(params, ads)["w1"] - params["w1"])
  d0, d1 = np.take(delta, 0, axis=layer_axis), np.take(delta, 1, axis=layer_axis)
  assert not np.allclose(d0, d1)


def test_step_holds_no_kernel_sized_array():
  """The rank-r path: an adapted step has no more kernel-sized arrays than the frozen model."""
  d = 256
  params = {"w": random_normal(jax.random.key(0), (d, d)) / 16}
  fn = lambda p, x: jnp.tanh(x @ p["w"].astype(jnp.bfloat16).astype(jnp.float32))
  x = random_normal(jax.random.key(1), (8, d))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w", rank=4)], x)
  size = d * d

  def count(jaxpr):
    return len(big_intermediates(jaxpr, size)[0])

  with fused.merging("never"):  # the rank-r op (a merged op forms K + dK: tests/test_fused.py)
    adapted = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(intercept.apply(fn, params, a, x))))(ads)
  frozen = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(fn(params, x))))(x)
  merged = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(fn(tree.merge(params, a), x))))(ads)
  assert count(adapted) <= count(frozen)
  assert count(merged) > count(frozen)  # the check can fail: a dense merge is caught


def test_trains_through_the_switch_in_one_trace():
  fn, params = _scanned(1, True)
  x = random_normal(jax.random.key(1), (32, 16))
  target = jnp.sin(x)
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w1|w2", rank=4)], x)
  loss = lambda a, params, x: jnp.mean((intercept.apply(fn, params, a, x) - target) ** 2)
  ads, losses, traces = train_adapters(loss, ads, params, x)
  assert len(traces) == 1
  assert float(ads["w1"].sds_on.min()) == 1.0  # every layer switched to SDS-LoRA
  assert losses[-1] < 0.5 * losses[0]


# --- misuse -------------------------------------------------------------------------------


def test_elementwise_use_is_refused_naming_weight_and_op():
  params = {"w": jnp.ones((8, 8)), "scale": jnp.ones((8, 8))}
  fn = lambda p, x: (x @ p["w"]) * jnp.sum(p["scale"] ** 2)
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"'scale'.*`integer_pow`"):
    intercept.init_adapters(jax.random.key(0), fn, params, [rule("w|scale", rank=2)], x)


def test_two_layouts_of_one_weight_are_refused():
  params = {"w": jnp.ones((8, 6, 4))}
  fn = lambda p, x: jnp.einsum("bd,dnh->bnh", x, p["w"]).sum() + jnp.einsum("bn,dnh->bdh",
                                                                           x[:, :6], p["w"]).sum()
  with pytest.raises(ValueError, match=r"'w'.*contracts weight axes \(1,\) here but \(0,\)"):
    intercept.layouts(fn, params, [rule("w", rank=2)], jnp.ones((2, 8)))


def test_unsliced_stack_is_refused_not_shared():
  # A stacked kernel used whole (no scan, no batch axis) would need one adapter per layer;
  # the path refuses instead of sharing one adapter across the layers.
  params = {"w": jnp.ones((3, 8, 8))}
  fn = lambda p, x: sum(x @ p["w"][i] for i in range(3))
  with pytest.raises(ValueError, match=r"'w'.*`slice`"):
    intercept.layouts(fn, params, [rule("w", rank=2)], jnp.ones((2, 8)))


def test_selection_errors():
  params = {"dense": {"w": jnp.ones((8, 8)), "bias": jnp.ones((8,))}}
  fn = lambda p, x: x @ p["dense"]["w"] + p["dense"]["bias"]
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"matches no parameter; nearby paths: 'dense/w'"):
    intercept.init_adapters(jax.random.key(0), fn, params, [rule("dense/kernel")], x)
  with pytest.raises(ValueError, match=r"'dense/bias'.*not a floating weight with at least 2"):
    intercept.init_adapters(jax.random.key(0), fn, params, [rule("dense/.*")], x)
  with pytest.raises(ValueError, match=r"rank 9 exceeds the 8 x 8 matrix of 'dense/w'"):
    intercept.init_adapters(jax.random.key(0), fn, params, [rule("dense/w", rank=9)], x)
  unused = {"w": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}
  with pytest.raises(ValueError, match=r"'v'.*no dot_general, convolution or embedding"):
    intercept.layouts(lambda p, x: x @ p["w"], unused, [rule("w|v")], x)
  ads = intercept.init_adapters(jax.random.key(0), fn, params, [rule("dense/w", rank=2)], x)
  with pytest.raises(ValueError, match=r"shape \(8, 8\), but the parameter there has shape"):
    intercept.apply(fn, {"dense": {"w": jnp.ones((8, 4)), "bias": jnp.ones((4,))}}, ads, x)


def test_conv_is_merged_per_call():
  params = {"k": random_normal(jax.random.key(0), (3, 3, 4, 6)) / 6}
  fn = lambda p, x: jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = random_normal(jax.random.key(1), (2, 5, 5, 4))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("k", rank=2)], x)
  assert ads["k"].kind == "conv" and ads["k"].in_axes == (0, 1, 2)
  _check_against_merge(fn, params, randomize(ads, jax.random.key(3)), x)


def test_checkpoint_round_trip_of_axis_1_stack(tmp_path):
  """Adapters laid out by the op-level path (layers on axis 1) save and restore exactly,
  with and without a target, and the restored ones compute the same function."""
  from sdslora_jax import checkpoint
  fn, params = _scanned(1, False)
  x = random_normal(jax.random.key(1), (4, 16))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w1|w2", rank=4)], x)
  ads = randomize(ads, jax.random.key(3))
  checkpoint.save_adapters(tmp_path / "ck", ads)
  for restored in (checkpoint.restore_adapters(tmp_path / "ck", ads),
                   checkpoint.restore_adapters(tmp_path / "ck")):
    assert restored["w1"].layer_axes == (1,) and restored["w1"].kernel_shape == (16, 3, 32)
    np.testing.assert_array_equal(intercept.apply(fn, params, restored, x),
                                  intercept.apply(fn, params, ads, x))
  with pytest.raises(FileExistsError):
    checkpoint.save_adapters(tmp_path / "ck", ads)


def test_bfloat16_model_matches_reference_within_bfloat16_rounding():
  """A model computing in bfloat16 (weights cast inside, as MaxText and Gemma do): the
  adapted output stays bfloat16 and equals the float32 reference to bfloat16 precision."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": random_normal(k1, (32, 64)) / 6, "w2": random_normal(k2, (64, 32)) / 8}

  def fn(p, x, dtype=jnp.bfloat16):
    h = jnp.tanh(x.astype(dtype) @ p["w1"].astype(dtype))
    return h @ p["w2"].astype(dtype)

  x = random_normal(jax.random.key(1), (8, 32))
  ads = intercept.init_adapters(jax.random.key(2), fn, params, [rule("w1|w2", rank=4)], x)
  ads = randomize(ads, jax.random.key(3))
  got = jax.jit(lambda p, a: intercept.apply(fn, p, a, x))(params, ads)
  assert got.dtype == jnp.bfloat16
  want = jax.jit(lambda a: fn(tree.merge(params, a), x, jnp.float32))(ads)
  assert _rel(got, want) < 2e-2
  g = jax.grad(lambda a: jnp.sum(intercept.apply(fn, params, a, x).astype(jnp.float32)))(ads)
  g_ref = jax.jit(jax.grad(lambda a: jnp.sum(fn(tree.merge(params, a), x, jnp.float32))))(ads)
  assert _rel(g["w1"].a, g_ref["w1"].a) < 5e-2 and _rel(g["w2"].b, g_ref["w2"].b) < 5e-2
