"""Adapted layers under remat policies save what the policy saves for the layer, plus rank-r values.

Evidence is XLA's ``memory_analysis()`` of the compiled gradient, against the dense
reference (the same function with the update merged into the kernel, differentiated by
autodiff) under the same policy. What a policy saves per layer shows as the growth of the
temporary memory with the number of layers: going from 2 to 4 layers, the adapted
gradient may grow by what the reference grows plus the adapters' rank-r residuals, and no
more. (Before the adapter's up-projection was written as a batched ``dot_general``,
``dots_with_no_batch_dims_saveable`` saved that activation-sized output too: one more
activation per layer.) Compile-only: nothing runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import sdslora_jax as sl
import sdslora_jax.linen as sl_linen
from sdslora_jax import tree
from sdslora_jax.targets import rule
from testing_utils import random_normal, randomize

D, TOKENS, RANK = 128, 512, 4
ACT = TOKENS * D * 4  # one float32 activation, bytes
POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_only_these_names": jax.checkpoint_policies.save_only_these_names("pre_activation"),
}


def _temp(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _rank_r_allowance(layers: int) -> int:
  """Per layer: the rank-r projections an adapter may keep (``x @ a``, and the SDS pair)."""
  return layers * 2 * TOKENS * 2 * RANK * 4


def _op_stack_temps(method: str, policy, layers: int) -> tuple[int, int]:
  """Temporary bytes of the adapters' gradient: ours, and the dense reference's."""
  keys = jax.random.split(jax.random.key(0), 2 * layers + 1)
  kernels = [random_normal(keys[i], (D, D)) / D**0.5 for i in range(layers)]
  x = random_normal(keys[-1], (TOKENS, D))
  extra = {"sds_on": True} if method == "sds" else {}
  adapters = randomize([sl.init_adapter(keys[layers + i], D, D, rank=RANK, scale=1.0,
                                        method=method, **extra) for i in range(layers)],
                       jax.random.key(1))

  def layer(h, kernel, adapter, dense):
    if dense:
      y = h @ (kernel + sl.adapter.matrix_delta(adapter))
    else:
      y = h @ kernel + sl.adapter_matmul(h, adapter)
    return jax.nn.gelu(checkpoint_name(y, "pre_activation"))

  def loss(ads, x, dense):
    f = jax.checkpoint(lambda h, k, a: layer(h, k, a, dense), policy=policy)
    h = x
    for kernel, adapter in zip(kernels, ads):
      h = f(h, kernel, adapter)
    return jnp.mean(h**2)

  ours = _temp(jax.grad(lambda a, x: loss(a, x, False)), adapters, x)
  dense = _temp(jax.grad(lambda a, x: loss(a, x, True)), adapters, x)
  return ours, dense


@pytest.mark.parametrize("method", ["lora", "sds"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_adapted_layers_under_jax_checkpoint_save_only_what_the_policy_saves(policy, method):
  ours2, dense2 = _op_stack_temps(method, POLICIES[policy], 2)
  ours4, dense4 = _op_stack_temps(method, POLICIES[policy], 4)
  # Per layer: no more than the dense reference saves, plus rank-r residuals.
  assert ours4 - ours2 <= (dense4 - dense2) + _rank_r_allowance(2), (ours2, ours4, dense2, dense4)
  # Whatever the depth: at most one activation of working memory above the reference (the
  # input cotangent's two summands, base and adapter, are both live at their sum; README,
  # "Where the time and memory go").
  assert ours4 <= dense4 + ACT + _rank_r_allowance(4), (ours4, dense4)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h):
    y = nn.Dense(D, use_bias=False)(h)
    return jax.nn.gelu(checkpoint_name(y, "pre_activation"))


class _Stack(nn.Module):
  layers: int
  policy_name: str

  @nn.compact
  def __call__(self, h):
    block = nn.remat(_Block, policy=POLICIES[self.policy_name])
    for _ in range(self.layers):
      h = block()(h)
    return h


def _linen_temps(method: str, policy_name: str, layers: int) -> tuple[int, int]:
  model = _Stack(layers, policy_name)
  x = random_normal(jax.random.key(2), (TOKENS, D))
  params = model.init(jax.random.key(3), x)["params"]
  extra = {"sds_on": True} if method == "sds" else {}
  adapters = sl_linen.init_adapters(jax.random.key(4), model, params,
                              [rule(r".*kernel", rank=RANK, method=method)], x, **extra)
  adapters = randomize(adapters, jax.random.key(5))

  def ours(a, x):
    return jnp.mean(sl_linen.apply(model, {"params": params}, a, x) ** 2)

  def dense(a, x):
    return jnp.mean(model.apply({"params": tree.merge(params, a)}, x) ** 2)

  return _temp(jax.grad(ours), adapters, x), _temp(jax.grad(dense), adapters, x)


@pytest.mark.parametrize("method", ["lora", "sds"])
def test_linen_remat_with_the_dots_policy_saves_no_adapter_activation(method):
  """``nn.remat(policy=dots_with_no_batch_dims_saveable)``, adapters added by ``sl_linen.apply``."""
  name = "dots_with_no_batch_dims_saveable"
  ours2, dense2 = _linen_temps(method, name, 2)
  ours4, dense4 = _linen_temps(method, name, 4)
  assert ours4 - ours2 <= (dense4 - dense2) + _rank_r_allowance(2), (ours2, ours4, dense2, dense4)
  assert ours4 <= dense4 + ACT + _rank_r_allowance(4), (ours4, dense4)
