"""Adapter trees: init, kernel layouts, rank-r paths against dense references, merge."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdslora_jax import tree
from sdslora_jax.adapter import matrix_delta, is_adapter, kernel_delta
from sdslora_jax.targets import rule
from testing_utils import random_adapter, random_normal


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "dense": {"kernel": random_normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
      "q": {"kernel": random_normal(k[1], (8, 2, 4)).astype(jnp.bfloat16)},
      "o": {"kernel": random_normal(k[2], (2, 4, 8))},
  }


def test_init_is_zero_update_and_mirrors_params():
  params = _params()
  ads = tree.init_adapters(jax.random.key(1), params, [rule(".*kernel", rank=2)])
  assert set(ads) == {"dense", "q", "o"} and set(ads["dense"]) == {"kernel"}
  assert ads["q"]["kernel"].kernel_shape == (8, 2, 4) and ads["q"]["kernel"].in_axes == (0,)
  assert ads["o"]["kernel"].in_axes == (0, 1) and ads["o"]["kernel"].shape == (8, 8)
  merged = tree.merge(params, ads)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  keys = [jax.tree.leaves(ads, is_leaf=is_adapter)[i].a for i in range(3)]
  assert not np.allclose(keys[0][:2, :2], keys[2][:2, :2])  # independent keys


@pytest.mark.parametrize("shape,in_axes", [((6, 5), (0,)), ((8, 2, 4), (0,)), ((2, 4, 8), (0, 1)),
                                           ((3, 5, 7), (1,)), ((3, 3, 2, 4), (0, 1, 2))])
def test_kernel_delta_layout(shape, in_axes):
  ad = random_adapter(jax.random.key(2), shape, in_axes)
  flat = np.asarray(matrix_delta(ad))
  got = np.asarray(kernel_delta(ad))
  assert got.shape == shape
  out_axes = [i for i in range(len(shape)) if i not in in_axes]
  for idx in np.ndindex(*shape):  # element-wise independent reference
    i = np.ravel_multi_index([idx[a] for a in in_axes], [shape[a] for a in in_axes])
    o = np.ravel_multi_index([idx[a] for a in out_axes], [shape[a] for a in out_axes])
    assert got[idx] == flat[i, o]


@pytest.mark.parametrize("method,sds_on", [("lora", 0.0), ("sds", 0.0), ("sds", 1.0)])
def test_apply_dense_general_matches_dense(method, sds_on):
  ad = random_adapter(jax.random.key(3), (3, 5, 7), (0, 2), method=method, sds_on=sds_on)
  x = random_normal(jax.random.key(4), (7, 2, 3))  # contract axes (2, 0) with kernel (0, 2)

  def fast(ad):
    return jnp.sum(tree.apply_dense_general(x, ad, (2, 0)) ** 2)

  def dense(ad):
    return jnp.sum(jnp.tensordot(x, kernel_delta(ad), axes=((2, 0), (0, 2))) ** 2)

  np.testing.assert_allclose(fast(ad), dense(ad), rtol=1e-5)
  g1, g2 = jax.grad(fast)(ad), jax.grad(dense)(ad)
  np.testing.assert_allclose(g1.a, g2.a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g1.b, g2.b, rtol=1e-4, atol=1e-4)


def test_apply_einsum_and_embedding_match_dense():
  ad = random_adapter(jax.random.key(5), (2, 4, 8), (0, 1))
  x = random_normal(jax.random.key(6), (3, 5, 4, 2))
  eq = "btkh,hkd->dbt"
  np.testing.assert_allclose(tree.apply_einsum(x, ad, eq), jnp.einsum(eq, x, kernel_delta(ad)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"contracts kernel axes \(0,\) but the adapter's input axes are \(0, 1\)"):
    tree.apply_einsum(x[..., 0, :], ad, "bth,hkd->btkd")
  emb = random_adapter(jax.random.key(7), (10, 6), (0,), kind="embed")
  ids = jnp.array([[1, 3, 9], [0, 0, 4]])
  q = random_normal(jax.random.key(8), (2, 6))

  def fast(ad):
    return jnp.sum(tree.lookup_embedding(ids, ad) ** 2) + jnp.sum(jnp.sin(tree.attend_embedding(q, ad)))

  def dense(ad):
    d = kernel_delta(ad)
    return jnp.sum(d[ids] ** 2) + jnp.sum(jnp.sin(q @ d.T))

  np.testing.assert_allclose(fast(emb), dense(emb), rtol=1e-5)
  g1, g2 = jax.grad(fast)(emb), jax.grad(dense)(emb)
  np.testing.assert_allclose(g1.a, g2.a, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g1.b, g2.b, rtol=1e-4, atol=1e-5)


def test_merge_values_and_errors():
  params = _params()
  ad = random_adapter(jax.random.key(9), (2, 4, 8), (0, 1))
  merged = tree.merge(params, {"o": {"kernel": ad}})
  np.testing.assert_allclose(merged["o"]["kernel"], params["o"]["kernel"] + kernel_delta(ad), rtol=1e-6)
  assert merged["dense"]["kernel"] is params["dense"]["kernel"]
  with pytest.raises(ValueError, match=r"adapters at \['x/kernel'\] have no parameter"):
    tree.merge(params, {"x": {"kernel": ad}})
  with pytest.raises(ValueError, match=r"adapter at 'dense/kernel' is for a kernel of shape \(2, 4, 8\).*\(6, 5\)"):
    tree.merge(params, {"dense": {"kernel": ad}})
  with pytest.raises(TypeError, match="non-Adapter leaf at 'dense/kernel'"):
    tree.merge(params, {"dense": {"kernel": jnp.zeros(3)}})


def test_merge_gradient_is_sds_rule():
  # Independent check of the SDS rule through merge: dL/db = s qa.T G, dL/da = s G qb.
  ad = random_adapter(jax.random.key(10), (6, 5), (0,))
  params = _params()
  target = random_normal(jax.random.key(11), (6, 5))

  def loss(ad):
    return 0.5 * jnp.sum((tree.merge(params, {"dense": {"kernel": ad}})["dense"]["kernel"] - target) ** 2)

  g = jax.grad(loss)(ad)
  big_g = params["dense"]["kernel"] + kernel_delta(ad) - target
  np.testing.assert_allclose(g.b, ad.scale * ad.qa.T @ big_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g.a, ad.scale * big_g @ ad.qb, rtol=1e-5, atol=1e-5)
  lora = dataclasses.replace(ad, sds_on=jnp.float32(0.0))
  g = jax.grad(loss)(lora)
  big_g = params["dense"]["kernel"] + kernel_delta(lora) - target
  np.testing.assert_allclose(g.b, lora.scale * lora.a.T @ big_g, rtol=1e-5, atol=1e-5)
