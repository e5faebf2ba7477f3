"""Checkpoints: adapter metadata stored with the arrays, checked against targets, rebuilt."""

import dataclasses
import functools
import json
import math
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sdslora_jax import checkpoint as ckpt
from sdslora_jax import linen as slinen
from sdslora_jax import nnx as snnx
from sdslora_jax import tree as stree
from sdslora_jax.adapter import is_adapter, with_fresh_bases
from sdslora_jax.optim import factor_labels, sds_lora
from sdslora_jax.targets import rule
from testing_utils import random_normal, randomize_adapter

# Orbax's readers leave coroutines behind when array files are damaged; they are collected (and
# reported) at some later point, not necessarily inside the test that damaged the files.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Net(nn.Module):
  """Embed -> DenseGeneral over two axes (kernel (3, 4, 6), in_axes (0, 1)) -> Dense."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(10, 12, name="embed")(ids)
    h = h.reshape(h.shape[:-1] + (3, 4))
    h = nn.DenseGeneral(6, axis=(-2, -1), name="mix")(h)
    return nn.Dense(5, name="head")(jnp.tanh(h))


IDS = jnp.array([[1, 4, 7, 9], [0, 2, 2, 5]])
RULES = [
    rule("embed/embedding", rank=2),  # SDS, kept in the warm-up below
    rule("mix/kernel", method="lora", rank=2, alpha=4.0, dtype=jnp.bfloat16),
    rule("head/kernel", rank=2, alpha=8.0, rslora=True),
]


def _randomize(ad, key, sds_on):
  """Random factors (and fresh bases for SDS-LoRA), in the adapter's own dtype."""
  out = randomize_adapter(ad, key, sds_on)
  if ad.method == "lora":
    out = dataclasses.replace(out, a=out.a.astype(ad.a.dtype), b=out.b.astype(ad.b.dtype))
  return out


@functools.lru_cache(maxsize=None)
def _mixed_once():
  params = Net().init(jax.random.key(0), IDS)["params"]
  ads = slinen.init_adapters(jax.random.key(1), Net(), params, RULES, IDS)
  ads["embed"]["embedding"] = _randomize(ads["embed"]["embedding"], jax.random.key(2), 0.0)
  ads["mix"]["kernel"] = _randomize(ads["mix"]["kernel"], jax.random.key(3), 1.0)
  ads["head"]["kernel"] = _randomize(ads["head"]["kernel"], jax.random.key(4), 1.0)
  return params, ads


def _mixed():
  """``(params, adapters)``: LoRA (bf16) + SDS, a two-axis-input kernel, an embedding in warm-up."""
  params, ads = _mixed_once()
  return params, jax.tree.map(lambda x: x, ads)  # fresh containers, the same arrays


def _assert_identical(x, y):
  """Same tree structure (static adapter metadata included) and bit-identical leaves."""
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    assert u.tobytes() == v.tobytes()


def _abstract(tree):
  return jax.eval_shape(lambda: tree)


def _data_files(directory):
  """Orbax's array data files (OCDBT keeps them in ``d/``): the one place the tests rely on
  orbax's on-disk layout, to damage a checkpoint; it fails loudly if the layout changes."""
  files = [p for p in pathlib.Path(directory, ckpt.ARRAYS).rglob("*") if p.is_file()]
  data = sorted((p for p in files if p.parent.name == "d"), key=lambda p: p.stat().st_size)
  assert data, f"no orbax data files in a d/ folder: the on-disk layout changed ({files[:5]})"
  return data


# ------------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_mixed_tree(tmp_path):
  _, ads = _mixed()
  path = ckpt.save_adapters(tmp_path / "ck", ads, extra={"rules": ["embed", "mix", "head"]})
  assert path == (tmp_path / "ck").absolute()

  _assert_identical(ckpt.restore_adapters(path, _abstract(ads)), ads)
  _assert_identical(ckpt.restore_adapters(path, ads), ads)
  rebuilt = ckpt.restore_adapters(path)
  _assert_identical(rebuilt, ads)
  assert rebuilt["mix"]["kernel"].qa is None and rebuilt["mix"]["kernel"].sds_on is None
  assert float(rebuilt["embed"]["embedding"].sds_on) == 0.0

  meta = ckpt.adapter_metadata(ads)
  assert ckpt.adapter_metadata(rebuilt) == meta
  assert ckpt.read_metadata(path)["adapters"] == meta["adapters"]
  assert json.loads(json.dumps(meta)) == meta
  assert meta["version"] == ckpt.FORMAT_VERSION
  mix = dict(meta["adapters"]["mix/kernel"])
  fields = mix.pop("fields")
  assert mix == {
      "method": "lora",
      "scale": 2.0,
      "rank": 2,
      "kernel_shape": [3, 4, 6],
      "in_axes": [0, 1],
      "kind": "dense",
      "layer_axes": [],
      "fresh_bases": True,
  }
  assert fields["a"] == {"shape": [12, 2], "dtype": "bfloat16"}
  assert fields["b"] == {"shape": [2, 6], "dtype": "bfloat16"}
  assert fields["qa"] is None and fields["qb"] is None and fields["sds_on"] is None
  head = meta["adapters"]["head/kernel"]
  assert head["method"] == "sds" and head["scale"] == 8.0 / math.sqrt(2)
  assert meta["adapters"]["embed/embedding"]["kind"] == "embed"
  assert ckpt.read_extra(path) == {"rules": ["embed", "mix", "head"]}


def test_rebuilt_adapters_merge_and_apply_like_the_originals(tmp_path):
  params, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)
  rebuilt = ckpt.restore_adapters(tmp_path / "ck")
  _assert_identical(stree.merge(params, rebuilt), stree.merge(params, ads))
  y0 = slinen.apply(Net(), {"params": params}, ads, IDS)
  y1 = slinen.apply(Net(), {"params": params}, rebuilt, IDS)
  np.testing.assert_array_equal(y1, y0)
  assert not np.allclose(y0, Net().apply({"params": params}, IDS))  # the adapters matter


def test_restored_arrays_take_the_target_shardings(tmp_path):
  _, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def spec(x):
    sharding = row if x.ndim == 2 and x.shape[0] % 2 == 0 else rep
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  target = jax.tree.map(spec, ads)
  out = ckpt.restore_adapters(tmp_path / "ck", target)
  _assert_identical(out, ads)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(target)):
    assert got.sharding == want.sharding


def _train_setup():
  params, ads = _mixed()
  y = random_normal(jax.random.key(7), (2, 4, 5))
  tx = sds_lora(optax.adamw(3e-2, weight_decay=1e-2), warmup_steps=4)

  def loss(a):
    return jnp.mean((slinen.apply(Net(), {"params": params}, a, IDS) - y) ** 2)

  @jax.jit
  def step(a, s):
    u, s = tx.update(jax.grad(loss)(a), s, a)
    return optax.apply_updates(a, u), s

  return ads, tx, step


def test_optimizer_state_resumes_bit_identically(tmp_path):
  ads, tx, step = _train_setup()
  s = tx.init(ads)
  for _ in range(3):
    ads, s = step(ads, s)
  ckpt.save_adapters(tmp_path / "ck", {"adapters": ads, "opt_state": s})
  ref_a, ref_s = ads, s
  for _ in range(4):  # the SDS switch (after update 4) happens after the save
    ref_a, ref_s = step(ref_a, ref_s)

  fresh = _mixed()[1]
  target = {"adapters": _abstract(fresh), "opt_state": jax.eval_shape(tx.init, fresh)}
  with_target = ckpt.restore_adapters(tmp_path / "ck", target)
  without = ckpt.restore_adapters(tmp_path / "ck")
  # Without a target no class is imported: named tuples of the same names, fields and leaves.
  adam = without["opt_state"].inner_state[0]
  assert type(adam).__name__ == "ScaleByAdamState" and adam._fields == s.inner_state[0]._fields
  assert not isinstance(adam, optax.ScaleByAdamState)
  for u, v in zip(jax.tree.leaves(without), jax.tree.leaves({"adapters": ads, "opt_state": s})):
    assert np.asarray(u).tobytes() == np.asarray(v).tobytes()
  _assert_identical(with_target, {"adapters": ads, "opt_state": s})  # tx.init's own classes
  for restored in (without, with_target):
    a, st = restored["adapters"], restored["opt_state"]
    for _ in range(4):
      a, st = step(a, st)
    _assert_identical(a, ref_a)
    for u, v in zip(jax.tree.leaves(st), jax.tree.leaves(ref_s), strict=True):
      assert np.asarray(u).tobytes() == np.asarray(v).tobytes()
  _assert_identical(st, ref_s)  # the last one is resumed from a target: optax's own classes
  assert float(ref_a["embed"]["embedding"].sds_on) == 1.0


# ------------------------------------------------------------------------------------------------
# Mismatches with the target.


@pytest.mark.parametrize(
    "saved, wanted, message",
    [
        (dict(alpha=8.0), dict(alpha=16.0), "scale differs (checkpoint 2.0, target 4.0)"),
        (dict(alpha=8.0), dict(alpha=8.0, rslora=True), "scale differs (checkpoint 2.0, target 4"),
        (dict(), dict(method="lora"), "method differs (checkpoint 'sds', target 'lora')"),
        (dict(rank=4), dict(rank=2), "rank differs (checkpoint 4, target 2)"),
    ],
    ids=["alpha", "rslora", "method", "rank"],
)
def test_mismatched_target_is_refused(tmp_path, saved, wanted, message):
  params = Net().init(jax.random.key(0), IDS)["params"]

  def make(settings):
    return stree.init_adapters(
        jax.random.key(1), params, [rule("head/kernel", **{"rank": 4, **settings})]
    )

  ckpt.save_adapters(tmp_path / "ck", make(saved))
  target = make(wanted)
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    ckpt.restore_adapters(tmp_path / "ck", target)
  assert f"adapter at 'head/kernel': {message}" in str(e.value)
  assert str(tmp_path / "ck") in str(e.value)


def test_missing_and_extra_adapters_are_refused_before_reading_arrays(tmp_path):
  _, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)
  for f in _data_files(tmp_path / "ck"):
    f.write_bytes(b"")  # the check must come first: the arrays are never read
  fewer = {k: v for k, v in ads.items() if k != "mix"}
  with pytest.raises(ckpt.CheckpointMismatchError, match="'mix/kernel' that the target lacks"):
    ckpt.restore_adapters(tmp_path / "ck", fewer)
  more = {**ads, "extra": {"kernel": ads["head"]["kernel"]}}
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="'extra/kernel' that is missing from the checkpoint"):
    ckpt.restore_adapters(tmp_path / "ck", more)
  with pytest.raises(ckpt.CheckpointMismatchError, match="'mix/kernel': kernel_shape differs"):
    ckpt.restore_adapters(tmp_path / "ck", {**ads, "mix": {"kernel": dataclasses.replace(
        ads["mix"]["kernel"], kernel_shape=(4, 3, 6), in_axes=(0, 1))}})
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="the target has a leaf at 'step' that the checkpoint lacks"):
    ckpt.restore_adapters(tmp_path / "ck", {**ads, "step": jnp.int32(0)})


# ------------------------------------------------------------------------------------------------
# Writing.


def test_refuses_to_overwrite_unless_asked(tmp_path):
  _, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)
  other = jax.tree.map(lambda x: x + 1, ads)
  with pytest.raises(FileExistsError, match=str(tmp_path / "ck")):
    ckpt.save_adapters(tmp_path / "ck", other)
  _assert_identical(ckpt.restore_adapters(tmp_path / "ck"), ads)
  ckpt.save_adapters(tmp_path / "ck", other, overwrite=True)
  _assert_identical(ckpt.restore_adapters(tmp_path / "ck"), other)
  assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporaries left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  _, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)

  class Failing:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      pass

    def save(self, directory, args):
      pathlib.Path(directory).mkdir()
      (pathlib.Path(directory) / "partial").write_text("x")
      raise OSError("disk full")

  monkeypatch.setattr(ckpt, "_checkpointer", Failing)
  with pytest.raises(OSError, match="disk full"):
    ckpt.save_adapters(tmp_path / "ck", jax.tree.map(lambda x: x + 1, ads), overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["ck"]
  _assert_identical(ckpt.restore_adapters(tmp_path / "ck"), ads)


def test_invalid_trees_and_extra_write_nothing(tmp_path):
  _, ads = _mixed()
  with pytest.raises(TypeError, match="extra is not JSON-serialisable"):
    ckpt.save_adapters(tmp_path / "a", ads, extra={"dtype": jnp.float32})
  with pytest.raises(TypeError, match="leaf at 'note' is a str"):
    ckpt.save_adapters(tmp_path / "b", {**ads, "note": "hello"})
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _truncate_largest(d):
  f = _data_files(d)[-1]
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_byte(d):
  f = _data_files(d)[-1]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0xFF
  f.write_bytes(bytes(data))


def _remove_data(d):
  for f in _data_files(d):
    f.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate_largest, "could not be read|checksum"),
        (_flip_a_byte, "'table' does not match its stored checksum"),  # Orbax reads it silently
        (_remove_data, "could not be read"),
    ],
    ids=["truncated", "flipped", "removed"],
)
@pytest.mark.parametrize("with_target", [False, True], ids=["no_target", "target"])
def test_damaged_array_files_are_an_error(tmp_path, damage, message, with_target):
  _, ads = _mixed()
  big = {**ads, "table": random_normal(jax.random.key(5), (64, 32))}  # the largest file
  ckpt.save_adapters(tmp_path / "ck", big)
  damage(tmp_path / "ck")
  with pytest.raises(ckpt.CheckpointDamagedError, match=message) as e:
    ckpt.restore_adapters(tmp_path / "ck", big if with_target else None)
  assert str(tmp_path / "ck") in str(e.value)


def test_damaged_or_missing_metadata_is_an_error(tmp_path):
  _, ads = _mixed()
  d = tmp_path / "ck"
  ckpt.save_adapters(d, ads)
  meta_file = d / ckpt.METADATA / "metadata"
  text = meta_file.read_text()

  meta_file.write_text(text[: len(text) // 2])
  with pytest.raises(ckpt.CheckpointDamagedError, match="is not valid JSON"):
    ckpt.restore_adapters(d)
  meta_file.write_text(text.replace('"version": 2', '"version": 99'))
  with pytest.raises(ValueError, match="version 99 is not supported"):
    ckpt.restore_adapters(d, ads)
  meta_file.write_text(json.dumps({**json.loads(text), "tree": {"t": "dict", "keys": ["x"]}}))
  with pytest.raises(ckpt.CheckpointDamagedError, match="malformed"):
    ckpt.restore_adapters(d)
  meta_file.unlink()
  with pytest.raises(ckpt.CheckpointDamagedError, match="adapter_metadata is incomplete"):
    ckpt.restore_adapters(d)
  with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
    ckpt.restore_adapters(tmp_path / "nowhere")
  # A plain Orbax checkpoint of the same tree has no adapter metadata.
  with ocp.StandardCheckpointer() as plain:
    plain.save(tmp_path / "plain", ads)
  with pytest.raises(FileNotFoundError, match="no adapter metadata"):
    ckpt.restore_adapters(tmp_path / "plain")


# ------------------------------------------------------------------------------------------------
# Flax NNX and CheckpointManager.


class TwoLayers(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


NNX_RULES = [rule("l1/kernel", rank=2, alpha=4.0), rule("l2/kernel", method="lora", rank=3)]
X = random_normal(jax.random.key(9), (3, 8))


def _trained_nnx():
  model = snnx.adapt(TwoLayers(nnx.Rngs(0)), NNX_RULES, key=jax.random.key(1))
  state = nnx.state(model, snnx.AdapterVariable)
  keys = iter(jax.random.split(jax.random.key(2), 2))
  nnx.update(model, jax.tree.map(lambda ad: _randomize(ad, next(keys), 1.0), state,
                                 is_leaf=is_adapter))
  return model


def test_nnx_state_round_trip_into_a_freshly_adapted_model(tmp_path):
  model = _trained_nnx()
  y = model(X)
  ckpt.save_adapters(tmp_path / "ck", nnx.state(model, snnx.AdapterVariable))

  fresh = snnx.adapt(TwoLayers(nnx.Rngs(0)), NNX_RULES, key=jax.random.key(5))
  assert not np.allclose(fresh(X), y)
  restored = ckpt.restore_adapters(tmp_path / "ck", nnx.state(fresh, snnx.AdapterVariable))
  assert isinstance(restored, nnx.State)
  nnx.update(fresh, restored)
  np.testing.assert_array_equal(fresh(X), y)

  rebuilt = ckpt.restore_adapters(tmp_path / "ck")  # no target: State of AdapterVariables
  assert isinstance(rebuilt, nnx.State)
  assert isinstance(rebuilt["l1"]["adapter"], snnx.AdapterVariable)
  other = snnx.adapt(TwoLayers(nnx.Rngs(0)), NNX_RULES, key=jax.random.key(6))
  nnx.update(other, rebuilt)
  np.testing.assert_array_equal(other(X), y)

  wrong = snnx.adapt(TwoLayers(nnx.Rngs(0)), [rule("l1/kernel", rank=2, alpha=8.0),
                                               NNX_RULES[1]], key=jax.random.key(5))
  with pytest.raises(ValueError, match=r"'l1/adapter/value': scale differs \(checkpoint 2.0, targ"):
    ckpt.restore_adapters(tmp_path / "ck", nnx.state(wrong, snnx.AdapterVariable))


def test_nnx_kernel_path_tree_attaches_to_an_unadapted_model(tmp_path):
  model = _trained_nnx()
  y = model(X)
  ckpt.save_adapters(tmp_path / "ck", snnx.adapters(model))
  plain = TwoLayers(nnx.Rngs(0))
  snnx.attach(plain, ckpt.restore_adapters(tmp_path / "ck"))
  np.testing.assert_array_equal(plain(X), y)


def test_checkpoint_manager_keeps_metadata_per_step(tmp_path):
  _, ads = _mixed()
  trees = [jax.tree.map(lambda x, i=i: x + i, ads) for i in range(4)]
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
    for i, t in enumerate(trees):
      items = ckpt.save_args({"adapters": t, "step": jnp.int32(i)}, extra={"i": i})
      mngr.save(i, args=ocp.args.Composite(**items, data=ocp.args.JsonSave({"seen": i})))
    mngr.wait_until_finished()
    assert list(mngr.all_steps()) == [2, 3]
  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:  # a new process
    latest = ckpt.restore_from_manager(mngr)
    _assert_identical(latest, {"adapters": trees[3], "step": jnp.int32(3)})
    target = {"adapters": _abstract(ads), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    _assert_identical(ckpt.restore_from_manager(mngr, target, step=2),
                      {"adapters": trees[2], "step": jnp.int32(2)})
    extra = mngr.restore(2, args=ocp.args.Composite(adapter_extra=ocp.args.JsonRestore(),
                                                    data=ocp.args.JsonRestore()))
    assert extra["adapter_extra"] == {"i": 2} and extra["data"] == {"seen": 2}
    wrong = {"adapters": {**ads, "head": {"kernel": dataclasses.replace(
        ads["head"]["kernel"], scale=1.0)}}, "step": target["step"]}
    with pytest.raises(ValueError, match="(?s)step 3 .* scale differs"):
      ckpt.restore_from_manager(mngr, wrong)
  # A manager step directory is an adapter checkpoint too.
  _assert_identical(ckpt.restore_adapters(tmp_path / "run" / "3")["adapters"], trees[3])
  assert ckpt.read_extra(tmp_path / "run" / "3") == {"i": 3}


def test_masked_optimizer_state_and_python_leaves_round_trip(tmp_path):
  _, ads = _mixed()
  labels = {"a": optax.adam(1e-3), "b": optax.sgd(1e-2), "other": optax.sgd(1.0),
            "frozen": optax.set_to_zero()}
  state = sds_lora(optax.partition(labels, factor_labels)).init(ads)  # MaskedNode in Adapters
  meta = ckpt.adapter_metadata(state)["adapters"]
  assert meta["inner_state/inner_states/a/inner_state/0/mu/head/kernel"]["fields"]["b"] == {
      "node": "MaskedNode"
  }
  tree = {"state": state, "lr": 0.1, "n": 3, "flag": True, "none": None, "pair": (1.5, [None])}
  ckpt.save_adapters(tmp_path / "ck", tree)
  rebuilt = ckpt.restore_adapters(tmp_path / "ck")
  _assert_identical({k: v for k, v in rebuilt.items() if k != "state"},
                    {k: v for k, v in tree.items() if k != "state"})
  assert str(jax.tree.structure(rebuilt["state"])) == str(jax.tree.structure(state))  # same names
  restored = ckpt.restore_adapters(tmp_path / "ck", {**tree, "state": state})
  _assert_identical(restored["state"], state)
  assert rebuilt["lr"] == 0.1 and type(rebuilt["n"]) is int and rebuilt["flag"] is True
  abstract = ckpt.restore_adapters(tmp_path / "ck", _abstract(tree))  # numbers become arrays
  assert abstract["lr"].dtype == jnp.float32 and float(abstract["lr"]) == np.float32(0.1)
  _assert_identical(abstract["state"], state)


def test_fresh_bases_is_the_targets_choice(tmp_path):
  # fresh_bases says how an SDS adapter runs (rank-r op or two-branch op), not what it holds:
  # a checkpoint restores into adapters marked either way, and they keep the target's mark.
  _, ads = _mixed()
  ckpt.save_adapters(tmp_path / "ck", ads)
  target = with_fresh_bases(ads, False)
  restored = ckpt.restore_adapters(tmp_path / "ck", target)
  _assert_identical(restored, target)
  sds_leaves = [x for x in jax.tree.leaves(restored, is_leaf=is_adapter)
                if is_adapter(x) and x.method == "sds"]
  assert sds_leaves and not any(x.fresh_bases for x in sds_leaves)
