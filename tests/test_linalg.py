"""_linalg.map_matrices: equal to vmap, and (in a subprocess with a deadline) independent
batched decompositions in one compiled program finish.

jaxlib 0.10.2's CPU LAPACK kernels split a batch over the intra-op thread pool and
wait for the pieces; two such calls in one program can hold every thread of a
2-core pool and hang for ever (the script below hung every time before the
decompositions went through ``map_matrices``). A hang cannot fail a test from
inside the process, so the program runs in a subprocess with a timeout.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdslora_jax._linalg import map_matrices
from testing_utils import random_normal


def test_map_matrices_matches_vmap_for_qr_and_svd():
  m = random_normal(jax.random.key(0), (2, 3, 12, 4))
  q, r = jax.jit(lambda x: map_matrices(lambda y: jnp.linalg.qr(y), x))(m)
  q_ref, r_ref = jax.vmap(jax.vmap(jnp.linalg.qr))(m)
  np.testing.assert_allclose(q, q_ref, atol=1e-6)
  np.testing.assert_allclose(r, r_ref, atol=1e-5)
  s = map_matrices(lambda y: jnp.linalg.svd(y, compute_uv=False), m)
  np.testing.assert_allclose(s, np.linalg.svd(np.asarray(m), compute_uv=False), rtol=1e-5)
  assert s.shape == (2, 3, 4)


def test_map_matrices_two_arguments_and_unbatched():
  a = random_normal(jax.random.key(1), (5, 4, 4))
  b = random_normal(jax.random.key(2), (5, 4, 3))
  x = map_matrices(lambda p, q: p @ q, a, b)
  np.testing.assert_allclose(x, np.einsum("nij,njk->nik", a, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(map_matrices(lambda p: p.T, a[0]), a[0].T)


def test_map_matrices_is_differentiable():
  m = random_normal(jax.random.key(3), (3, 6, 2))
  loss = lambda f: lambda x: jnp.sum(f(x) ** 3)
  g = jax.grad(loss(lambda x: map_matrices(lambda y: jnp.linalg.qr(y)[1], x)))(m)
  g_ref = jax.grad(loss(lambda x: jnp.linalg.qr(x)[1]))(m)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_map_matrices_rejects_mismatched_batches():
  with pytest.raises(ValueError, match="batch axes differ"):
    map_matrices(lambda p, q: p @ q, jnp.ones((3, 2, 2)), jnp.ones((4, 2, 2)))


_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from sdslora_jax.basis import orthonormal_basis
    from sdslora_jax.reparam import activated_from_bases

    rng = np.random.default_rng(0)
    m1, m2 = (rng.standard_normal((200, d, 32)).astype(np.float32) for d in (64, 96))

    @jax.jit
    def run(m1, m2):  # independent batched QR / Cholesky / SVD calls in one program
      out = [orthonormal_basis(m, method=method) for method in ("gram", "householder") for m in (m1, m2)]
      b = jnp.swapaxes(m2[:, :64], -1, -2)
      qa = orthonormal_basis(m1, method="householder")
      qb = orthonormal_basis(m2[:, :64], method="gram")
      return out, activated_from_bases(m1, b, qa, qb, jnp.full(200, 2.0))

    # The hang is a race, so the program runs several times; before the fix it hung on the
    # first call in each of 15 tries (jaxlib 0.10.2, 2 cores), so 10 calls leave a margin.
    for i in range(10):
      bases, (a2, b2, _, _) = jax.block_until_ready(run(m1, m2))
    err = {}
    for k, (q, m) in enumerate(zip(bases, (m1, m2, m1, m2))):
      q = np.asarray(q, np.float64)
      q_ref = np.linalg.qr(m.astype(np.float64))[0]
      err[f"orth{k}"] = float(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(32)).max())
      err[f"span{k}"] = float(np.abs(q @ (np.swapaxes(q, -1, -2) @ q_ref) - q_ref).max())
    # The switch keeps the update: qa' b2 + a2 qb'.T = a b for a = m1, b.T = m2[:, :64], with
    # qa' = orth(a2), qb' = orth(b2.T) (columns of a2, rows of b2 normalised).
    a2, b2 = np.asarray(a2, np.float64), np.asarray(b2, np.float64)
    qa2 = a2 / np.linalg.norm(a2, axis=-2, keepdims=True)
    qb2 = np.swapaxes(b2, -1, -2) / np.linalg.norm(b2, axis=-1)[:, None, :]
    ab = m1.astype(np.float64) @ np.swapaxes(m2[:, :64].astype(np.float64), -1, -2)
    ab2 = qa2 @ b2 + a2 @ np.swapaxes(qb2, -1, -2)
    err["switch"] = float(np.abs(ab2 - ab).max() / np.abs(ab).max())
    print(json.dumps(err))
""")


def test_independent_batched_decompositions_in_one_program_finish():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One CPU device, as in a user's process (the suite's 8 simulated devices change the
  # thread pools, and the hang did not show with them).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  try:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=180)
  except subprocess.TimeoutExpired:
    pytest.fail("batched decompositions in one compiled program did not finish in 180 s "
                "(the CPU LAPACK thread-pool deadlock)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = json.loads(proc.stdout.strip().splitlines()[-1])
  for key, value in err.items():
    assert value < (1e-4 if key == "switch" else 2e-5), (key, value)
