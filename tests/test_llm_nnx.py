"""The op-level path on an NNX Llama written the way tunix writes it (``nnx_llama``).

Its weights are called ``w`` and ``input_embedding`` as well as ``kernel``; the
model is not edited. ``sdslora_jax.nnx.adapt_ops`` wraps it and
``nnx.Optimizer(..., wrt=AdapterVariable)`` trains the adapters.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_llama
from sdslora_jax import fused, intercept, sharding, tree
from sdslora_jax import nnx as snnx
from sdslora_jax.optim import sds_lora
from sdslora_jax.targets import rule
from testing_utils import adapter_kernel_shapes, kernel_shaped_arithmetic

# The outside-LLM tests: in `make test` (CI), left out of `make test-library`.
pytestmark = pytest.mark.llm

RULES = [rule(r"layers/(\d+/)?attn/(q|k|v|o)_proj/w", method="sds", rank=4),
         rule(r"layers/(\d+/)?mlp/(gate|up|down)_proj/kernel", method="sds", rank=4),
         rule("embedder/input_embedding", method="lora", rank=4)]
IDS = (jnp.arange(15).reshape(3, 5) * 7) % 64  # (3, 5): no activation is shaped like a kernel
TARGET = (IDS + 1) % 64


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:n])


def _build(mesh, scan):
  with jax.set_mesh(mesh):
    model = nnx_llama.Llama(nnx_llama.Config(scan=scan), rngs=nnx.Rngs(0))
    base_out = nnx.jit(lambda m, ids: m(ids))(model, IDS)
    adapted = snnx.adapt_ops(model, RULES, IDS, key=jax.random.key(1))
    # Adapter shardings from the model's own partitioning (its out_sharding names).
    shards = sharding.adapter_shardings(adapted.adapter_tree(), nnx.state(model, nnx.Param),
                                        mesh=mesh)
    for keys, sh in tree.adapter_items(shards):
      var = adapted.adapters["/".join(map(str, keys))]
      var.set_value(jax.device_put(var.get_value(), sh))
    opt = nnx.Optimizer(adapted, sds_lora(optax.adamw(1e-2), warmup_steps=5),
                        wrt=snnx.AdapterVariable)
  return model, adapted, opt, base_out


def _step(traces):
  @nnx.jit
  def step(model, opt):
    traces.append(1)
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(IDS), TARGET).mean()
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, snnx.AdapterVariable))(model)
    opt.update(model, grads)
    return value

  return step


@pytest.mark.parametrize("scan", [False, True])
def test_llama_init_train_merge(scan):
  mesh = _mesh((1, 1))
  model, adapted, opt, base_out = _build(mesh, scan)
  fn, pure, _ = snnx.as_function(model)
  layouts = intercept.layouts(fn, pure, RULES, IDS)
  q = next(v for k, v in layouts.items() if k.endswith("q_proj/w"))
  assert q.in_axes == (1,) if scan else (0,)  # (D, N, H), layers stacked in front with scan
  assert layouts["embedder/input_embedding"].kind == "embed"
  with jax.set_mesh(mesh):
    # Exactly the base at init (both compiled: XLA fuses eager and jitted code differently).
    np.testing.assert_array_equal(nnx.jit(lambda m, ids: m(ids))(adapted, IDS), base_out)
    traces = []
    step = _step(traces)
    losses = [float(step(adapted, opt)) for _ in range(20)]
    assert len(traces) == 1
    assert losses[-1] < 0.5 * losses[0]
    ads = adapted.adapter_tree()
    q_ad = ads["layers"]["attn"]["q_proj"]["w"] if scan else ads["layers"][0]["attn"]["q_proj"]["w"]
    assert float(jnp.min(q_ad.sds_on)) == 1.0  # switched to SDS-LoRA
    if scan:
      assert q_ad.a.shape == (2, 32, 4)  # one adapter per layer
    got = adapted(IDS)
    want = adapted.merged()(IDS)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5


def test_llama_step_has_no_kernel_sized_array():
  """No kernel-shaped product or sum in the step beyond the frozen model's (rank-r path)."""
  mesh = _mesh((1, 1))
  model, adapted, _, _ = _build(mesh, False)
  fn, pure, _ = snnx.as_function(model)
  ads = adapted.adapter_tree()
  shapes = adapter_kernel_shapes(ads)
  count = lambda jaxpr: collections.Counter(kernel_shaped_arithmetic(jaxpr, shapes))
  with jax.set_mesh(mesh):
    loss = lambda a, merge: optax.softmax_cross_entropy_with_integer_labels(
        fn(tree.merge(pure, a), IDS) if merge else intercept.apply(fn, pure, a, IDS),
        TARGET).mean()
    frozen = count(jax.make_jaxpr(lambda p: jnp.sum(fn(p, IDS)))(pure))
    with fused.merging("never"):  # the rank-r op (merged ops form K + dK: tests/test_fused.py)
      assert count(jax.make_jaxpr(jax.grad(lambda a: loss(a, False)))(ads)) - frozen == {}
    assert count(jax.make_jaxpr(jax.grad(lambda a: loss(a, True)))(ads)) - frozen  # can fail


def test_llama_sharded_step_equals_single_device():
  results = []
  for shape in ((1, 1), (4, 2)):
    mesh = _mesh(shape)
    _, adapted, opt, _ = _build(mesh, False)
    with jax.set_mesh(mesh):
      step = _step([])
      losses = [float(step(adapted, opt)) for _ in range(8)]  # through the switch (warm-up 5)
      ads = adapted.adapter_tree()
      if shape != (1, 1):
        a = ads["layers"][0]["mlp"]["up_proj"]["kernel"].a
        assert a.sharding.spec[0] == "fsdp"  # down factor sharded like the kernel's input side
      results.append((losses, jax.device_get(ads)))
  (l1, a1), (l8, a8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for (keys, x), (_, y) in zip(tree.adapter_items(a8), tree.adapter_items(a1)):
    for f in ("a", "b", "qa", "qb", "sds_on"):  # stamps hash bits: equal only bit for bit
      if getattr(x, f) is not None:
        np.testing.assert_allclose(getattr(x, f), getattr(y, f), rtol=2e-3, atol=2e-5,
                                   err_msg=f"{keys} {f}")


def test_norm_scale_in_rules_is_refused():
  mesh = _mesh((1, 1))
  with jax.set_mesh(mesh):
    model = nnx_llama.Llama(nnx_llama.Config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers/0/input_layernorm/w"):
      snnx.adapt_ops(model, [rule(r".*layernorm/w", rank=1)], IDS, key=jax.random.key(0))
