"""Tests of the baselines: Riemannian-preconditioned LoRA and LoRA+."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sdslora_jax as sl
from sdslora_jax.optim import (
    factor_labels,
    loraplus,
    scale_by_riemannian_lora,
)
from testing_utils import random_normal


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  lora = sl.Adapter(
      a=random_normal(k[0], (9, 3)), b=random_normal(k[1], (3, 7)), method="lora", scale=2.0
  )
  sds = sl.init_adapter(k[2], 7, 5, rank=2, scale=1.0, method="sds", sds_on=True)
  sds = sl.Adapter(a=sds.a, b=random_normal(k[3], (2, 5)), qa=sds.qa, qb=sds.qb,
                   sds_on=sds.sds_on, method="sds", scale=1.0)
  return {"lora": lora, "sds": sds, "head": random_normal(k[4], (5,))}


def test_riemannian_preconditioner_formula():
  params = _params()
  grads = jax.tree.map(lambda v: jnp.ones_like(v) * 0.3, params)
  damping = 1e-3
  tx = scale_by_riemannian_lora(damping)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert isinstance(state, optax.EmptyState)
  for name in ("lora", "sds"):
    p, g, o = params[name], grads[name], out[name]
    r = p.a.shape[1]
    want_a = g.a @ np.linalg.inv(p.b @ p.b.T + damping * np.eye(r))
    want_b = np.linalg.inv(p.a.T @ p.a + damping * np.eye(r)) @ g.b
    np.testing.assert_allclose(o.a, want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(o.b, want_b, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_equal(out["head"], grads["head"])
  chex.assert_trees_all_equal(
      (out["sds"].qa, out["sds"].sds_on), (grads["sds"].qa, grads["sds"].sds_on)
  )


def test_riemannian_preconditioner_at_lora_init_is_finite():
  ad = sl.init_adapter(jax.random.key(0), 8, 6, rank=2, scale=1.0, method="lora")  # b = 0
  g = jax.tree.map(jnp.ones_like, ad)
  out, _ = scale_by_riemannian_lora().update(g, optax.EmptyState(), ad)
  assert jnp.all(jnp.isfinite(out.a)) and jnp.all(jnp.isfinite(out.b))


def test_riemannian_validation():
  with pytest.raises(ValueError):
    scale_by_riemannian_lora(0.0)
  with pytest.raises(ValueError):
    scale_by_riemannian_lora(-1.0)
  params = _params()
  with pytest.raises(ValueError, match="params"):
    scale_by_riemannian_lora().update(params, optax.EmptyState())


def test_factor_labels():
  params = _params()
  labels = factor_labels(params)
  assert (labels["lora"].a, labels["lora"].b, labels["lora"].qa) == ("a", "b", None)
  assert (labels["sds"].qa, labels["sds"].qb, labels["sds"].sds_on) == ("frozen",) * 3
  assert labels["head"] == "other"
  masked = {"x": optax.MaskedNode(), "y": jnp.ones(2)}
  assert factor_labels(masked) == {"x": optax.MaskedNode(), "y": "other"}


def test_loraplus_ratio_and_frozen_bases():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  sched = optax.linear_schedule(0.1, 0.0, 10)
  tx = loraplus(sched, ratio=4.0, optimizer=optax.sgd)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["lora"].a, -0.1 * grads["lora"].a, rtol=1e-6)
  np.testing.assert_allclose(u["lora"].b, -0.4 * grads["lora"].b, rtol=1e-6)
  np.testing.assert_allclose(u["head"], -0.1 * grads["head"], rtol=1e-6)
  assert not jnp.any(u["sds"].qa) and not jnp.any(u["sds"].sds_on)
  tx = loraplus(1e-3)  # adamw, ratio 16: b moves 16x as far as a on the first step
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(jnp.abs(u["lora"].b).max() / jnp.abs(u["lora"].a).max(), 16.0,
                             rtol=1e-2)


def test_loraplus_validation():
  for bad in (0.0, -2.0, True):
    with pytest.raises(ValueError):
      loraplus(1e-3, ratio=bad)
