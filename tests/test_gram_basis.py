"""gram_orthonormal_basis: orthonormality vs conditioning, equality to Householder, rank
deficiency, jit/vmap/bfloat16, and (in a subprocess with 8 simulated devices) that a
row-sharded factor is never all-gathered."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdslora_jax import gram_basis as gb
from sdslora_jax.basis import orthonormal_basis
from sdslora_jax.gram_basis import gram_orthonormal_basis, gram_qr
from testing_utils import random_normal

ORTH_TOL = 1e-6
# gram_orthonormal_basis calls a jitted core (one compile per shape and pass
# count, shared by all tests); jit and vmap around it are tested separately.
_basis = gram_orthonormal_basis


def _spectrum_matrix(d, r, kappa, seed=0):
  """float32 ``U diag(s) V^T`` with ``s`` geometric from 1 to ``1 / kappa``."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((d, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return ((u * np.geomspace(1.0, 1.0 / kappa, r)) @ v.T).astype(np.float32)


def _orth_error(q):
  q = np.asarray(q, np.float64)
  return np.abs(q.T @ q - np.eye(q.shape[1])).max()


def _assert_qr_convention(q, m, tol=1e-6):
  """``m = q R`` with ``R = q^T m`` upper triangular, non-negative diagonal."""
  q, m = np.asarray(q, np.float64), np.asarray(m, np.float64)
  scale = max(np.linalg.norm(m), 1e-30)
  r = q.T @ m
  assert np.linalg.norm(q @ r - m) <= tol * scale  # span preserved
  assert np.abs(np.tril(r, -1)).max(initial=0.0) <= tol * scale
  assert np.all(np.diag(r) >= -tol * scale)


def _exact_q(m):
  q, r = np.linalg.qr(np.asarray(m, np.float64))
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


@pytest.mark.parametrize("d", [64, 1024])
@pytest.mark.parametrize("r", [4, 16, 64])
def test_orthonormal_for_condition_numbers_up_to_1e6(d, r):
  for kappa in (1.0, 1e2, 1e4, 1e6):
    m = _spectrum_matrix(d, r, kappa, seed=r + d)
    q = _basis(m)
    assert q.dtype == jnp.float32 and q.shape == m.shape
    assert _orth_error(q) <= ORTH_TOL, kappa
    _assert_qr_convention(q, m, tol=2e-6)
    # The Q factor of m is determined to about u * kappa; we are that close.
    assert np.abs(np.asarray(q, np.float64) - _exact_q(m)).max() <= 1e-6 + 1e-8 * kappa


@pytest.mark.parametrize("shape", [(64, 4), (1024, 16), (1024, 64), (64, 64)])
@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0])
def test_equals_householder_for_well_conditioned_factors(shape, kappa):
  m = _spectrum_matrix(*shape, kappa, seed=7)
  # Householder's own error grows like u * kappa (1.7e-5 off the float64 QR at
  # kappa = 100 for (64, 4)); the Gram basis is closer to the float64 QR.
  np.testing.assert_allclose(_basis(m), orthonormal_basis(m), atol=1e-5 * max(1.0, kappa / 10), rtol=0)
  np.testing.assert_allclose(_basis(m), _exact_q(m), atol=2e-6, rtol=0)


def test_fast_path_is_taken_up_to_1e6_and_safe_path_agrees():
  safe = jax.jit(lambda x: gb._safe_path(gb._prepare(x, None)[0], None))
  for kappa in (1.0, 1e3, 1e6):
    m = _spectrum_matrix(1024, 16, kappa, seed=3)
    q, fast = gb._basis(m, 3, None)
    assert bool(fast), kappa
    qs = safe(m)  # full rank: nothing is replaced, the same Q factor
    assert _orth_error(qs) <= ORTH_TOL
    assert np.abs(np.asarray(qs) - np.asarray(q)).max() <= 1e-6 + 1e-8 * kappa
  dependent = np.asarray(_spectrum_matrix(1024, 16, 1.0))
  dependent[:, 5] = 2.0 * dependent[:, 1]
  assert not bool(gb._basis(dependent, 3, None)[1])


def test_a_batch_mixing_both_fast_attempts_keeps_each_matrix_s_own_result():
  # kappa 10 is accepted by the first attempt (CholeskyQR2), 1e5 only by the second
  # (shifted); together in one batch each keeps the result it gets alone.
  well, ill = _spectrum_matrix(1024, 16, 10.0, seed=5), _spectrum_matrix(1024, 16, 1e5, seed=6)
  first = jax.jit(lambda x: jax.vmap(lambda y: gb._fast_path(y, (False, False), None))(x))
  assert list(np.asarray(first(np.stack([well, ill]))[1])) == [True, False]
  q, fast = gb._basis(np.stack([well, ill]), 3, None)
  assert np.asarray(fast).all()
  for i, m in enumerate((well, ill)):
    np.testing.assert_allclose(q[i], gb._basis(m, 3, None)[0], atol=1e-6)
    assert _orth_error(q[i]) <= ORTH_TOL
  np.testing.assert_allclose(q[0], _exact_q(well), atol=2e-6)
  safe = gb._safe_path(gb._prepare(ill, None)[0], None)  # the independent path, full rank
  assert np.abs(np.asarray(safe) - np.asarray(q[1])).max() <= 1e-6 + 1e-8 * 1e5


@pytest.mark.parametrize("passes", [2, 4])  # 3 (the default) is tested above
def test_every_pass_count_is_orthonormal_even_past_its_range(passes):
  for kappa in (1.0, 1e6, 1e8):
    m = _spectrum_matrix(1024, 16, kappa, seed=passes)
    q = _basis(m, passes=passes)
    assert _orth_error(q) <= ORTH_TOL
    _assert_qr_convention(q, m, tol=2e-6)


def _rank_deficient_cases():
  # Mostly (64, 4), (1024, 16) and (64, 64): shapes compiled by the tests above.
  rng = np.random.default_rng(11)
  x, y, z = (rng.standard_normal((64, 1)) for _ in range(3))
  e = np.eye(64)
  partly_zero = np.zeros((1024, 16))
  partly_zero[:, :5] = 1e-3 * rng.standard_normal((1024, 5))
  return {
      "zero": np.zeros((64, 4)),
      "zero_square": np.zeros((5, 5)),
      "zero_column": np.hstack([x, 0 * x, y, z]),
      "repeated": np.hstack([x, x, y, z]),
      "multiples": np.hstack([x, 2 * x, y, 3 * x]),
      "sum_of_two": np.hstack([x, y, x + y, z]),
      "near_dependent_1e-7": np.hstack([x, y, x + 1e-7 * z, z]),
      "repeated_unit_vectors": e[:, [0, 0, 1, 1]],
      "zero_column_whose_e_j_is_taken": np.hstack([0 * x, e[:, :1], y, z]),
      "rank1_outer": np.outer(np.arange(1.0, 6.0), np.ones(5)),
      "rank3": rng.standard_normal((1024, 3)) @ rng.standard_normal((3, 16)),
      "rank8_square": rng.standard_normal((64, 8)) @ rng.standard_normal((8, 64)),
      "partly_zero_rows_of_b": partly_zero,
  }


@pytest.mark.parametrize("name", list(_rank_deficient_cases()))
def test_zero_and_rank_deficient_inputs_give_finite_orthonormal_spanning_bases(name):
  m = _rank_deficient_cases()[name].astype(np.float32)
  q = np.asarray(_basis(m))
  assert np.all(np.isfinite(q))
  assert _orth_error(q) <= ORTH_TOL
  _assert_qr_convention(q, m, tol=2e-6)


def test_zero_matrix_gives_the_identity_columns_like_householder():
  for shape in [(64, 4), (5, 5)]:
    np.testing.assert_array_equal(_basis(np.zeros(shape, np.float32)), np.eye(*shape))
    np.testing.assert_allclose(orthonormal_basis(jnp.zeros(shape)), np.eye(*shape), atol=0)


def test_spiky_columns_stay_orthonormal_at_large_d():
  # Identity completions of zero columns are spiky; a plain float32 Gram matrix
  # loses their small entries' squares (|q_j|^2 - 1 ~ 1.5e-6 at d = 16384).
  m = np.random.default_rng(1).standard_normal((16384, 16)).astype(np.float32)
  m[:, 8:] = 0.0
  m[:, 3] = 0.0
  m[7, 3] = 1.0
  q = _basis(m)
  assert _orth_error(q) <= 5e-7


def test_scale_does_not_matter():
  m = _spectrum_matrix(64, 4, 10.0, seed=5)
  q = np.asarray(_basis(m))
  for col_scale in (2.0**-100, 1e-30, 1e30):
    mm = m.copy()
    mm[:, 2] *= np.float32(col_scale)
    np.testing.assert_allclose(_basis(mm), q, atol=1e-6)
  mm = m.copy()
  mm[:, 2] = np.float32(1e-42) * np.sign(mm[:, 2])  # subnormal: a few bits left
  q = _basis(mm)
  assert _orth_error(q) <= ORTH_TOL
  _assert_qr_convention(q, mm, tol=2e-6)


def test_jit_and_vmap():
  ms = np.stack([
      _spectrum_matrix(64, 4, 1.0, seed=1),
      _spectrum_matrix(64, 4, 10.0, seed=2),
      np.zeros((64, 4), np.float32),
  ])
  ms[1, :, 3] = ms[1, :, 1]  # dependent: the batch takes both paths of the cond
  batched = jax.jit(jax.vmap(gram_orthonormal_basis))(ms)
  for i in range(len(ms)):
    np.testing.assert_allclose(batched[i], _basis(ms[i]), atol=1e-6)
    assert _orth_error(batched[i]) <= ORTH_TOL
  eager = gram_orthonormal_basis(ms[0])
  np.testing.assert_allclose(eager, batched[0], atol=1e-6)


def test_bfloat16_input():
  m = random_normal(jax.random.key(0), (1024, 16), jnp.bfloat16)
  q = _basis(m)
  assert q.dtype == jnp.float32
  assert _orth_error(q) <= ORTH_TOL
  np.testing.assert_allclose(q, _basis(m.astype(jnp.float32)), atol=0)
  np.testing.assert_allclose(q, orthonormal_basis(m), atol=1e-5)


def test_gram_qr_factorises():
  m = _spectrum_matrix(1024, 16, 100.0, seed=9)
  q, r = gram_qr(m)
  assert r.shape == (16, 16) and np.all(np.asarray(r)[np.tril_indices(16, -1)] == 0)
  assert np.all(np.diag(r) >= 0)
  np.testing.assert_allclose(q @ r, m, atol=1e-6)
  _, r_ref = np.linalg.qr(m.astype(np.float64))
  np.testing.assert_allclose(r, r_ref * np.sign(np.diag(r_ref))[:, None], atol=1e-5)


def test_non_finite_input_gives_non_finite_output():
  m = _spectrum_matrix(64, 4, 1.0)
  m[5, 2] = np.nan
  assert np.all(np.isnan(_basis(m)))
  m[5, 2] = np.inf
  assert np.all(np.isnan(_basis(m)))


def test_differentiable_like_householder():
  m = _spectrum_matrix(64, 4, 10.0, seed=4)
  t = np.random.default_rng(0).standard_normal(m.shape).astype(np.float32)
  _, dq = jax.jvp(gram_orthonormal_basis, (m,), (t,))
  _, dq_ref = jax.jvp(orthonormal_basis, (m,), (t,))
  np.testing.assert_allclose(dq, dq_ref, atol=2e-5)


@pytest.mark.parametrize("shape", [(3, 5), (4,), (2, 3, 4)])
def test_rejects_bad_shapes(shape):
  with pytest.raises(ValueError, match=r"m .*shape"):
    gram_orthonormal_basis(jnp.zeros(shape))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_rejects_non_floating_dtypes(dtype):
  with pytest.raises(ValueError, match="floating"):
    gram_orthonormal_basis(jnp.ones((8, 2), dtype))


@pytest.mark.parametrize("passes", [0, 1, 2.0, True])
def test_rejects_bad_pass_counts(passes):
  with pytest.raises(ValueError, match="passes"):
    gram_orthonormal_basis(jnp.zeros((8, 2)), passes=passes)


# --- 8 simulated devices, in a fresh process (XLA_FLAGS must precede importing JAX) ----

_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    r"""
    import json, re
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sdslora_jax.basis import orthonormal_basis
    from sdslora_jax.gram_basis import gram_orthonormal_basis

    OPS = "all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|collective-broadcast"
    LINE = re.compile(r"=\s*(?P<type>.*?)\s+(?P<op>" + OPS + r")(?:-start)?\(")

    def collectives(hlo):
      found = []
      for line in hlo.splitlines():
        hit = LINE.search(line)
        if hit:
          shapes = [[int(d) for d in s.split(",") if d]
                    for s in re.findall(r"[a-z][a-z0-9]*\[([0-9,]*)\]", hit["type"])]
          found.append([hit["op"], shapes])
      return found

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    m_host = rng.standard_normal((4096, 16)).astype(np.float32)
    deficient = m_host.copy()
    deficient[:, 5] = deficient[:, 1]
    deficient[:, 9] = 0.0
    out = {}
    ref = {k: np.asarray(gram_orthonormal_basis(jnp.asarray(v)))  # one device
           for k, v in (("full", m_host), ("deficient", deficient))}
    for axis_type in ("Auto", "Explicit"):
      mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(getattr(AxisType, axis_type),))
      sharding = NamedSharding(mesh, P("fsdp", None))
      fns = {"gram": gram_orthonormal_basis}
      if axis_type == "Auto":  # explicit sharding rejects a QR of a sharded matrix outright
        fns["householder"] = orthonormal_basis
      for name, fn in fns.items():
        inputs = {k: jax.device_put(v, sharding) for k, v in (("full", m_host), ("deficient", deficient))}
        compiled = jax.jit(fn).lower(inputs["full"]).compile()  # one compile for both cases
        for case, m in inputs.items():
          q = compiled(m)
          out[f"{axis_type}/{name}/{case}"] = {
              "diff": float(np.abs(np.asarray(q) - ref[case]).max()),
              "out_spec": str(q.sharding.spec),
              "collectives": collectives(compiled.as_text()),
          }
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    sm = jax.jit(jax.shard_map(
        lambda x: gram_orthonormal_basis(x, axis_name="fsdp"),
        mesh=mesh, in_specs=P("fsdp", None), out_specs=P("fsdp", None)))
    inputs = {k: jax.device_put(v, NamedSharding(mesh, P("fsdp", None)))
              for k, v in (("full", m_host), ("deficient", deficient))}
    compiled = sm.lower(inputs["full"]).compile()
    for case, m in inputs.items():
      out[f"shard_map/gram/{case}"] = {
          "diff": float(np.abs(np.asarray(compiled(m)) - ref[case]).max()),
          "collectives": collectives(compiled.as_text()),
      }
    # Blocks of 8 rows, fewer than r = 16: only the global matrix must be tall.
    small = rng.standard_normal((64, 16)).astype(np.float32)
    small[:, 3] = 0.0
    q = sm(jax.device_put(small, NamedSharding(mesh, P("fsdp", None))))
    out["shard_map/gram/short_blocks"] = {
        "diff": float(np.abs(np.asarray(q) - np.asarray(gram_orthonormal_basis(small))).max())}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module", autouse=True)
def _multi_device_process(request):
  """Starts the 8-device subprocess at the top of the module, so it runs alongside
  the single-device tests; only if a selected test needs it."""
  wanted = any(
      "multi_device" in getattr(item, "fixturenames", ())
      for item in request.session.items
      if item.module is request.module
  )
  if not wanted:
    yield None
    return
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen(
      [sys.executable, "-c", _MULTI_DEVICE_SCRIPT],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def multi_device(_multi_device_process):
  proc = _multi_device_process
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-4000:]
  line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def _gathers_of_full_factor(collectives):
  return [c for c in collectives if c[0] == "all-gather" and [4096, 16] in c[1]]


def test_sharded_gram_basis_matches_one_device(multi_device):
  for key in ("Auto/gram", "Explicit/gram", "shard_map/gram"):
    for case in ("full", "deficient"):
      assert multi_device[f"{key}/{case}"]["diff"] <= 1e-5, (key, case)
  assert multi_device["shard_map/gram/short_blocks"]["diff"] <= 1e-5
  assert multi_device["Auto/gram/full"]["out_spec"] in ("P('fsdp', None)", "PartitionSpec('fsdp', None)")


def test_sharded_gram_basis_communicates_only_r_by_r(multi_device):
  for key in ("Auto/gram/full", "Explicit/gram/full", "shard_map/gram/full"):
    colls = multi_device[key]["collectives"]
    assert any(op == "all-reduce" for op, _ in colls), key
    assert not _gathers_of_full_factor(colls), key
    # Only all-reduces, of r-vectors and r x r (or 2r x r) Gram matrices.
    assert {op for op, _ in colls} == {"all-reduce"}, key
    assert max(int(np.prod(s)) for _, shapes in colls for s in shapes) <= 2 * 16 * 16, key


def test_householder_on_the_same_sharded_input_gathers_the_factor(multi_device):
  # The checker above can fail: Householder QR all-gathers the (4096, 16) factor.
  assert _gathers_of_full_factor(multi_device["Auto/householder/full"]["collectives"])
  assert multi_device["Auto/householder/full"]["diff"] <= 1e-5


def test_batch_equals_one_matrix_at_a_time():
  # A batch (the optimizer's grouped call) gives each matrix's own basis, including
  # a rank-deficient member that sends the whole batch down the safe path.
  ms = [_spectrum_matrix(40, 4, kappa, seed=s) for s, kappa in enumerate((1.0, 1e3, 1e5))]
  deficient = np.array(ms[0]).copy()
  deficient[:, 3] = deficient[:, 0]
  ms.append(jnp.asarray(deficient))
  batch = jnp.stack(ms)
  q = gram_orthonormal_basis(batch)
  assert q.shape == batch.shape
  for m, qi in zip(ms, q):
    np.testing.assert_allclose(qi, gram_orthonormal_basis(m), atol=2e-6)
    assert _orth_error(qi) < 1e-5
  q2, r2 = gram_qr(batch.reshape(2, 2, 40, 4))
  for m, qi, ri in zip(ms, q2.reshape(4, 40, 4), r2.reshape(4, 4, 4)):
    np.testing.assert_allclose(qi @ ri, m, atol=1e-5 * float(jnp.max(jnp.abs(m))))
