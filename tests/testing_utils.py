"""Helpers shared by the tests: random adapters and a jaxpr size checker."""

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp

from sdslora_jax.adapter import Adapter, is_adapter, restamp
from sdslora_jax.basis import factor_bases


def randomize_adapter(ad, key, sds_on=1.0):
  """``ad`` with random factors (unit-scale updates) and, for SDS-LoRA, fresh bases."""
  ka, kb = jax.random.split(key)
  a = jax.random.normal(ka, ad.a.shape) / math.sqrt(ad.a.shape[-2])
  b = jax.random.normal(kb, ad.b.shape) / math.sqrt(ad.b.shape[-2])
  ad = dataclasses.replace(ad, a=a, b=b)
  if ad.method == "sds":
    bases, stamp = factor_bases, lambda x: restamp(x).stamp
    for _ in ad.stacked_axes:  # one basis per layer of a stacked adapter
      bases = jax.vmap(bases)
    qa, qb = bases(a, b)
    ad = dataclasses.replace(ad, qa=qa, qb=qb,
                             sds_on=jnp.full(ad.layer_shape, sds_on, jnp.float32))
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[len(ad.stacked_axes):]), ad)
    stamps = jax.vmap(stamp)(flat) if ad.stacked_axes else stamp(ad)
    ad = dataclasses.replace(ad, stamp=jnp.reshape(stamps, ad.layer_shape))
  return ad


def randomize(adapters, key, sds_on=1.0):
  """``randomize_adapter`` on every adapter of a tree."""
  leaves, treedef = jax.tree.flatten(adapters, is_leaf=is_adapter)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [randomize_adapter(ad, k, sds_on) for ad, k in zip(leaves, keys)]
  )


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
  a = jax.random.normal(ka, (d_in, rank))
  b = jax.random.normal(kb, (rank, d_out))
  extra = {}
  if method == "sds":
    qa, qb = factor_bases(a, b)
    if stale_bases:
      qa = qa + 0.1 * jax.random.normal(kb, qa.shape)
    extra = dict(qa=qa, qb=qb, sds_on=jnp.float32(sds_on))
  return Adapter(a=a, b=b, method=method, scale=scale, kernel_shape=tuple(shape),
                 in_axes=tuple(in_axes), kind=kind, **extra)
