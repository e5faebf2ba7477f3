"""Helpers shared by the tests: random adapters and a jaxpr size checker."""

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from sdslora_jax.adapter import Adapter, is_adapter, per_layer, restamp
from sdslora_jax.basis import factor_bases


def random_normal(key, shape, dtype=jnp.float32):
  """Standard normal test data, drawn by NumPy from the bits of ``key``.

  The role of ``jax.random.normal`` in a test's set-up, without its XLA
  program: called eagerly, ``jax.random.normal`` compiles one per new shape
  (about 0.2 s each at the tests' optimisation level; the suite drew some 250
  shapes). Different keys give different draws. Under a trace (a traced key),
  it is ``jax.random.normal``.
  """
  if isinstance(key, jax.core.Tracer):
    return jax.random.normal(key, shape, dtype)
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  draw = np.random.default_rng(np.asarray(key).ravel().tolist()).standard_normal(shape)
  return jnp.asarray(np.asarray(draw, dtype=jnp.dtype(dtype)))


def randomize_adapter(ad, key, sds_on=1.0):
  """``ad`` with random factors (unit-scale updates) and, for SDS-LoRA, fresh bases."""
  ka, kb = jax.random.split(key)
  a = random_normal(ka, ad.a.shape) / math.sqrt(ad.a.shape[-2])
  b = random_normal(kb, ad.b.shape) / math.sqrt(ad.b.shape[-2])
  ad = dataclasses.replace(ad, a=a, b=b)
  if ad.method == "sds":
    # One basis per layer of a stacked adapter; LAPACK QR: a tenth of the Gram QR's compile
    # time for each new shape, the same bases up to rounding (the Gram QR is tested on its own).
    qa, qb = per_layer(functools.partial(factor_bases, method="householder"), ad)(a, b)
    ad = restamp(dataclasses.replace(ad, qa=qa, qb=qb,
                                     sds_on=jnp.full(ad.layer_shape, sds_on, jnp.float32)))
  return ad


def randomize(adapters, key, sds_on=1.0):
  """``randomize_adapter`` on every adapter of a tree."""
  leaves, treedef = jax.tree.flatten(adapters, is_leaf=is_adapter)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [randomize_adapter(ad, k, sds_on) for ad, k in zip(leaves, keys)]
  )


def assert_bases_consistent(adapter, atol=2e-5):
  """Bases orthonormal and spanning the factors (projection residual ~ 0)."""
  qa, qb = adapter.qa, adapter.qb
  r = qa.shape[1]
  np.testing.assert_allclose(qa.T @ qa, np.eye(r), atol=atol)
  np.testing.assert_allclose(qb.T @ qb, np.eye(r), atol=atol)
  a, bt = adapter.a, adapter.b.T
  res_a = jnp.linalg.norm(a - qa @ (qa.T @ a)) / (jnp.linalg.norm(a) + 1e-30)
  res_b = jnp.linalg.norm(bt - qb @ (qb.T @ bt)) / (jnp.linalg.norm(bt) + 1e-30)
  assert float(res_a) < atol and float(res_b) < atol, (res_a, res_b)


def big_intermediates(jaxpr, min_size):
  """Equation outputs with at least ``min_size`` elements, sub-jaxprs included.

  Returns ``(found, largest)``: a list of ``(primitive, shape)`` and the size of
  the largest output of any equation. Inputs of the jaxpr are not counted.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr or Jaxpr
  found, largest = [], 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = getattr(v.aval, "shape", ())
      size = math.prod(shape)
      largest = max(largest, size)
      if size >= min_size:
        found.append((eqn.primitive.name, shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      sub_found, sub_largest = big_intermediates(sub, min_size)
      found += sub_found
      largest = max(largest, sub_largest)
  return found, largest


def random_adapter(key, shape, in_axes, *, method="sds", sds_on=1.0, rank=2, scale=0.5,
                   kind=None, stale_bases=False):
  """An adapter for a kernel of ``shape`` with random factors.

  ``stale_bases`` perturbs ``qa`` so that it no longer spans ``a`` exactly (the
  state between two refreshes).
  """
  d_in = math.prod(shape[i] for i in in_axes)
  d_out = math.prod(shape) // d_in
  ka, kb = jax.random.split(key)
  a = random_normal(ka, (d_in, rank))
  b = random_normal(kb, (rank, d_out))
  extra = {}
  if method == "sds":
    qa, qb = factor_bases(a, b, method="householder")
    if stale_bases:
      qa = qa + 0.1 * random_normal(kb, qa.shape)
    extra = dict(qa=qa, qb=qb, sds_on=jnp.float32(sds_on))
  return Adapter(a=a, b=b, method=method, scale=scale, kernel_shape=tuple(shape),
                 in_axes=tuple(in_axes), kind=kind, **extra)


def linen_mse_step(model, tx, x, target, traces=None):
  """A jitted ``(adapters, opt_state, params) -> (adapters, opt_state, loss)`` MSE step."""
  import optax
  from sdslora_jax import linen as slinen

  @jax.jit
  def step(ads, state, params):
    if traces is not None:
      traces.append(1)
    loss = lambda a: jnp.mean((slinen.apply(model, {"params": params}, a, x) - target) ** 2)
    value, grads = jax.value_and_grad(loss)(ads)
    updates, state = tx.update(grads, state, ads)
    return optax.apply_updates(ads, updates), state, value

  return step


def nnx_mse_step(x, target, traces=None):
  """An ``nnx.jit`` ``(model, optimizer) -> loss`` MSE step over the adapter state."""
  from flax import nnx
  from sdslora_jax import nnx as snnx

  @nnx.jit
  def step(model, opt):
    if traces is not None:
      traces.append(1)
    loss = lambda m: jnp.mean((m(x) - target) ** 2)
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, snnx.AdapterVariable))(model)
    opt.update(model, grads)
    return value

  return step


_ARITHMETIC = ("dot_general", "add", "add_any", "sub", "mul", "reduce_sum")


def kernel_shaped_arithmetic(jaxpr, kernel_shapes):
  """Arithmetic equations whose output is shaped like a targeted kernel, sub-jaxprs included.

  A dense merge forms ``a @ b`` and ``K + dK`` in the kernel's shape; the rank-r
  path never does (casts and transposes of the frozen kernel itself are not
  arithmetic and are not counted). A shape counts when it is a permutation of a
  kernel's shape, of one layer of it, or of its ``(d_in, d_out)`` matrix:
  ``kernel_shapes`` lists those shapes.
  """
  wanted = {tuple(sorted(s)) for s in kernel_shapes}
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = tuple(getattr(v.aval, "shape", ()))
      if eqn.primitive.name in _ARITHMETIC and tuple(sorted(shape)) in wanted:
        found.append((eqn.primitive.name, shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += kernel_shaped_arithmetic(sub, kernel_shapes)
  return found


def adapter_kernel_shapes(adapters):
  """Per-layer kernel shapes and ``(d_in, d_out)`` of every adapter in a tree."""
  out = set()
  for ad in jax.tree.leaves(adapters, is_leaf=is_adapter):
    shape = ad.kernel_shape
    out.add(tuple(d for i, d in enumerate(shape) if i not in ad.layer_axes))
    out.add(tuple(shape))
    out.add(ad.shape)
  return out


def train_adapters(loss, ads, *args, steps=20, lr=3e-2, warmup_steps=5):
  """``steps`` jitted steps of ``sds_lora(adamw(lr), warmup_steps)`` on ``loss(ads, *args)``.

  ``args`` (the frozen base, the batch) are arguments of the jitted step. Returns
  ``(adapters, losses, traces)``; ``traces`` counts the step's traces.
  """
  import optax
  from sdslora_jax.optim import sds_lora

  tx = sds_lora(optax.adamw(lr), warmup_steps=warmup_steps)
  state = tx.init(ads)
  traces = []

  @jax.jit
  def step(ads, state, *args):
    traces.append(1)
    value, grads = jax.value_and_grad(loss)(ads, *args)
    updates, state = tx.update(grads, state, ads)
    return optax.apply_updates(ads, updates), state, value

  losses = []
  for _ in range(steps):
    ads, state, value = step(ads, state, *args)
    losses.append(float(value))
  return ads, losses, traces
