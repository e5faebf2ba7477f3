"""Where the library relies on another library's internals: one test each, failing when they change."""

import jax.numpy as jnp
import optax

from sdslora_jax.optim import state_reset


def test_the_second_moment_fields_are_named_as_optax_names_them():
  # At the switch, state_reset keeps second moments by field name when the step count
  # next to them continues (see its docstring): optax's Adam and AMSGrad states.
  assert state_reset._SECOND_MOMENTS == {"nu", "nu_max"}
  params = {"w": jnp.zeros(3)}
  adam = optax.adamw(1e-3).init(params)[0]
  amsgrad = optax.amsgrad(1e-3).init(params)[0]
  assert type(adam).__name__ == "ScaleByAdamState" and "nu" in adam._fields
  assert type(amsgrad).__name__ == "ScaleByAmsgradState" and "nu_max" in amsgrad._fields
  # No other per-parameter second-moment field in these states escapes the rule.
  assert {f for f in adam._fields + amsgrad._fields if f.startswith("nu")} == {"nu", "nu_max"}


def test_flax_linen_keeps_its_method_interceptors_on_a_stack():
  # sdslora_jax.linen merges a layer's update into its kernel only when its own method
  # interceptor is the only one active (qwix's quantization providers are interceptors
  # and would quantize the merged update with the kernel). `linen._plain` reads Flax's
  # interceptor stack: one entry per active `nn.intercept_methods`.
  import flax.linen as nn
  from flax.linen import module as linen_module

  import sdslora_jax.linen as sl_linen

  stack = linen_module._global_interceptor_stack
  variables = {"params": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  seen = []

  def record(next_fun, args, kwargs, context):
    seen.append((len(stack), sl_linen._plain(context.module)))
    return next_fun(*args, **kwargs)

  def outer(next_fun, args, kwargs, context):
    return next_fun(*args, **kwargs)

  assert len(stack) == 0
  with nn.intercept_methods(record):
    nn.Dense(4).apply(variables, jnp.ones((2, 3)))
  with nn.intercept_methods(outer), nn.intercept_methods(record):
    nn.Dense(4).apply(variables, jnp.ones((2, 3)))
  assert len(stack) == 0
  # Alone: the Dense may be merged; under another interceptor: not.
  assert set(seen) == {(1, True), (2, False)}
