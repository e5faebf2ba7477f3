"""A sharded train step on 8 simulated CPU devices equals the single-device step.

``tests/conftest.py`` gives this process 8 CPU devices. Mesh ``(data, fsdp,
tensor) = (2, 2, 2)``; base kernels and adapters sharded along their feature
axes, the batch along ``data``; adapters and optimizer state donated.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sdslora_jax as sds
from sdslora_jax.gram_basis import gram_orthonormal_basis
from sdslora_jax import sharding
from sdslora_jax.adapter import with_fresh_bases
from sdslora_jax.optim import sds_lora, trainable_params
from testing_utils import random_normal

D_IN, D_HID, D_OUT, RANK, BATCH = 256, 128, 64, 8, 32
WARMUP = 2



def _mesh():
  # Auto axes: XLA's partitioner picks the collectives (jax.make_mesh defaults to Explicit).
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)


def _problem(method, rank=RANK):
  k = jax.random.split(jax.random.key(0), 6)
  base = {"w1": random_normal(k[0], (D_IN, D_HID)) / np.sqrt(D_IN),
          "w2": random_normal(k[1], (D_HID, D_OUT)) / np.sqrt(D_HID)}
  ads = {"w1": sds.init_adapter(k[2], D_IN, D_HID, rank=rank, scale=2.0, method=method),
         "w2": sds.init_adapter(k[3], D_HID, D_OUT, rank=rank, scale=2.0, method=method)}
  x = random_normal(k[4], (BATCH, D_IN))
  y = random_normal(k[5], (BATCH, D_OUT))
  return base, ads, x, y


def _loss(ads, base, x, y):
  h = jnp.tanh(x @ base["w1"] + sds.adapter_matmul(x, ads["w1"]))
  out = h @ base["w2"] + sds.adapter_matmul(h, ads["w2"])
  return jnp.mean((out - y) ** 2)


def _step_fn(tx):
  def step(ads, opt_state, base, x, y):
    loss, grads = jax.value_and_grad(_loss)(ads, base, x, y)
    updates, opt_state = tx.update(grads, opt_state, ads)
    return optax.apply_updates(ads, updates), opt_state, loss

  return step


def _adapter_specs(ads, kernel_specs):
  """Down factor: the kernel's input spec; up factor: its output spec; rank never sharded."""
  out = {}
  for name, ad in ads.items():
    k_in, k_out = kernel_specs[name]
    fields = dict(a=P(k_in, None), b=P(None, k_out))
    if ad.method == "sds":
      fields.update(qa=P(k_in, None), qb=P(k_out, None), sds_on=P(), stamp=P())
    out[name] = dataclasses.replace(ad, **fields)  # the adapter's static fields kept
  return out


KERNEL_SPECS = {"w1": ("fsdp", "tensor"), "w2": ("tensor", "fsdp")}


def _shardings(mesh, tree_of_specs):
  return jax.tree.map(lambda p: NamedSharding(mesh, p), tree_of_specs,
                      is_leaf=lambda p: isinstance(p, P))


def _collectives(hlo: str, op: str):
  """``[(dtype, shape)]`` of the (first) result of every ``op`` in an HLO module's text."""
  found = []
  pattern = r"=\s*\(?([a-z0-9]+)\[([\d,]*)\][^=\n]*?\b" + op + r"(?:-start)?\("
  for m in re.finditer(pattern, hlo):
    found.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
  return found


def _all_gathers(hlo: str):
  return _collectives(hlo, "all-gather")


# SDS with fresh_bases: the rank-r op (the default); without: the two-branch op.
@pytest.mark.parametrize("method, fresh", [("lora", True), ("sds", True), ("sds", False)])
def test_sharded_step_equals_single_device(method, fresh):
  mesh = _mesh()
  rank = RANK
  base, ads, x, y = _problem(method, rank)
  ads = with_fresh_bases(ads, fresh)
  # SGD with momentum (state to shard, no Adam division that turns 1e-7 gradient round-off of
  # near-zero entries into 1e-3 relative update differences).
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
  tx = sds_lora(inner, warmup_steps=WARMUP)
  step = _step_fn(tx)

  # Single device reference.
  ref_step = jax.jit(step)
  r_ads, r_state = ads, tx.init(ads)
  ref = []
  for _ in range(WARMUP + 3):  # warm-up, the switch, after it
    r_ads, r_state, loss = ref_step(r_ads, r_state, base, x, y)
    ref.append((float(loss), r_ads))

  # Sharded: explicit in/out shardings, donated adapters and optimizer state.
  ad_sh = sharding.adapter_shardings(ads, {k: P(*v) for k, v in KERNEL_SPECS.items()}, mesh=mesh)
  want_sh = _shardings(mesh, _adapter_specs(ads, KERNEL_SPECS))  # the documented layout
  assert jax.tree.map(lambda s: s.spec, ad_sh) == jax.tree.map(lambda s: s.spec, want_sh)
  base_sh = _shardings(mesh, {k: P(*v) for k, v in KERNEL_SPECS.items()})
  x_sh, rep = NamedSharding(mesh, P("data", "fsdp")), NamedSharding(mesh, P())
  y_sh = NamedSharding(mesh, P("data", None))
  state_shape = jax.eval_shape(tx.init, ads)
  state_sh = sharding.opt_state_shardings(tx, ads, ad_sh, mesh=mesh)
  inner_sh = optax.tree_utils.tree_map_params(  # an independent derivation of the same
      inner, lambda p, s: s, state_shape.inner_state, trainable_params(ad_sh),
      transform_non_params=lambda _: rep, is_leaf=lambda v: isinstance(v, NamedSharding))
  specs = lambda t: jax.tree.map(lambda s: s.spec, t)
  assert specs(state_sh) == specs(state_shape._replace(count=rep, num_refreshes=rep,
                                                       inner_state=inner_sh))
  sharded_ads = jax.device_put(ads, ad_sh)
  init = jax.jit(tx.init, out_shardings=state_sh)
  s_state = init(sharded_ads)
  s_step = jax.jit(step, in_shardings=(ad_sh, state_sh, base_sh, x_sh, y_sh),
                   out_shardings=(ad_sh, state_sh, rep), donate_argnums=(0, 1))
  s_base = jax.device_put(base, base_sh)
  s_x, s_y = jax.device_put(x, x_sh), jax.device_put(y, y_sh)
  s_ads = sharded_ads
  worst = 0.0
  for t in range(WARMUP + 3):
    s_ads, s_state, loss = s_step(s_ads, s_state, s_base, s_x, s_y)
    want_loss, want_ads = ref[t]
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for name in ads:
      got, want = s_ads[name], want_ads[name]
      for f in ("a", "b", "qa", "qb", "sds_on"):
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
          continue
        rel = float(jnp.linalg.norm(g - w) / max(float(jnp.linalg.norm(w)), 1e-30))
        assert rel <= 1e-5, (name, f, t, rel)
        worst = max(worst, rel)
      assert got.a.sharding.spec == P(KERNEL_SPECS[name][0], None)
    print(f"{method} step {t + 1}: loss {float(loss):.6f} (single device {want_loss:.6f}), "
          f"max relative adapter difference so far {worst:.1e}")
  if method == "sds":
    assert all(float(s_ads[n].sds_on) == 1.0 for n in ads)

  # No all-gather materialises a whole factor or basis: bases come from r x r Gram matrices.
  hlo = s_step.lower(sharded_ads, init(sharded_ads), s_base, s_x, s_y).compile().as_text()
  factor_shapes = {(D_IN, rank), (D_HID, rank), (D_OUT, rank), (rank, D_HID), (rank, D_OUT)}
  gathers = _all_gathers(hlo)
  print(f"{method} step HLO: all-gathers {sorted(set(gathers))}; all-reduces "
        f"{sorted(set(_collectives(hlo, 'all-reduce')))}")
  assert not [g for g in gathers if g[1] in factor_shapes], gathers
  assert "all-reduce" in hlo


def test_gather_checker_sees_householder_gathering():
  """The HLO check can fail: Householder QR of a sharded factor all-gathers it."""
  mesh = _mesh()
  a = jax.device_put(random_normal(jax.random.key(0), (D_IN, RANK)),
                     NamedSharding(mesh, P("fsdp", None)))
  hh = jax.jit(sds.orthonormal_basis).lower(a).compile().as_text()
  gram = jax.jit(gram_orthonormal_basis).lower(a).compile().as_text()
  assert ("f32", (D_IN, RANK)) in _all_gathers(hh)
  assert ("f32", (D_IN, RANK)) not in _all_gathers(gram)
