"""orthonormal_basis, align_signs, refresh_bases against identities the math must satisfy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdslora_jax as sds
from sdslora_jax.basis import align_signs, factor_bases
from testing_utils import random_normal


def _rand(seed, shape, dtype=jnp.float32):
  return random_normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("shape", [(7, 3), (64, 8), (5, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_orthonormal_basis_identities(shape, dtype):
  m = _rand(0, shape, dtype)
  q = sds.orthonormal_basis(m)
  assert q.dtype == jnp.float32 and q.shape == shape
  q = np.asarray(q, np.float64)
  m64 = np.asarray(m.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(shape[1]), atol=1e-5)
  r = q.T @ m64  # m = q r must hold with r upper triangular, diag >= 0
  np.testing.assert_allclose(q @ r, m64, atol=1e-4 * np.abs(m64).max())
  np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-4 * np.abs(m64).max())
  assert np.all(np.diag(r) >= 0)


def test_orthonormal_basis_matches_numpy_qr_up_to_sign():
  m = np.asarray(_rand(1, (20, 6)), np.float64)
  q_ref, r_ref = np.linalg.qr(m)
  q_ref = q_ref * np.sign(np.diag(r_ref))
  np.testing.assert_allclose(sds.orthonormal_basis(m), q_ref, atol=1e-5)


@pytest.mark.parametrize(
    "m",
    [
        np.zeros((6, 3), np.float32),
        np.outer(np.arange(1.0, 7.0), np.ones(3)).astype(np.float32),  # rank 1
    ],
    ids=["zero", "rank1"],
)
def test_orthonormal_basis_rank_deficient_is_finite_and_spans(m):
  q = np.asarray(sds.orthonormal_basis(m), np.float64)
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(q @ (q.T @ m), m, atol=1e-5)


def test_orthonormal_basis_is_continuous_in_the_factor():
  m = _rand(2, (30, 4))
  q0 = sds.orthonormal_basis(m)
  q1 = sds.orthonormal_basis(m + 1e-4 * _rand(3, (30, 4)))
  assert float(jnp.abs(q0 - q1).max()) < 1e-3


@pytest.mark.parametrize("shape", [(3, 5), (4,), (2, 3, 4)])
def test_orthonormal_basis_rejects_bad_shapes(shape):
  with pytest.raises(ValueError, match=r"m .*shape"):
    sds.orthonormal_basis(jnp.zeros(shape))


def test_align_signs_flips_only_opposed_columns():
  prev = sds.orthonormal_basis(_rand(4, (10, 4)))
  flips = jnp.array([1.0, -1.0, 1.0, -1.0])
  aligned = align_signs(prev * flips, prev)
  np.testing.assert_allclose(aligned, prev, atol=1e-7)
  with pytest.raises(ValueError, match="different shapes"):
    align_signs(prev, prev[:, :3])


def test_refresh_bases_orthonormal_spanning_and_sign_aligned():
  a, b = _rand(5, (16, 4)), _rand(6, (4, 12))
  qa0, qb0 = factor_bases(a, b)
  # Previous bases with flipped columns: the refresh must follow their signs.
  flips = jnp.array([-1.0, 1.0, -1.0, 1.0])
  a1, b1 = a + 0.01 * _rand(7, a.shape), b + 0.01 * _rand(8, b.shape)
  qa, qb = sds.refresh_bases(a1, b1, qa0 * flips, qb0 * flips)
  for q, m in ((qa, a1), (qb, b1.T)):
    q, m = np.asarray(q, np.float64), np.asarray(m, np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(q @ (q.T @ m), m, atol=1e-5)
  assert np.all(np.sum(np.asarray(qa) * np.asarray(qa0 * flips), 0) > 0)
  assert np.all(np.sum(np.asarray(qb) * np.asarray(qb0 * flips), 0) > 0)


def test_refresh_bases_checks_shapes():
  a, b = jnp.ones((8, 2)), jnp.ones((2, 6))
  with pytest.raises(ValueError, match=r"qb must have shape \(6, 2\)"):
    sds.refresh_bases(a, b, jnp.ones((8, 2)), jnp.ones((2, 6)))
