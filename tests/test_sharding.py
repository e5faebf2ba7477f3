"""Adapter and optimizer-state shardings derived from the base kernels' shardings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sdslora_jax as sl
from sdslora_jax import tree
from sdslora_jax.adapter import Adapter, adapter_stamp, is_adapter
from sdslora_jax.optim import SdsLoraState, sds_lora
from sdslora_jax.sharding import adapter_shardings, adapter_spec, opt_state_shardings
from sdslora_jax.targets import rule
from testing_utils import random_normal

R = 4


@pytest.fixture(scope="module")
def mesh():
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)


def _base_params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "dense": {"kernel": random_normal(k[0], (64, 32))},
      "attn": {
          "query": {"kernel": random_normal(k[1], (64, 4, 8))},
          "out": {"kernel": random_normal(k[2], (4, 8, 64))},
      },
      "embed": {"embedding": random_normal(k[3], (100, 64))},
  }


BASE_SPECS = {
    "dense": {"kernel": P("fsdp", "tensor")},
    "attn": {"query": {"kernel": P("fsdp", "tensor", None)},
             "out": {"kernel": P("tensor", None, "fsdp")}},
    "embed": {"embedding": P("data", ("fsdp", "tensor"))},
    "stack": {"kernel": P(None, "fsdp", "tensor")},
}

_stamp = jax.jit(adapter_stamp)


def _adapter(key, kernel_shape, in_axes, method="sds", layer_axes=None, kind=None, sds_on=1.0):
  """A random adapter for a kernel (bases random, not orthonormal: layouts only need shapes)."""
  lead = tuple(kernel_shape[i] for i in layer_axes or ())
  d_in = int(np.prod([kernel_shape[i] for i in in_axes]))
  d_out = int(np.prod(kernel_shape)) // d_in // int(np.prod(lead))
  k = jax.random.split(key, 4)
  ad = Adapter(a=random_normal(k[0], (*lead, d_in, R)) / 8,
               b=random_normal(k[1], (*lead, R, d_out)) / 2, method=method, scale=0.5,
               kernel_shape=kernel_shape, in_axes=in_axes, kind=kind, layer_axes=layer_axes)
  if method == "lora":
    return ad
  qa, qb = random_normal(k[2], (*lead, d_in, R)), random_normal(k[3], (*lead, d_out, R))
  sds_on = jnp.full(lead, sds_on, jnp.float32)
  stamp = _stamp
  for _ in lead:
    stamp = jax.vmap(stamp)
  return dataclasses.replace(ad, qa=qa, qb=qb, sds_on=sds_on,
                             stamp=stamp(ad.a, ad.b, qa, qb, sds_on))


def _stacked_adapter(layers=3):
  """A stacked SDS adapter: kernel (layers, 64, 32), layer axis 0."""
  return _adapter(jax.random.key(7), (layers, 64, 32), (1,), layer_axes=(0,))


def _adapters(stacked=True, sds_on=1.0):
  k = jax.random.split(jax.random.key(1), 4)
  ads = {
      "dense": {"kernel": _adapter(k[0], (64, 32), (0,), sds_on=sds_on)},
      "attn": {"query": {"kernel": _adapter(k[1], (64, 4, 8), (0,), sds_on=sds_on)},
               "out": {"kernel": _adapter(k[2], (4, 8, 64), (0, 1), method="lora")}},
      "embed": {"embedding": _adapter(k[3], (100, 64), (0,), kind="embed", sds_on=sds_on)},
  }
  if stacked:
    ads["stack"] = {"kernel": _stacked_adapter()}
  return ads


EXPECTED = {
    ("dense", "kernel"): dict(a=P("fsdp", None), b=P(None, "tensor"), qa=P("fsdp", None),
                              qb=P("tensor", None), sds_on=P(), stamp=P()),
    ("attn", "query", "kernel"): dict(a=P("fsdp", None), b=P(None, "tensor"),
                                      qa=P("fsdp", None), qb=P("tensor", None),
                                      sds_on=P(), stamp=P()),
    ("attn", "out", "kernel"): dict(a=P("tensor", None), b=P(None, "fsdp"), qa=None, qb=None,
                                    sds_on=None, stamp=None),
    ("embed", "embedding"): dict(a=P("data", None), b=P(None, ("fsdp", "tensor")),
                                 qa=P("data", None), qb=P(("fsdp", "tensor"), None),
                                 sds_on=P(), stamp=P()),
    ("stack", "kernel"): dict(a=P(None, "fsdp", None), b=P(None, None, "tensor"),
                              qa=P(None, "fsdp", None), qb=P(None, "tensor", None),
                              sds_on=P(None), stamp=P(None)),
}


def _get(t, keys):
  for k in keys:
    t = t[k]
  return t


def _check(shardings, expected, mesh=None):
  for keys, want in expected.items():
    got = _get(shardings, keys)
    assert is_adapter(got), keys
    for field, spec in want.items():
      s = getattr(got, field)
      if spec is None:
        assert s is None, (keys, field, s)
      elif mesh is None:
        assert isinstance(s, P) and s == spec, (keys, field, s, spec)
      else:
        assert isinstance(s, NamedSharding) and s.mesh == mesh and s.spec == spec, (
            keys, field, s, spec)


def test_specs_from_partition_specs(mesh):
  ads = _adapters()
  _check(adapter_shardings(ads, BASE_SPECS), EXPECTED)
  _check(adapter_shardings(ads, BASE_SPECS, mesh=mesh), EXPECTED, mesh)
  # NamedSharding entries carry the mesh; abstract adapters give the same result.
  named = jax.tree.map(lambda s: NamedSharding(mesh, s), BASE_SPECS,
                       is_leaf=lambda x: isinstance(x, P))
  abstract = jax.eval_shape(lambda: ads)
  _check(adapter_shardings(abstract, named), EXPECTED, mesh)
  # The result has the adapter tree's structure, static fields included.
  out = adapter_shardings(abstract, named)
  assert jax.tree.structure(out) == jax.tree.structure(ads)
  assert out["stack"]["kernel"].layer_axes == (0,)


def test_specs_from_sharded_arrays(mesh):
  params = _base_params()
  params["stack"] = {"kernel": jnp.zeros((3, 64, 32))}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                         BASE_SPECS, is_leaf=lambda x: isinstance(x, P))
  _check(adapter_shardings(_adapters(), sharded), EXPECTED, mesh)
  # Unsharded kernels (plain arrays, single-device arrays, None) give replicated adapters.
  out = adapter_shardings({"dense": {"kernel": _adapters()["dense"]["kernel"]}},
                          {"dense": {"kernel": np.zeros((64, 32))}})
  assert out["dense"]["kernel"].a == P(None, None) and out["dense"]["kernel"].sds_on == P()
  out = adapter_shardings(_adapters(False), jax.tree.map(lambda x: None, params))
  assert out["attn"]["query"]["kernel"].qb == P(None, None)


def test_stacked_layer_axes(mesh):
  """Layer axes keep the kernel's spec, also when they are not the leading axes."""
  ad = _stacked_adapter(layers=4)
  got = adapter_spec(ad, P("data", "fsdp", "tensor"), mesh=mesh)
  assert (got.a, got.b, got.qa, got.qb) == (
      P("data", "fsdp", None), P("data", None, "tensor"), P("data", "fsdp", None),
      P("data", "tensor", None))
  assert got.sds_on == P("data") and got.stamp == P("data")
  # Kernel (64, 4, 32) with the layers on axis 1.
  mid = Adapter(a=jnp.zeros((4, 64, R)), b=jnp.zeros((4, R, 32)), method="lora",
                kernel_shape=(64, 4, 32), in_axes=(0,), layer_axes=(1,))
  got = adapter_spec(mid, P("fsdp", "data", "tensor"))
  assert (got.a, got.b, got.qa, got.sds_on) == (P("data", "fsdp", None),
                                                 P("data", None, "tensor"), None, None)


# (kernel shape, in_axes, kernel spec, d_in entry with a mesh, d_out entry, d_in without a mesh)
FLATTEN_CASES = [
    ((4, 8, 64), (0, 1), P("tensor", None, "fsdp"), "tensor", "fsdp", "tensor"),
    ((2, 8, 64), (0, 1), P("tensor", "data", "fsdp"), ("tensor", "data"), "fsdp", None),
    ((4, 8, 64), (0, 1), P(None, "tensor", "fsdp"), None, "fsdp", None),
    ((4, 8, 64), (0, 1), P("tensor", "data", "fsdp"), None, "fsdp", None),
    ((1, 8, 64), (0, 1), P(None, "tensor", "fsdp"), "tensor", "fsdp", "tensor"),
    ((64, 4, 8), (0,), P("fsdp", "tensor", None), "fsdp", "tensor", "fsdp"),
    ((64, 2, 8), (0,), P("fsdp", "tensor", "data"), "fsdp", ("tensor", "data"), "fsdp"),
    ((64, 4, 8), (0,), P("fsdp", "tensor", "data"), "fsdp", None, "fsdp"),
    ((2, 64, 8), (1,), P("tensor", "fsdp", "data"), "fsdp", ("tensor", "data"), "fsdp"),
    ((4, 64, 8), (1,), P("tensor", "fsdp", "data"), "fsdp", None, "fsdp"),
    ((3, 3, 16, 32), (0, 1, 2), P(None, None, "fsdp", "tensor"), None, "tensor", None),
]


def _device_elements(x):
  return {s.device: np.sort(np.asarray(s.data).ravel()) for s in x.addressable_shards}


@pytest.mark.parametrize("shape,in_axes,spec,want_in,want_out,no_mesh_in", FLATTEN_CASES)
def test_flatten_rule_matches_reshape(mesh, shape, in_axes, spec, want_in, want_out, no_mesh_in):
  """A flattened side is sharded exactly when every device then holds the kernel's elements."""
  ad = Adapter(a=jnp.zeros((0, R)), b=jnp.zeros((R, 0)), method="lora", kernel_shape=shape,
               in_axes=in_axes)
  out_axes = ad.output_axes
  d_in = int(np.prod([shape[i] for i in in_axes]))
  d_out = int(np.prod([shape[i] for i in out_axes]))
  ad = dataclasses.replace(ad, a=jnp.zeros((d_in, R)), b=jnp.zeros((R, d_out)))
  got = adapter_spec(ad, spec, mesh=mesh)
  assert got.a == P(want_in, None) and got.b == P(None, want_out)
  assert adapter_spec(ad, spec).a == P(no_mesh_in, None)

  kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  flat = kernel.transpose(in_axes + out_axes).reshape(d_in, d_out)

  def same_blocks(kernel_spec, flat_spec):
    k_elems = _device_elements(jax.device_put(kernel, NamedSharding(mesh, kernel_spec)))
    f_elems = _device_elements(jax.device_put(flat, NamedSharding(mesh, flat_spec)))
    return all(np.array_equal(k_elems[d], e) for d, e in f_elems.items())

  # Each side alone: the kernel sharded on that side's axes only, the flat array on that side.
  for side, want, axes in ((0, want_in, in_axes), (1, want_out, out_axes)):
    kernel_side = P(*(spec[i] if i in axes else None for i in range(len(shape))))
    if want is not None:
      assert same_blocks(kernel_side, P(*(want if j == side else None for j in (0, 1))))
    naive = tuple(n for i in axes for n in ((spec[i],) if isinstance(spec[i], str) else
                                            (spec[i] or ())))
    if want is None and naive:  # left unsharded: the plain concatenation is another layout
      assert not same_blocks(kernel_side, P(*(naive if j == side else None for j in (0, 1))))
  if want_in is not None and want_out is not None:
    assert same_blocks(spec, P(want_in, want_out))
  if in_axes == tuple(range(len(in_axes))) and want_in and want_out:
    # A jitted reshape to the derived layout moves no data.
    f = jax.jit(lambda k: k.reshape(d_in, d_out), in_shardings=NamedSharding(mesh, spec),
                out_shardings=NamedSharding(mesh, P(want_in, want_out)))
    hlo = f.lower(kernel).compile().as_text()
    assert not any(c in hlo for c in ("all-to-all", "all-gather", "collective-permute"))


def test_linen_logical_partitioning(mesh):
  nn = pytest.importorskip("flax.linen")
  from sdslora_jax import linen as slinen

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.initializers.lecun_normal()
      x = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
      return nn.Dense(64, kernel_init=nn.with_partitioning(init, ("tensor", None)))(x)

  model = Model()
  x = jnp.ones((2, 64))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert isinstance(variables["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  params = nn.unbox(variables["params"])
  ads = slinen.init_adapters(jax.random.key(0), model, params, [rule(r"Dense_\d/kernel", rank=R)])
  rules = (("embed", "fsdp"), ("mlp", "tensor"))
  want = {("Dense_0", "kernel"): dict(a=P("fsdp", None), b=P(None, "tensor"),
                                      qa=P("fsdp", None), qb=P("tensor", None)),
          ("Dense_1", "kernel"): dict(a=P("tensor", None), b=P(None, None))}
  _check(adapter_shardings(ads, variables, mesh=mesh, rules=rules), want, mesh)  # whole variables
  _check(adapter_shardings(ads, variables["params"], rules=rules), want)
  with nn.logical_axis_rules(rules):  # Flax's context rules
    _check(adapter_shardings(ads, variables["params"]), want)
  with pytest.raises(ValueError, match="no logical-axis rules"):
    adapter_shardings(ads, variables["params"])
  # nn.get_partition_spec gives logical specs: translate them, then they are mesh axes.
  # (logical_to_mesh treats every name as logical: Dense_1's "tensor" has no rule.)
  specs = nn.logical_to_mesh(nn.get_partition_spec(variables), rules)
  _check(adapter_shardings(ads, specs), {("Dense_0", "kernel"): want[("Dense_0", "kernel")]})
  with pytest.raises(ValueError, match="lacks"):
    adapter_shardings(ads, nn.get_partition_spec(variables), mesh=mesh)


def test_nnx_partitioning(mesh):
  nnx = pytest.importorskip("flax.nnx")
  from sdslora_jax import nnx as snnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.up = nnx.Linear(64, 32, kernel_init=nnx.with_partitioning(init, ("fsdp", "tensor")),
                           rngs=rngs)
      self.down = nnx.Linear(32, 64, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                             rngs=rngs)

    def __call__(self, x):
      return self.down(self.up(x))

  rules = (("embed", "fsdp"), ("mlp", "tensor"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = Model(nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
  assert model.up.kernel.get_metadata()["out_sharding"] == ("fsdp", "tensor")
  base = nnx.state(model, nnx.Param)
  want = {("up", "kernel"): dict(a=P("fsdp", None), b=P(None, "tensor"), qa=P("fsdp", None),
                                 qb=P("tensor", None), sds_on=P(), stamp=P()),
          ("down", "kernel"): dict(a=P("tensor", None), b=P(None, "fsdp"))}
  x = random_normal(jax.random.key(3), (8, 64))
  y0 = model(x)
  snnx.adapt(model, [rule("(up|down)/kernel", rank=R)], key=jax.random.key(1), sds_on=True)
  ads = snnx.adapters(model)
  _check(adapter_shardings(ads, base, mesh=mesh, rules=rules), want, mesh)
  # An abstract model's values carry an AbstractMesh: it gives sizes, not NamedShardings.
  _check(adapter_shardings(ads, nnx.state(abstract, nnx.Param), rules=rules), want)
  # The adapted model's own state (kernels under .../base/kernel); the kernels' mesh is found.
  _check(adapter_shardings(ads, nnx.state(model, nnx.Param), rules=rules), want, mesh)
  # The AdapterVariable state: Variables come back holding the shardings.
  state = snnx.adapter_state(model)
  sh = adapter_shardings(state, model, rules=rules)
  assert isinstance(sh["up"]["adapter"], snnx.AdapterVariable)
  _check({k[0]: {k[1]: sh[k[0]]["adapter"].get_value()} for k in want}, want, mesh)
  placed = jax.device_put(state, sh)
  assert placed["up"]["adapter"].get_value().a.sharding.spec == P("fsdp", None)
  nnx.update(model, placed)
  np.testing.assert_allclose(model(x), y0, rtol=1e-5, atol=1e-5)  # zero update: same model
  # Without rules (and no context rules) the logical names "mlp"/"embed" are kept as mesh axes.
  with pytest.raises(ValueError, match="lacks"):
    adapter_shardings(ads, base, mesh=mesh)


def _rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)


def test_sharded_adapters_compute_the_same(mesh):
  params = _base_params()
  ads = _adapters()
  sh = adapter_shardings(ads, BASE_SPECS, mesh=mesh)
  placed = jax.device_put(ads, sh)
  # The rank axis is never split: every shard holds all r columns (rows of b).
  for ad in jax.tree.leaves(placed, is_leaf=is_adapter):
    for name in ("a", "qa", "qb"):
      x = getattr(ad, name)
      if x is not None:
        assert all(s.data.shape[-1] == R for s in x.addressable_shards)
    assert all(s.data.shape[-2] == R for s in ad.b.addressable_shards)
  assert placed["dense"]["kernel"].a.addressable_shards[0].data.shape == (32, R)
  assert placed["stack"]["kernel"].b.addressable_shards[0].data.shape == (3, R, 16)

  stack = placed.pop("stack")["kernel"]
  sh.pop("stack")
  ads.pop("stack")
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), {k: v for k, v in BASE_SPECS.items()
                                                      if k != "stack"},
                     is_leaf=lambda x: isinstance(x, P))
  p_placed = jax.device_put(params, psh)
  x_sh = NamedSharding(mesh, P("data", "fsdp"))
  x = random_normal(jax.random.key(4), (8, 64))
  ids = jnp.arange(16).reshape(2, 8) * 6 % 100

  def fwd(p, a, x, ids):
    merged = tree.merge(p, a)
    h = sl.adapter_matmul(x, a["dense"]["kernel"])
    q = tree.apply_dense_general(x, a["attn"]["query"]["kernel"])
    o = tree.apply_dense_general(q, a["attn"]["out"]["kernel"], axis=(-2, -1))
    e = tree.lookup_embedding(ids, a["embed"]["embedding"])
    return merged, h, o, e

  want = jax.jit(fwd)(params, ads, x, ids)
  got = jax.jit(fwd, in_shardings=(psh, sh, x_sh, None))(p_placed, placed,
                                                         jax.device_put(x, x_sh), ids)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel_err(g, w) <= 1e-6

  def stacked_fwd(ad, x):
    def one(a, b, qa, qb, on, stamp):
      return sl.adapter_matmul(x, dataclasses.replace(
          ad, a=a, b=b, qa=qa, qb=qb, sds_on=on, stamp=stamp, kernel_shape=None, in_axes=None,
          layer_axes=None))
    return jax.vmap(one)(ad.a, ad.b, ad.qa, ad.qb, ad.sds_on, ad.stamp)

  host = jax.device_get(stack)
  want = jax.jit(stacked_fwd)(host, x)
  got = jax.jit(stacked_fwd, in_shardings=(adapter_shardings(
      {"stack": {"kernel": host}}, BASE_SPECS, mesh=mesh)["stack"]["kernel"], x_sh))(stack, x)
  assert _rel_err(got, want) <= 1e-6


def _loss(params, ads, x):
  merged = tree.merge(params, ads)
  h = x @ merged["dense"]["kernel"]
  q = jnp.einsum("bd,dhk->bhk", x, merged["attn"]["query"]["kernel"])
  o = jnp.einsum("bhk,hkd->bd", q, merged["attn"]["out"]["kernel"])
  return jnp.mean(h ** 2) + jnp.mean(jnp.tanh(o)) + jnp.mean(merged["embed"]["embedding"] ** 3)


@pytest.mark.parametrize("name", ["adamw", pytest.param("clip_adamw", marks=pytest.mark.slow)])
def test_opt_state_shardings_sds_lora(mesh, name):
  # eps keeps Adam's step Lipschitz in tiny gradients, whose rounding differs across layouts.
  inner = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
  if name == "clip_adamw":
    inner = optax.chain(optax.clip_by_global_norm(1.0), inner)
  tx = sds_lora(inner, warmup_steps=1)
  params = _base_params()
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), {k: v for k, v in BASE_SPECS.items()
                                                      if k != "stack"},
                     is_leaf=lambda x: isinstance(x, P))
  ads = _adapters(stacked=False, sds_on=0.0)  # starts in the warm-up
  del ads["attn"]["query"]  # (fewer adapters, a faster compile; the base query stays)
  sh = adapter_shardings(ads, BASE_SPECS, mesh=mesh)
  ssh = opt_state_shardings(tx, jax.eval_shape(lambda: ads), sh)

  rep = NamedSharding(mesh, P())
  assert isinstance(ssh, SdsLoraState) and ssh.count == rep and ssh.num_refreshes == rep
  adam = ssh.inner_state[0] if name == "adamw" else ssh.inner_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState) and adam.count == rep
  for moments in (adam.mu, adam.nu):
    for keys in EXPECTED:
      if keys[0] == "stack" or keys[1] == "query":
        continue
      got, want = _get(moments, keys), _get(sh, keys)
      assert (got.a, got.b) == (want.a, want.b)
      assert got.qa is got.qb is got.sds_on is got.stamp is None

  init = jax.jit(tx.init, in_shardings=(sh,), out_shardings=ssh)
  placed = jax.device_put(ads, sh)
  state = init(placed)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
               state, ssh)

  def step(ads, state, params, x):
    grads = jax.grad(_loss, argnums=1)(params, ads, x)
    updates, state = tx.update(grads, state, ads)
    return optax.apply_updates(ads, updates), state

  x = random_normal(jax.random.key(5), (8, 64))
  x_sh = NamedSharding(mesh, P("data", "fsdp"))
  sharded_step = jax.jit(step, in_shardings=(sh, ssh, psh, x_sh), out_shardings=(sh, ssh))
  p_placed, x_placed = jax.device_put(params, psh), jax.device_put(x, x_sh)
  for _ in range(3):  # warm-up and switch, then two SDS steps
    placed, state = sharded_step(placed, state, p_placed, x_placed)
  assert int(state.count) == 3
  assert float(placed["dense"]["kernel"].sds_on) == 1.0
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
               (placed, state), (sh, ssh))
  if name != "clip_adamw":  # (one numerical comparison: it compiles the step once more)
    return

  def unstamped(t):  # stamps hash the bits: compare the arrays themselves
    return jax.tree.map(lambda x: dataclasses.replace(x, stamp=None) if is_adapter(x) else x, t,
                        is_leaf=is_adapter)

  ref_ads, ref_state = ads, tx.init(ads)
  for _ in range(3):
    ref_ads, ref_state = jax.jit(step)(ref_ads, ref_state, params, x)
  for g, w in zip(jax.tree.leaves(unstamped((placed, state))),
                  jax.tree.leaves(unstamped((ref_ads, ref_state)))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_opt_state_shardings_other_optimizers(mesh):
  ads = jax.eval_shape(lambda: _adapters())
  sh = adapter_shardings(ads, BASE_SPECS, mesh=mesh)
  rep = NamedSharding(mesh, P())
  dense = sh["dense"]["kernel"]

  # A plain Optax optimizer on the full adapters: every field has a moment.
  ssh = opt_state_shardings(optax.adam(1e-3), ads, sh)
  mu = ssh[0].mu["dense"]["kernel"]
  assert (mu.a, mu.qb, mu.sds_on, mu.stamp) == (dense.a, dense.qb, rep, rep)
  assert ssh[0].mu["stack"]["kernel"].sds_on == NamedSharding(mesh, P(None))

  # MultiSteps around sds_lora: accumulated gradients mirror the full adapters, the inner
  # state the trainable view.
  ssh = opt_state_shardings(optax.MultiSteps(sds_lora(optax.adam(1e-3)), 2), ads, sh)
  acc = ssh.acc_grads["dense"]["kernel"]
  assert (acc.a, acc.qa, acc.stamp) == (dense.a, dense.qa, rep)
  inner = ssh.inner_opt_state.inner_state[0].mu["dense"]["kernel"]
  assert (inner.a, inner.b, inner.qa) == (dense.a, dense.b, None)
  assert ssh.mini_step == rep

  # A mask that leaves out b of one adapter and the whole stacked adapter.
  def mask(view):
    m = jax.tree.map(lambda _: True, view)
    m["dense"]["kernel"] = dataclasses.replace(m["dense"]["kernel"], b=False)
    m["stack"] = False
    return m

  tx = sds_lora(optax.masked(optax.adam(1e-3), mask))
  ssh = opt_state_shardings(tx, ads, sh)
  mu = ssh.inner_state.inner_state[0].mu
  assert mu["dense"]["kernel"].a == dense.a
  assert isinstance(mu["dense"]["kernel"].b, optax.MaskedNode)
  assert isinstance(mu["stack"], optax.MaskedNode)
  state = jax.jit(tx.init, out_shardings=ssh)(jax.device_put(_adapters(), sh))
  assert state.inner_state.inner_state[0].nu["embed"]["embedding"].b.sharding == \
      sh["embed"]["embedding"].b

  # Factored second moments have other shapes: replicated.
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  ssh = opt_state_shardings(tx, ads, sh)
  v_row = ssh[0].v_row["dense"]["kernel"]
  assert v_row.a == rep and v_row.b == rep  # (64,) and (4,): not the factors' shapes
  jax.jit(tx.init, out_shardings=ssh)(jax.device_put(_adapters(), sh))

  # PartitionSpec shardings give PartitionSpec results.
  specs = adapter_shardings(ads, BASE_SPECS)
  ssh = opt_state_shardings(sds_lora(optax.adam(1e-3)), ads, specs)
  assert ssh.count == P() and ssh.inner_state[0].mu["dense"]["kernel"].a == P("fsdp", None)


def test_errors(mesh):
  ads = _adapters(stacked=False)
  with pytest.raises(ValueError, match="no entry for its kernel"):
    adapter_shardings(ads, {"dense": {"kernel": P()}})
  bad = dict(BASE_SPECS, dense={"kernel": jax.ShapeDtypeStruct((64, 16), jnp.float32)})
  with pytest.raises(ValueError, match="has shape"):
    adapter_shardings(ads, bad)
  with pytest.raises(ValueError, match="twice"):
    adapter_shardings(ads, dict(BASE_SPECS, dense={"kernel": P("fsdp", "fsdp")}))
  with pytest.raises(ValueError, match="lacks"):
    adapter_shardings(ads, dict(BASE_SPECS, dense={"kernel": P("model", None)}), mesh=mesh)
  with pytest.raises(ValueError, match="more entries"):
    adapter_shardings(ads, dict(BASE_SPECS, dense={"kernel": P("fsdp", None, None)}))
  with pytest.raises(TypeError, match="non-Adapter"):
    adapter_shardings({"dense": {"kernel": jnp.zeros((64, 32))}}, BASE_SPECS)
