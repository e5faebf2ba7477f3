"""LoRA / SDS-LoRA ops against a dense naive reference and autodiff of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sdslora_jax as sds
from sdslora_jax.basis import factor_bases
from sdslora_jax import ops
from testing_utils import big_intermediates, random_normal

D_IN, D_OUT, R, S = 12, 10, 3, 1.7


def _rand(seed, shape, dtype=jnp.float32):
  return random_normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _np_basis(m):
  q, r = np.linalg.qr(np.asarray(m, np.float64))
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _setup(batch=(4, 5)):
  return _rand(0, batch + (D_IN,)), _rand(1, (D_IN, R)), _rand(2, (R, D_OUT))


# Independent dense references, written from the formulas.
def dense_lora(a, b):
  return S * a @ b


def dense_sds(a, b, qa=None, qb=None):
  qa = sds.orthonormal_basis(a) if qa is None else qa
  qb = sds.orthonormal_basis(b.T) if qb is None else qb
  qa, qb = jax.lax.stop_gradient(qa), jax.lax.stop_gradient(qb)
  return S * (qa @ b + a @ qb.T)


def test_forward_matches_numpy_formulas():
  x, a, b = _setup()
  x64, a64, b64 = (np.asarray(t, np.float64) for t in (x, a, b))
  qa, qb = _np_basis(a64), _np_basis(b64.T)
  np.testing.assert_allclose(sds.lora_delta(a, b, scale=S), S * a64 @ b64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      sds.lora_matmul(x, a, b, scale=S), x64 @ (S * a64 @ b64), rtol=1e-4, atol=1e-4
  )
  sds_ref = S * (qa @ b64 + a64 @ qb.T)
  np.testing.assert_allclose(sds.sds_delta(a, b, scale=S), sds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sds.sds_matmul(x, a, b, scale=S), x64 @ sds_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("given_bases", [False, True])
@pytest.mark.parametrize("batch", [(), (6,), (2, 3, 4)])
def test_sds_gradients_match_autodiff_of_dense_reference(given_bases, batch):
  x, a, b = _setup(batch)
  c = _rand(3, batch + (D_OUT,))
  kw = {}
  if given_bases:  # bases unrelated to the factors: still constants
    kw = dict(qa=sds.orthonormal_basis(_rand(4, (D_IN, R))), qb=sds.orthonormal_basis(_rand(5, (D_OUT, R))))

  def loss_op(x, a, b):
    return jnp.sum(jnp.tanh(sds.sds_matmul(x, a, b, scale=S, **kw)) * c)

  def loss_ref(x, a, b):
    return jnp.sum(jnp.tanh(x @ dense_sds(a, b, kw.get("qa"), kw.get("qb"))) * c)

  np.testing.assert_allclose(loss_op(x, a, b), loss_ref(x, a, b), rtol=1e-5)
  for g_op, g_ref in zip(jax.grad(loss_op, (0, 1, 2))(x, a, b), jax.grad(loss_ref, (0, 1, 2))(x, a, b)):
    np.testing.assert_allclose(g_op, g_ref, rtol=1e-4, atol=1e-5)


def test_sds_gradient_formulas():
  """dL/db = s qa.T G and dL/da = s G qb with G = dL/dK = x.T g."""
  x, a, b = _setup((9,))
  g = _rand(6, (9, D_OUT))
  da, db = jax.grad(lambda a, b: jnp.sum(sds.sds_matmul(x, a, b, scale=S) * g), (0, 1))(a, b)
  big_g = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
  qa, qb = _np_basis(a), _np_basis(np.asarray(b).T)
  np.testing.assert_allclose(db, S * qa.T @ big_g, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(da, S * big_g @ qb, rtol=1e-4, atol=1e-5)


def test_lora_gradients_match_autodiff_of_dense_reference():
  x, a, b = _setup()
  f = lambda x, a, b: jnp.sum(jnp.sin(sds.lora_matmul(x, a, b, scale=S)))
  ref = lambda x, a, b: jnp.sum(jnp.sin(x @ dense_lora(a, b)))
  for g_op, g_ref in zip(jax.grad(f, (0, 1, 2))(x, a, b), jax.grad(ref, (0, 1, 2))(x, a, b)):
    # float32 sums in another order: absolute error relative to the largest entry (~10)
    np.testing.assert_allclose(g_op, g_ref, rtol=1e-4, atol=1e-5 * float(np.abs(g_ref).max()))


def test_check_grads_with_constant_bases():
  """With given bases the op is an ordinary function of (x, a, b): exact derivatives."""
  x, a, b = _setup((3,))
  qa, qb = factor_bases(a, b)
  f = lambda x, a, b: sds.sds_matmul(x, a, b, scale=S, qa=qa, qb=qb)
  check_grads(f, (x, a, b), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  check_grads(lambda x, a, b: sds.lora_matmul(x, a, b, scale=S), (x, a, b), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_check_grads_input_cotangent_with_derived_bases():
  """The bases do not depend on x, so dL/dx is the true derivative even when derived."""
  x, a, b = _setup((3,))
  check_grads(lambda x: sds.sds_matmul(x, a, b, scale=S), (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def _upper(seed, r):
  t = np.triu(np.asarray(_rand(seed, (r, r)))) * 0.5
  np.fill_diagonal(t, np.abs(np.diag(t)) + 0.5)
  return jnp.asarray(t)


def test_singular_values_decoupled_from_backward():
  """a -> a T (T upper triangular, positive diagonal) keeps orth(a), so dL/db is
  unchanged for SDS-LoRA; for LoRA it changes. Likewise b.T -> b.T T for dL/da.
  A loss linear in the output keeps G = dL/dK fixed."""
  x, a, b = _setup((8,))
  c = _rand(7, (8, D_OUT))
  t = _upper(8, R)

  def grads(fn, a, b):
    return jax.grad(lambda a, b: jnp.sum(fn(x, a, b, scale=S) * c), (0, 1))(a, b)

  for fn, decoupled in ((sds.sds_matmul, True), (sds.lora_matmul, False)):
    da, db = grads(fn, a, b)
    _, db_scaled = grads(fn, a @ t, b)
    da_scaled, _ = grads(fn, a, (b.T @ t).T)
    same_b = np.allclose(db, db_scaled, rtol=1e-4, atol=1e-5)
    same_a = np.allclose(da, da_scaled, rtol=1e-4, atol=1e-5)
    assert same_b == decoupled and same_a == decoupled, fn.__name__
    if not decoupled:
      assert float(jnp.abs(db - db_scaled).max()) > 1e-2


def _train_step_jaxpr(fn, d, r, n=8):
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  a = jax.ShapeDtypeStruct((d, r), jnp.float32)
  b = jax.ShapeDtypeStruct((r, d), jnp.float32)
  loss = lambda x, a, b: jnp.sum(fn(x, a, b) ** 2)
  return jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(x, a, b).jaxpr


def test_jaxpr_has_no_kernel_sized_value_at_realistic_size():
  d, r = 4096, 16
  big, largest = big_intermediates(
      _train_step_jaxpr(lambda x, a, b: sds.sds_matmul(x, a, b, scale=S), d, r), d * d
  )
  print(f"sds_matmul fwd+bwd at d={d}, r={r}: largest intermediate {largest} elements")
  assert not big and largest < d * d // 8, big
  # The checker itself sees a dense path.
  big, _ = big_intermediates(
      _train_step_jaxpr(lambda x, a, b: x @ sds.sds_delta(a, b, scale=S), d, r), d * d
  )
  assert big


@pytest.mark.parametrize("transform", ["jit", "vmap", "checkpoint", "scan", "grad_of_jit"])
def test_transformations(transform):
  x, a, b = _setup((6,))
  f = lambda x, a, b: sds.sds_matmul(x, a, b, scale=S)
  expected = f(x, a, b)
  if transform == "jit":
    got = jax.jit(f)(x, a, b)
  elif transform == "vmap":  # vmap over a stack of adapters
    a2, b2 = jnp.stack([a, 2 * a]), jnp.stack([b, -b])
    got = jax.vmap(f, in_axes=(None, 0, 0))(x, a2, b2)[0]
    np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0, 0))(x, a2, b2)[1], f(x, 2 * a, -b),
                               rtol=1e-5, atol=1e-5)
  elif transform == "checkpoint":
    got = jax.checkpoint(f)(x, a, b)
    g1 = jax.grad(lambda a: jnp.sum(jax.checkpoint(f)(x, a, b) ** 2))(a)
    g2 = jax.grad(lambda a: jnp.sum(f(x, a, b) ** 2))(a)
    np.testing.assert_allclose(g1, g2, rtol=1e-5)
  elif transform == "scan":
    def body(h, ab):
      return jnp.tanh(sds.sds_matmul(h, ab[0], ab[1][:, :D_IN], scale=S)), None

    stack = (jnp.stack([a, a]), jnp.stack([jnp.pad(b, ((0, 0), (0, 2)))] * 2))
    loss = lambda stack: jnp.sum(jax.lax.scan(body, x, stack)[0])
    loss_ref = lambda stack: jnp.sum(
        jnp.tanh(jnp.tanh(x @ dense_sds(a, stack[1][0][:, :D_IN])) @ dense_sds(a, stack[1][1][:, :D_IN]))
    )
    g = jax.grad(loss)(stack)[1]
    g_ref = jax.grad(lambda s: loss_ref(s))(stack)[1]
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    got = expected
  else:
    g = jax.grad(lambda a: jnp.sum(jax.jit(f)(x, a, b)))(a)
    np.testing.assert_allclose(g, jax.grad(lambda a: jnp.sum(x @ dense_sds(a, b)))(a), rtol=1e-4, atol=1e-5)
    got = expected
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_factors_and_activations():
  x, a, b = _setup()
  xb, ab, bb = (t.astype(jnp.bfloat16) for t in (x, a, b))
  y = sds.sds_matmul(xb, ab, bb, scale=S)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(xb.astype(jnp.float32) @ dense_sds(ab.astype(jnp.float32), bb.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2 * np.abs(ref).max())
  gx, ga, gb = jax.grad(lambda x, a, b: jnp.sum(sds.sds_matmul(x, a, b, scale=S).astype(jnp.float32)), (0, 1, 2))(xb, ab, bb)
  assert (gx.dtype, ga.dtype, gb.dtype) == (jnp.bfloat16,) * 3
  ga_ref = jax.grad(lambda a: jnp.sum(x @ dense_sds(a, b)))(ab.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(ga, np.float32), ga_ref, rtol=5e-2, atol=5e-2 * float(jnp.abs(ga_ref).max()))
  assert sds.sds_delta(ab, bb, scale=S).dtype == jnp.float32
  assert sds.lora_matmul(xb, ab, bb, scale=S).dtype == jnp.bfloat16


def test_warmup_sds_matmul_switches_by_data():
  x, a, b = _setup((5,))
  qa, qb = factor_bases(a, b)
  traces = []

  @jax.jit
  def grads(x, a, b, on):
    traces.append(1)
    return jax.value_and_grad(
        lambda x, a, b: jnp.sum(jnp.sin(sds.warmup_sds_matmul(x, a, b, qa, qb, on, scale=S))), (0, 1, 2)
    )(x, a, b)

  for on, ref in ((0.0, lambda x, a, b: x @ dense_lora(a, b)), (1.0, lambda x, a, b: x @ dense_sds(a, b))):
    val, g = grads(x, a, b, jnp.float32(on))
    val_ref, g_ref = jax.value_and_grad(lambda x, a, b: jnp.sum(jnp.sin(ref(x, a, b))), (0, 1, 2))(x, a, b)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    for u, v in zip(g, g_ref):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)
  assert len(traces) == 1


@pytest.mark.parametrize(
    "args, match",
    [
        (((4, 8), (8, 10)), r"rank r=8 exceeds min\(d_in, d_out\)=4"),
        (((12, 3), (4, 10)), r"inner dimensions .* a \(12, 3\) has rank 3, b \(4, 10\) has rank 4"),
        (((12, 3, 1), (3, 10)), r"factors must be 2-D"),
    ],
)
def test_shape_errors(args, match):
  a, b = (jnp.ones(s) for s in args)
  for fn in (sds.lora_delta, sds.sds_delta):
    with pytest.raises(ValueError, match=match):
      fn(a, b, scale=1.0)
  with pytest.raises(ValueError, match=match):
    sds.sds_matmul(jnp.ones((2, args[0][0])), a, b, scale=1.0)


def test_basis_and_input_shape_errors():
  x, a, b = _setup((2,))
  with pytest.raises(ValueError, match=r"qa must have shape \(12, 3\) like a, got \(12, 2\)"):
    sds.sds_matmul(x, a, b, scale=S, qa=jnp.ones((12, 2)))
  with pytest.raises(ValueError, match=r"qb must have shape \(10, 3\)"):
    sds.sds_delta(a, b, scale=S, qb=jnp.ones((3, 10)))
  with pytest.raises(ValueError, match=r"last axis of x must be d_in=12"):
    sds.sds_matmul(jnp.ones((2, 11)), a, b, scale=S)
  with pytest.raises(ValueError, match="scale must be finite and positive"):
    sds.lora_matmul(x, a, b, scale=-1.0)
  with pytest.raises(TypeError, match="scale must be a Python real number"):
    sds.sds_matmul(x, a, b, scale=jnp.ones(()))


def test_lora_matmul_gradients_over_several_batch_axes_match_the_dense_reference():
  """The written-out backward equals autodiff of ``x @ (s a b)`` for (B, T, d) activations."""
  kx, ka, kb, kg = jax.random.split(jax.random.key(7), 4)
  x = random_normal(kx, (3, 5, 12))
  a = random_normal(ka, (12, 4))
  b = random_normal(kb, (4, 7))
  g = random_normal(kg, (3, 5, 7))
  ours = jax.vjp(lambda x, a, b: sds.lora_matmul(x, a, b, scale=S), x, a, b)[1](g)
  ref = jax.vjp(lambda x, a, b: x @ (S * a @ b), x, a, b)[1](g)
  for got, want in zip(ours, ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Fresh bases: the rank-r SDS op.


def _fresh_case(d_in=48, d_out=40, r=6, n=(3, 5)):
  k = jax.random.split(jax.random.key(7), 3)
  x = random_normal(k[0], (*n, d_in))
  a = random_normal(k[1], (d_in, r))
  b = random_normal(k[2], (r, d_out))
  qa, qb = factor_bases(a, b)
  return x, a, b, qa, qb


def _grads(f, x, a, b):
  # jitted: one program each (eagerly, every op of the QRs compiled on its own, ~5 s a case)
  return jax.jit(jax.grad(lambda x, a, b: jnp.sum(jnp.sin(f(x, a, b))), argnums=(0, 1, 2)))(
      x, a, b)


def _assert_same_values_and_gradients(f, ref, x, a, b):
  np.testing.assert_allclose(jax.jit(f)(x, a, b), jax.jit(ref)(x, a, b), rtol=1e-4, atol=1e-4)
  for got, want in zip(_grads(f, x, a, b), _grads(ref, x, a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("r", [1, 6, 32])
def test_fresh_op_has_the_dense_references_values_and_gradients(r):
  x, a, b, qa, qb = _fresh_case(r=r)
  ref = lambda x, a, b: x @ ops.sds_delta(a, b, scale=0.7, qa=qa, qb=qb)  # noqa: E731
  fresh = lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=0.7, fresh=True)  # noqa: E731
  derived = lambda x, a, b: ops.sds_matmul(x, a, b, scale=0.7)  # noqa: E731
  for f in (fresh, derived):
    _assert_same_values_and_gradients(f, ref, x, a, b)
  # The SDS gradients themselves: s qa.T G and s G qb, no singular value of a factor.
  g = jax.jit(jax.grad(lambda a, b: jnp.sum(fresh(x, a, b)), argnums=(0, 1)))(a, b)
  big_g = 0.7 * x.reshape(-1, x.shape[-1]).T @ jnp.ones((15, b.shape[1]))
  np.testing.assert_allclose(g[0], big_g @ qb, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g[1], qa.T @ big_g, rtol=1e-4, atol=1e-4)


def test_fresh_op_in_the_warm_up_is_lora():
  x, a, b, qa, qb = _fresh_case()
  other, _ = jnp.linalg.qr(random_normal(jax.random.key(3), qa.shape))  # ignored in warm-up
  warm = lambda x, a, b: ops.warmup_sds_matmul(x, a, b, other, qb, 0.0, scale=0.7, fresh=True)  # noqa: E731
  ref = lambda x, a, b: x @ (0.7 * a @ b)  # noqa: E731
  _assert_same_values_and_gradients(warm, ref, x, a, b)


def test_fresh_op_runs_rank_r_projections_of_the_activations():
  # Forward: one r-wide projection of x (as LoRA), not the two-branch op's 2r.
  x, a, b, qa, qb = _fresh_case(d_in=64, d_out=48, r=4, n=(32,))

  def x_projections(f):
    jaxpr = jax.make_jaxpr(f)(x, a, b)
    # The up-projection carries a batch axis of size 1 (see ops._up_projection).
    return sorted(e.outvars[0].aval.shape[-1] for e in jaxpr.jaxpr.eqns
                  if e.primitive.name == "custom_vjp_call" for e in e.params["call_jaxpr"].eqns
                  if e.primitive.name == "dot_general"
                  and e.outvars[0].aval.shape[:-1] in ((32,), (1, 32)))

  fresh = x_projections(lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=1.0,
                                                              fresh=True))
  stale = x_projections(lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=1.0))
  lora = x_projections(lambda x, a, b: ops.lora_matmul(x, a, b, scale=1.0))
  assert fresh == lora == [4, 48], (fresh, lora)
  assert stale == [8, 48], stale


def test_fresh_op_costs_less_than_the_two_branch_op():
  x, a, b, qa, qb = _fresh_case(d_in=256, d_out=256, r=32, n=(512,))

  def flops(f):
    g = jax.jit(lambda x, a, b: _grads(f, x, a, b))
    return g.lower(x, a, b).compile().cost_analysis()["flops"]

  fresh = flops(lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=1.0, fresh=True))
  two = flops(lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=1.0))
  lora = flops(lambda x, a, b: ops.lora_matmul(x, a, b, scale=1.0))
  assert fresh < 0.8 * two and fresh < 1.25 * lora, (fresh, two, lora)


def test_stale_bases_need_the_two_branch_op():
  # Bases that no longer span the factors: the two-branch op (fresh=False, the default of
  # warmup_sds_matmul) is exact; the rank-r op computes a projected onto the bases.
  x, a, b, qa, qb = _fresh_case()
  moved = a + 0.1 * random_normal(jax.random.key(1), a.shape)
  ref = lambda x, a, b: x @ ops.sds_delta(a, b, scale=0.7, qa=qa, qb=qb)  # noqa: E731
  two = lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=0.7)  # noqa: E731
  _assert_same_values_and_gradients(two, ref, x, moved, b)
  given = lambda x, a, b: ops.sds_matmul(x, a, b, scale=0.7, qa=qa, qb=qb)  # noqa: E731
  _assert_same_values_and_gradients(given, ref, x, moved, b)
  fresh = lambda x, a, b: ops.warmup_sds_matmul(x, a, b, qa, qb, 1.0, scale=0.7, fresh=True)  # noqa: E731
  projected = x @ ops.sds_delta(qa @ (qa.T @ moved), b, scale=0.7, qa=qa, qb=qb)
  np.testing.assert_allclose(fresh(x, moved, b), projected, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(fresh(x, moved, b) - ref(x, moved, b)).max()) > 1e-2
