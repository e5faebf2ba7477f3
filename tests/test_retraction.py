"""The rank-r retraction refresh (``retraction.retract``) against dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from sdslora_jax.retraction import retract

D_IN, D_OUT, R = 40, 30, 4


def _orth(rng, d, r):
  return np.linalg.qr(rng.normal(size=(d, r)))[0]


def _state(seed):
  """Bases, factors spanned by them (a refreshed adapter) and a step off the subspaces."""
  rng = np.random.default_rng(seed)
  qa, qb = _orth(rng, D_IN, R), _orth(rng, D_OUT, R)
  a0, b0 = qa @ rng.normal(size=(R, R)), rng.normal(size=(R, R)) @ qb.T
  da, db = 0.05 * rng.normal(size=a0.shape), 0.05 * rng.normal(size=b0.shape)
  return qa, qb, a0, b0, a0 + da, b0 + db


@pytest.mark.parametrize("method", ["gram", "householder"])
def test_identity_when_the_step_stays_in_the_subspaces(method):
  """Factors spanned by the bases: the retraction gives them and the bases back."""
  qa, qb, a0, b0, _, _ = _state(0)
  for got, want in zip(retract(a0, b0, qa, qb, method=method), (a0, b0, qa, qb)):
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-6)


@pytest.mark.parametrize("method", ["gram", "householder"])
@pytest.mark.parametrize("seed", [0, 1])
def test_best_rank_r_update_closest_bases_and_factors(method, seed):
  qa, qb, _, _, a1, b1 = _state(seed)
  a2, b2, qa2, qb2 = map(np.asarray, retract(a1, b1, qa, qb, method=method))
  # 1. The update is the best rank-r approximation (Eckart-Young) of the step's update.
  u, s, vt = np.linalg.svd(qa @ b1 + a1 @ qb.T)
  assert s[R] > 1e-2  # the step left the rank-r matrices: there is something to discard
  np.testing.assert_allclose(qa2 @ b2 + a2 @ qb2.T, (u[:, :R] * s[:R]) @ vt[:R], atol=3e-6)
  # 2. Orthonormal bases of the top singular subspaces, the ones closest to the old bases.
  np.testing.assert_allclose(qa2.T @ qa2, np.eye(R), atol=2e-6)
  np.testing.assert_allclose(qb2.T @ qb2, np.eye(R), atol=2e-6)
  oa, _ = orthogonal_procrustes(u[:, :R], qa)
  ob, _ = orthogonal_procrustes(vt[:R].T, qb)
  np.testing.assert_allclose(qa2, u[:, :R] @ oa, atol=3e-6)
  np.testing.assert_allclose(qb2, vt[:R].T @ ob, atol=3e-6)
  # 3. Factors in the bases' spans, split X + Y = C closest to the optimizer's factors.
  np.testing.assert_allclose(qa2 @ (qa2.T @ a2), a2, atol=2e-6)
  np.testing.assert_allclose((b2 @ qb2) @ qb2.T, b2, atol=2e-6)
  x, y = qa2.T @ a2, b2 @ qb2
  c = x + y
  grid = np.linspace(-1.0, 1.0, 5)
  best = np.sum((qa2 @ x - a1) ** 2) + np.sum((y @ qb2.T - b1) ** 2)
  rng = np.random.default_rng(seed + 10)
  for t in grid:  # moving mass between X and Y only increases the distance
    e = t * rng.normal(size=(R, R))
    d = np.sum((qa2 @ (x + e) - a1) ** 2) + np.sum(((c - x - e) @ qb2.T - b1) ** 2)
    assert d >= best - 1e-5


def test_batched_equals_one_by_one_and_float32_out():
  states = [_state(k) for k in range(3)]
  stacked = [np.stack([st[i] for st in states]) for i in (4, 5, 0, 1)]
  got = retract(*stacked)
  assert all(g.dtype == jnp.float32 for g in got)
  for k, st in enumerate(states):
    one = retract(st[4], st[5], st[0], st[1])
    for g, o in zip(got, one):
      np.testing.assert_allclose(np.asarray(g[k]), np.asarray(o), atol=1e-6)


def test_rank_deficient_update_stays_finite():
  """A step of lower rank than r (here zero) and a zero factor: finite, function kept."""
  qa, qb, a0, b0, _, _ = _state(2)
  b0 = b0.at[:].set(0.0) if isinstance(b0, jax.Array) else np.zeros_like(b0)
  a2, b2, qa2, qb2 = map(np.asarray, jax.jit(retract)(a0, b0, qa, qb))
  assert np.all(np.isfinite(a2)) and np.all(np.isfinite(qb2))
  np.testing.assert_allclose(qa2 @ b2 + a2 @ qb2.T, a0 @ qb.T, atol=3e-6)
