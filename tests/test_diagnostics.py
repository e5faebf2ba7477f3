"""Spectral diagnostics against numpy references written from the formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdslora_jax as sds
from sdslora_jax.adapter import take_layer
from sdslora_jax.basis import factor_bases
from sdslora_jax import diagnostics as diag
from testing_utils import big_intermediates, random_normal

D_IN, D_OUT, R, S = 12, 10, 3, 1.7


def _rand(seed, shape):
  return np.asarray(random_normal(jax.random.key(seed), shape, jnp.float32))


def _adapter(method, seed=0, a=None, b=None, sds_on=1.0):
  """A LoRA or SDS adapter with random (or given) factors and, for SDS, fresh bases."""
  ad = sds.init_adapter(jax.random.key(seed), D_IN, D_OUT, rank=R, scale=S, method=method)
  a = jnp.asarray(_rand(seed + 100, (D_IN, R)) if a is None else a, jnp.float32)
  # Uneven row norms: the factors are far from isotropic, as LoRA's are after training.
  b = jnp.asarray(_rand(seed + 200, (R, D_OUT)) * np.array([[3.0], [1.0], [0.2]])
                  if b is None else b, jnp.float32)
  ad = dataclasses.replace(ad, a=a, b=b)
  if method == "sds":
    qa, qb = factor_bases(a, b)
    ad = sds.restamp(dataclasses.replace(ad, qa=qa, qb=qb,
                                         sds_on=jnp.full((), sds_on, jnp.float32)))
  return ad


# numpy references
def _np_sv(m):
  return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)


def _np_erank(m):
  s = _np_sv(m)
  p = s / s.sum()
  p = p[p > 0]
  return np.exp(-np.sum(p * np.log(p)))


def _np_cond(m):
  s = _np_sv(m)
  return s[0] / s[-1]


def _np_stable_rank(m):
  m = np.asarray(m, np.float64)
  return np.sum(m**2) / np.linalg.norm(m, 2) ** 2


def _np_alignment(ad, g):
  """cos(G, D) with the induced direction D formed densely in float64."""
  g = np.asarray(g, np.float64)
  a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
  if ad.method == "sds" and float(ad.sds_on) == 1.0:
    qa, qb = np.asarray(ad.qa, np.float64), np.asarray(ad.qb, np.float64)
    d = qa @ qa.T @ g + g @ qb @ qb.T
  else:
    d = g @ b.T @ b + a @ a.T @ g
  return np.sum(g * d) / (np.linalg.norm(g) * np.linalg.norm(d))


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
def test_matrix_metrics_match_numpy(shape):
  m = _rand(1, shape) * np.linspace(0.1, 3.0, shape[1])  # uneven column scales
  np.testing.assert_allclose(diag.effective_rank(m), _np_erank(m), rtol=1e-5)
  np.testing.assert_allclose(diag.condition_number(m), _np_cond(m), rtol=1e-4)
  np.testing.assert_allclose(diag.stable_rank(m), _np_stable_rank(m), rtol=1e-5)
  for value in (diag.effective_rank(m), diag.condition_number(m), diag.stable_rank(m)):
    assert value.dtype == jnp.float32 and value.shape == ()


def test_matrix_metric_identities_and_edge_cases():
  np.testing.assert_allclose(diag.effective_rank(jnp.eye(R)), R, rtol=1e-6)
  np.testing.assert_allclose(diag.stable_rank(jnp.eye(R)), R, rtol=1e-6)
  rank1 = np.outer(_rand(2, (8,)), _rand(3, (5,)))
  np.testing.assert_allclose(diag.effective_rank(rank1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(diag.stable_rank(rank1), 1.0, rtol=1e-5)
  q, _ = np.linalg.qr(_rand(4, (9, 4)))
  np.testing.assert_allclose(diag.condition_number(q), 1.0, rtol=1e-5)
  np.testing.assert_allclose(diag.condition_number(q.T), 1.0, rtol=1e-5)
  zero = jnp.zeros((6, 3))
  assert float(diag.effective_rank(zero)) == 0.0
  assert float(diag.stable_rank(zero)) == 0.0
  assert float(diag.condition_number(zero)) == np.inf
  singular = jnp.diag(jnp.array([2.0, 1.0, 0.0]))
  assert float(diag.condition_number(singular)) == np.inf
  assert not np.isnan(float(diag.condition_number(singular)))
  np.testing.assert_allclose(diag.condition_number(jnp.diag(jnp.array([4.0, 0.5]))), 8.0)


def _kernel_grad_and_grads(ad, seed=7, batch=(2, 4)):
  """jax.grad of a squared loss through adapter_matmul, and the dense G from numpy."""
  x = _rand(seed, batch + (D_IN,))
  w0 = _rand(seed + 1, (D_IN, D_OUT))
  t = _rand(seed + 2, batch + (D_OUT,))

  def loss(adapter):
    y = x @ w0 + sds.adapter_matmul(x, adapter)
    return 0.5 * jnp.sum((y - t) ** 2)

  grads = jax.grad(loss)(ad)
  y = np.asarray(x @ w0 + sds.adapter_matmul(x, ad), np.float64)
  dy = (y - t).reshape(-1, D_OUT)
  g = np.asarray(x, np.float64).reshape(-1, D_IN).T @ dy  # G = dL/dK = x.T dL/dy
  return g, grads


def test_factor_diagnostics_lora_matches_numpy_and_gradient_identity():
  ad = _adapter("lora")
  g, grads = _kernel_grad_and_grads(ad)
  a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
  # The factor gradients are the other factor times G: g_b = s a.T G, g_a = s G b.T.
  np.testing.assert_allclose(grads.b, S * a.T @ g, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads.a, S * g @ b.T, rtol=1e-4, atol=1e-4)
  # The paper's point: with a = U diag(sigma) V.T, g_b has the singular values of
  # s diag(sigma) U.T G, i.e. U.T G rescaled row by row by a's singular values.
  u, sigma, _ = np.linalg.svd(a, full_matrices=False)
  np.testing.assert_allclose(_np_sv(grads.b), S * _np_sv(sigma[:, None] * (u.T @ g)), rtol=1e-4)
  out = diag.factor_diagnostics(ad, grads)
  assert set(out) == set(diag.FACTOR_METRICS)
  assert all(v.dtype == jnp.float32 and v.shape == () for v in out.values())
  np.testing.assert_allclose(out["grad_b_condition"], _np_cond(S * a.T @ g), rtol=1e-3)
  np.testing.assert_allclose(out["grad_a_condition"], _np_cond(S * g @ b.T), rtol=1e-3)
  np.testing.assert_allclose(out["grad_b_effective_rank"], _np_erank(a.T @ g), rtol=1e-4)
  np.testing.assert_allclose(out["grad_a_effective_rank"], _np_erank(g @ b.T), rtol=1e-4)
  np.testing.assert_allclose(out["a_condition"], _np_cond(a), rtol=1e-4)
  np.testing.assert_allclose(out["b_condition"], _np_cond(b), rtol=1e-4)
  np.testing.assert_allclose(out["a_stable_rank"], _np_stable_rank(a), rtol=1e-5)
  np.testing.assert_allclose(out["b_stable_rank"], _np_stable_rank(b), rtol=1e-5)


def test_factor_diagnostics_sds_gradients_go_through_the_bases():
  ad = _adapter("sds")
  g, grads = _kernel_grad_and_grads(ad)
  qa, qb = np.asarray(ad.qa, np.float64), np.asarray(ad.qb, np.float64)
  np.testing.assert_allclose(grads.b, S * qa.T @ g, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads.a, S * g @ qb, rtol=1e-4, atol=1e-4)
  # Singular values of the factors do not enter: g_b's are those of the projection of G.
  np.testing.assert_allclose(_np_sv(grads.b), S * _np_sv(qa @ qa.T @ g)[:R], rtol=1e-4)
  out = diag.factor_diagnostics(ad, grads)
  np.testing.assert_allclose(out["grad_b_condition"], _np_cond(qa.T @ g), rtol=1e-3)
  np.testing.assert_allclose(out["grad_a_condition"], _np_cond(g @ qb), rtol=1e-3)
  np.testing.assert_allclose(out["grad_b_effective_rank"], _np_erank(qa.T @ g), rtol=1e-4)
  np.testing.assert_allclose(out["grad_a_effective_rank"], _np_erank(g @ qb), rtol=1e-4)


def test_update_alignment_matches_dense_reference():
  g = _rand(11, (D_IN, D_OUT))
  lora, sds_ad = _adapter("lora"), _adapter("sds")
  warm = dataclasses.replace(sds_ad, sds_on=jnp.zeros((), jnp.float32), stamp=None)
  aligned = jax.jit(diag.update_alignment)  # one compiled function for both SDS phases
  cos_lora, cos_sds, cos_warm = (aligned(ad, g) for ad in (lora, sds_ad, warm))
  np.testing.assert_allclose(cos_lora, _np_alignment(lora, g), rtol=1e-5)
  np.testing.assert_allclose(cos_sds, _np_alignment(sds_ad, g), rtol=1e-5)
  np.testing.assert_allclose(cos_warm, cos_lora, rtol=1e-6)  # warm-up SDS adapter is LoRA
  assert abs(float(cos_lora) - float(cos_sds)) > 1e-3  # the two directions really differ
  assert cos_lora.dtype == jnp.float32 and cos_lora.shape == ()
  assert float(diag.update_alignment(lora, jnp.zeros((D_IN, D_OUT)))) == 0.0


def test_update_alignment_accepts_the_kernel_layout():
  g = _rand(12, (D_IN, D_OUT))
  flat = _adapter("lora")
  # A kernel (3, D_OUT, 4) whose input axes (0, 2) flatten to D_IN = 12.
  shaped = dataclasses.replace(flat, kernel_shape=(3, D_OUT, 4), in_axes=(0, 2))
  g_kernel = g.reshape(3, 4, D_OUT).transpose(0, 2, 1)
  np.testing.assert_allclose(diag.update_alignment(shaped, g_kernel),
                             _np_alignment(flat, g), rtol=1e-5)


def test_alignment_from_activations_equals_dense_path():
  x = _rand(21, (2, 5, D_IN))
  g = _rand(22, (2, 5, D_OUT))
  kernel_grad = x.reshape(-1, D_IN).T @ g.reshape(-1, D_OUT)
  for ad in (_adapter("lora"), _adapter("sds"), _adapter("sds", sds_on=0.0)):
    got = jax.jit(diag.update_alignment_from_activations)(ad, x, g)
    np.testing.assert_allclose(got, diag.update_alignment(ad, kernel_grad), rtol=1e-5)
    np.testing.assert_allclose(got, _np_alignment(ad, kernel_grad), rtol=1e-5)


def test_no_kernel_sized_intermediates():
  d_in, d_out, t = 64, 48, 8  # d_in * d_out = 3072 elements; T^2 and T d are far smaller
  ad = sds.init_adapter(jax.random.key(0), d_in, d_out, rank=R, scale=S, sds_on=True)
  x, g = jnp.ones((2, t // 2, d_in)), jnp.ones((2, t // 2, d_out))
  jaxpr = jax.make_jaxpr(diag.update_alignment_from_activations)(ad, x, g)
  big, _ = big_intermediates(jaxpr, d_in * d_out // 4)
  assert not big, big
  # The dense path takes G but forms no other kernel-sized value than its elementwise square.
  jaxpr = jax.make_jaxpr(diag.update_alignment)(ad, jnp.ones((d_in, d_out)))
  big, _ = big_intermediates(jaxpr, d_in * d_out)
  assert all(prim in ("mul", "convert_element_type") for prim, _ in big), big


def test_orthonormal_unit_factors_give_equal_alignments():
  qa_np, _ = np.linalg.qr(_rand(31, (D_IN, R)))
  qb_np, _ = np.linalg.qr(_rand(32, (D_OUT, R)))
  g = _rand(33, (D_IN, D_OUT))
  lora = _adapter("lora", a=qa_np, b=qb_np.T)
  sds_ad = _adapter("sds", a=qa_np, b=qb_np.T)  # bases from factor_bases, not given
  np.testing.assert_allclose(diag.update_alignment(lora, g), diag.update_alignment(sds_ad, g),
                             rtol=1e-5)
  # ... whereas rescaling the factors changes LoRA's direction and leaves SDS-LoRA's alone.
  stretched = np.array([4.0, 1.0, 0.25])
  lora2 = _adapter("lora", a=qa_np * stretched, b=qb_np.T / stretched[:, None])
  sds2 = _adapter("sds", a=qa_np * stretched, b=qb_np.T / stretched[:, None])
  np.testing.assert_allclose(diag.update_alignment(sds2, g), diag.update_alignment(sds_ad, g),
                             rtol=1e-5)
  assert abs(float(diag.update_alignment(lora2, g)) - float(diag.update_alignment(lora, g))) > 1e-3


def test_tree_diagnostics_under_jit():
  tree = {"enc": {"q": _adapter("lora", seed=1)}, "v": _adapter("sds", seed=2)}
  x = _rand(41, (6, D_IN))

  def loss(adapters):
    y = sds.adapter_matmul(x, adapters["enc"]["q"]) + sds.adapter_matmul(x, adapters["v"])
    return jnp.sum(jnp.tanh(y))

  grads = jax.grad(loss)(tree)
  out = jax.jit(diag.tree_diagnostics)(tree, grads)
  expected = {f"{p}/{m}" for p in ("enc/q", "v") for m in diag.FACTOR_METRICS}
  assert set(out) == expected
  for path, ad, gr in (("enc/q", tree["enc"]["q"], grads["enc"]["q"]),
                       ("v", tree["v"], grads["v"])):
    g_a = np.asarray(gr.a)
    np.testing.assert_allclose(out[f"{path}/grad_a_condition"], _np_cond(g_a), rtol=1e-3)
    np.testing.assert_allclose(out[f"{path}/b_stable_rank"], _np_stable_rank(ad.b), rtol=1e-5)


def test_bad_inputs_raise():
  ad = _adapter("lora")
  with pytest.raises(ValueError, match=r"\(10, 12\).*\(12, 10\)"):
    diag.update_alignment(ad, jnp.zeros((D_OUT, D_IN)))
  stacked = sds.Adapter(a=jnp.ones((2, D_IN, R)), b=jnp.ones((2, R, D_OUT)), method="lora",
                        kernel_shape=(2, D_IN, D_OUT), in_axes=(1,), layer_axes=(0,))
  for call in (lambda: diag.update_alignment(stacked, jnp.zeros((D_IN, D_OUT))),
               lambda: diag.factor_diagnostics(stacked, stacked)):
    with pytest.raises(ValueError, match="take_layer"):
      call()
  # A layer of it, sliced with take_layer, is accepted.
  assert diag.update_alignment(take_layer(stacked, 0), _rand(5, (D_IN, D_OUT))).shape == ()
  with pytest.raises(ValueError, match="grads.b has shape"):
    diag.factor_diagnostics(ad, dataclasses.replace(ad, b=jnp.zeros((R, D_OUT + 1))))
  with pytest.raises(ValueError, match="same leading axes"):
    diag.update_alignment_from_activations(ad, jnp.zeros((4, D_IN)), jnp.zeros((5, D_OUT)))
  with pytest.raises(ValueError, match="d_in=12"):
    diag.update_alignment_from_activations(ad, jnp.zeros((4, D_OUT)), jnp.zeros((4, D_OUT)))
  with pytest.raises(ValueError, match="2-D"):
    diag.effective_rank(jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="floating"):
    diag.stable_rank(jnp.zeros((3, 3), jnp.int32))


# ------------------------------------------------------------------------------------------
# step_metrics: what one update did, against dense references.


def _moved(ad, seed, scale=0.05, refresh=True):
  """``ad`` after a small random factor update; SDS bases refreshed from the new factors."""
  a1 = ad.a + scale * _rand(seed, ad.a.shape)
  b1 = ad.b + scale * _rand(seed + 1, ad.b.shape)
  out = dataclasses.replace(ad, a=a1, b=b1)
  if ad.method == "sds" and refresh:
    qa1, qb1 = factor_bases(a1, b1)
    out = dataclasses.replace(out, qa=qa1, qb=qb1)
  return out


def _dense_norm(m):
  return float(np.linalg.norm(np.asarray(m, np.float64)))


@pytest.mark.parametrize("method", ["lora", "sds"])
def test_step_metrics_match_dense_references(method):
  import scipy.linalg

  before = _adapter(method, seed=3, sds_on=1.0)
  after = _moved(before, seed=11)
  m = jax.jit(diag.step_metrics)(before, after)
  old_bases = dataclasses.replace(after, qa=before.qa, qb=before.qb) if method == "sds" else after
  want_step = _dense_norm(sds.kernel_delta(old_bases) - sds.kernel_delta(before))
  want_refresh = _dense_norm(sds.kernel_delta(after) - sds.kernel_delta(old_bases))
  np.testing.assert_allclose(float(m["step_change"]), want_step, rtol=1e-4)
  np.testing.assert_allclose(float(m["refresh_change"]), want_refresh, rtol=1e-3, atol=1e-7)
  if method == "lora":
    assert float(m["refresh_change"]) == 0.0
  else:
    assert float(m["refresh_change"]) > 0.0
    np.testing.assert_allclose(float(m["refresh_to_step"]), want_refresh / want_step, rtol=1e-3)
  a0, a1 = (np.asarray(x.a, np.float64) for x in (before, after))
  b0, b1 = (np.asarray(x.b, np.float64).T for x in (before, after))
  np.testing.assert_allclose(float(m["a_angle"]), scipy.linalg.subspace_angles(a0, a1).max(),
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(float(m["b_angle"]), scipy.linalg.subspace_angles(b0, b1).max(),
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(float(m["a_step"]), np.linalg.norm(a1 - a0), rtol=1e-5)
  np.testing.assert_allclose(float(m["b_norm"]), np.linalg.norm(b0), rtol=1e-5)


def test_step_metrics_across_the_switch():
  """With sds_lora: warm-up updates have no refresh part, the switch is flagged (NaN
  changes), the SDS-phase updates have one; the keys name every adapter."""
  import optax

  params = {"w": sds.init_adapter(jax.random.key(0), 12, 10, rank=3, scale=2.0),
            "v": sds.init_adapter(jax.random.key(1), 12, 10, rank=3, scale=2.0, method="lora")}
  x = _rand(5, (32, 12))
  y = _rand(6, (32, 10))
  tx = sds.sds_lora(optax.adam(1e-2), warmup_steps=2)
  state = tx.init(params)
  loss = lambda p: jnp.mean((sds.adapter_matmul(x, p["w"]) + sds.adapter_matmul(x, p["v"]) - y) ** 2)
  rows = []
  for _ in range(4):
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state, params)
    after = optax.apply_updates(params, updates)
    rows.append(diag.tree_step_metrics(params, after))
    params = after
  assert set(rows[0]) == {f"{k}/{n}" for k in ("w", "v") for n in (
      "a_norm", "b_norm", "a_step", "b_step", "a_angle", "b_angle", "step_change",
      "refresh_change", "refresh_to_step", "switched")}
  switched = [float(r["w/switched"]) for r in rows]
  assert switched == [0.0, 1.0, 0.0, 0.0]
  assert np.isnan(float(rows[1]["w/step_change"])) and np.isnan(float(rows[1]["w/refresh_change"]))
  assert float(rows[0]["w/refresh_change"]) == 0.0 and float(rows[0]["w/step_change"]) > 0
  assert all(float(r["w/refresh_change"]) > 0 for r in rows[2:])
  assert all(float(r["v/refresh_change"]) == 0.0 and float(r["v/switched"]) == 0.0 for r in rows)


def test_step_metrics_refuse_two_different_adapters():
  with pytest.raises(ValueError, match="same adapter"):
    diag.step_metrics(_adapter("lora", seed=0), _adapter("sds", seed=0))
