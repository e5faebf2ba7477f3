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
