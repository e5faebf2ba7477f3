"""activate_sds: the warm-up-to-SDS reparameterization preserves the update exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdslora_jax as sds
from sdslora_jax.gram_basis import gram_orthonormal_basis
from testing_utils import random_normal


def _rand(seed, shape):
  return random_normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("scale", [0.5, 2.0, 16.0])
@pytest.mark.parametrize("shape", [(32, 4, 24), (8, 8, 8)])
def test_activate_sds_preserves_update_and_bases(scale, shape):
  d_in, r, d_out = shape
  a, b = _rand(0, (d_in, r)), _rand(1, (r, d_out))
  a2, b2, qa, qb = sds.activate_sds(a, b, scale=scale)
  before = np.asarray(a, np.float64) @ np.asarray(b, np.float64) * scale
  after = sds.sds_delta(a2, b2, scale=scale, qa=qa, qb=qb)
  np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())
  np.testing.assert_allclose(qa, sds.orthonormal_basis(a2), atol=1e-5)
  np.testing.assert_allclose(qb, sds.orthonormal_basis(b2.T), atol=1e-5)
  # Balanced: the i-th column of a' and row of b' both have norm S_i / (2 s).
  np.testing.assert_allclose(jnp.linalg.norm(a2, axis=0), jnp.linalg.norm(b2, axis=1), rtol=1e-5)
  s_true = np.linalg.svd(before, compute_uv=False)[:r]
  np.testing.assert_allclose(2 * scale * jnp.linalg.norm(a2, axis=0), s_true, rtol=1e-4)


def test_activate_sds_wrong_coefficient_would_be_caught():
  """The 1/(2s) coefficient is the one that preserves the update (1/sqrt(2s) does not)."""
  a, b, scale = _rand(2, (16, 4)), _rand(3, (4, 16)), 4.0
  a2, b2, qa, qb = sds.activate_sds(a, b, scale=scale)
  ratio = np.sqrt(2 * scale) / (2 * scale)  # factor between the two readings
  wrong = sds.sds_delta(a2 / ratio, b2 / ratio, scale=scale, qa=qa, qb=qb)
  assert not np.allclose(wrong, scale * a @ b, atol=1e-3)


def test_activate_sds_keeps_dtypes_and_handles_zero_b():
  a = _rand(4, (12, 3)).astype(jnp.bfloat16)
  b = jnp.zeros((3, 10), jnp.bfloat16)
  a2, b2, qa, qb = sds.activate_sds(a, b, scale=2.0)
  assert (a2.dtype, b2.dtype, qa.dtype, qb.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32)
  np.testing.assert_array_equal(sds.sds_delta(a2, b2, scale=2.0, qa=qa, qb=qb), 0.0)
  np.testing.assert_allclose(qa.T @ qa, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(qb.T @ qb, np.eye(3), atol=1e-5)


def test_activate_sds_rank_deficient_keeps_the_update_and_orthonormal_bases():
  a = _rand(7, (12, 4))
  b = _rand(8, (4, 10)).at[2:].set(0.0)  # the warm-up moved only two directions
  for method, basis_of in (("gram", gram_orthonormal_basis), ("householder", sds.orthonormal_basis)):
    a2, b2, qa, qb = sds.activate_sds(a, b, scale=2.0, method=method)
    np.testing.assert_allclose(
        sds.sds_delta(a2, b2, scale=2.0, qa=qa, qb=qb), 2.0 * a @ b, atol=1e-5)
    np.testing.assert_allclose(qa.T @ qa, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(qb.T @ qb, np.eye(4), atol=1e-5)
    # The factors lie in the bases' spans (what the rank-r op with fresh bases needs) ...
    np.testing.assert_allclose(qa @ (qa.T @ a2), a2, atol=1e-6)
    np.testing.assert_allclose(qb @ (qb.T @ b2.T), b2.T, atol=1e-6)
    # ... and the two directions the warm-up moved have the bases a refresh computes from
    # the new factors; the other two are zero in a2 / b2 (any orthonormal completion works,
    # and the two methods complete differently).
    np.testing.assert_array_equal(np.asarray(jnp.linalg.norm(a2, axis=0)[2:]), 0.0)
    np.testing.assert_allclose(qa[:, :2], basis_of(a2)[:, :2], atol=1e-6)
    np.testing.assert_allclose(qb[:, :2], basis_of(b2.T)[:, :2], atol=1e-6)


def test_activate_sds_under_jit_and_errors():
  a, b = _rand(5, (10, 2)), _rand(6, (2, 7))
  out = jax.jit(lambda a, b: sds.activate_sds(a, b, scale=1.5))(a, b)
  for u, v in zip(out, sds.activate_sds(a, b, scale=1.5)):
    np.testing.assert_allclose(u, v, atol=1e-6)
  with pytest.raises(ValueError, match="inner dimensions"):
    sds.activate_sds(a, b.T, scale=1.0)


def test_batched_switch_equals_one_adapter_at_a_time():
  from sdslora_jax.reparam import activate_sds_batch

  keys = jax.random.split(jax.random.key(5), 6)
  a = random_normal(keys[0], (3, 20, 4))
  b = random_normal(keys[1], (3, 4, 12))
  scales = jnp.asarray([0.5, 2.0, 4.0])
  got = activate_sds_batch(a, b, scales)
  for n in range(3):
    want = sds.activate_sds(a[n], b[n], scale=float(scales[n]))
    # Up to float32 rounding: batched and single matmuls in the QRs round differently
    # (2e-6 seen on entries of size 1-10 after the SVD).
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[n], w, rtol=1e-5, atol=1e-5)
    # The identity the switch must satisfy, per member.
    np.testing.assert_allclose(
        sds.sds_delta(got[0][n], got[1][n], scale=float(scales[n]), qa=got[2][n], qb=got[3][n]),
        sds.lora_delta(a[n], b[n], scale=float(scales[n])), rtol=1e-4, atol=1e-5)
