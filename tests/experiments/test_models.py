"""Tests for the BERT / MiniLM and ConvNet models (Linen and NNX)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.models import bert, convnet
from experiments.models.bert import (
  BertConfig,
  BertEncoder,
  BertEncoderNNX,
  SentenceClassifier,
  SentenceClassifierNNX,
  mean_pool,
  tiny_config,
)
from experiments.models.convnet import ConvNet, ConvNetNNX


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(np.shape(v))
    for path, v in flat
  }


def _tiny_inputs(batch=2, length=8, vocab=100, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 5:] = 0
  ids[1, 5:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  ids, mask = _tiny_inputs()
  params = BertEncoder(cfg).init(jax.random.key(0), ids, mask)["params"]
  return cfg, params, ids, mask


# ----------------------------------------------------------------------------- BERT, tiny


def test_param_tree_paths_and_shapes(tiny):
  _cfg, params, _, _ = tiny
  h, nh, hd, inter = 32, 4, 8, 64
  want = {
    "embeddings/word_embeddings/embedding": (100, h),
    "embeddings/position_embeddings/embedding": (16, h),
    "embeddings/token_type_embeddings/embedding": (2, h),
    "embeddings/LayerNorm/scale": (h,),
    "embeddings/LayerNorm/bias": (h,),
  }
  for i in range(2):
    p = f"encoder/layer_{i}"
    for name in ("query", "key", "value"):
      want[f"{p}/attention/{name}/kernel"] = (h, nh, hd)
      want[f"{p}/attention/{name}/bias"] = (nh, hd)
    want[f"{p}/attention/output/kernel"] = (nh, hd, h)
    want[f"{p}/attention/output/bias"] = (h,)
    for ln in ("attention/LayerNorm", "output_LayerNorm"):
      want[f"{p}/{ln}/scale"] = (h,)
      want[f"{p}/{ln}/bias"] = (h,)
    want[f"{p}/intermediate/kernel"] = (h, inter)
    want[f"{p}/intermediate/bias"] = (inter,)
    want[f"{p}/output/kernel"] = (inter, h)
    want[f"{p}/output/bias"] = (h,)
  assert _flat_shapes(params) == want


def test_default_config_is_minilm():
  cfg = BertConfig()
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (30522, 384, 6, 12)
  assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.head_dim) == (1536, 512, 32)


def test_config_and_input_errors(tiny):
  cfg, params, ids, mask = tiny
  with pytest.raises(ValueError, match="divisible"):
    BertConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    BertEncoder(cfg).apply({"params": params}, jnp.ones((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    BertEncoder(cfg).apply({"params": params}, ids, mask[:, :4])


def test_output_shape_and_jit(tiny):
  cfg, params, ids, mask = tiny
  model = BertEncoder(cfg)
  out = model.apply({"params": params}, ids, mask)
  assert out.shape == (2, 8, 32) and out.dtype == jnp.float32
  jitted = jax.jit(model.apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(jitted, out, atol=1e-5)


def test_nnx_matches_linen_and_round_trips(tiny):
  cfg, params, ids, mask = tiny
  model = BertEncoderNNX(cfg, rngs=nnx.Rngs(7))
  # NNX mirrors the Linen tree up to encoder/layer_{i} <-> encoder/layers/{i}.
  assert _flat_shapes(bert.nnx_to_linen_params(model)) == _flat_shapes(params)
  assert model.encoder.layers[1].attention.query.kernel.shape == (32, 4, 8)
  bert.load_linen_params_into_nnx(model, {"params": params})
  np.testing.assert_array_equal(
    model(ids, mask), BertEncoder(cfg).apply({"params": params}, ids, mask)
  )
  back = bert.nnx_to_linen_params(model)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_nnx_load_rejects_wrong_tree(tiny):
  _cfg, params, _, _ = tiny
  model = BertEncoderNNX(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Param trees differ"):
    bert.load_linen_params_into_nnx(model, params)


@pytest.mark.parametrize("use_nnx", [False, True])
def test_attention_mask_masks_padding(tiny, use_nnx):
  cfg, params, ids, mask = tiny
  if use_nnx:
    model = bert.load_linen_params_into_nnx(BertEncoderNNX(cfg, rngs=nnx.Rngs(0)), params)
    run = lambda i, m: model(i, m)
  else:
    run = lambda i, m: BertEncoder(cfg).apply({"params": params}, i, m)
  other = ids.at[1, 5:].set(jnp.array([7, 8, 9]))
  a, b = run(ids, mask), run(other, mask)
  np.testing.assert_allclose(a[1, :5], b[1, :5], atol=1e-6)
  np.testing.assert_array_equal(a[0], b[0])
  # Without the mask the same change does leak into the real tokens.
  full = jnp.ones_like(mask)
  assert np.abs(run(ids, full)[1, :5] - run(other, full)[1, :5]).max() > 1e-3


def test_dropout(tiny):
  cfg, params, ids, mask = tiny
  model = BertEncoder(cfg)
  base = model.apply({"params": params}, ids, mask)
  drop = lambda s: model.apply(
    {"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(s)}
  )
  assert np.abs(drop(0) - base).max() > 1e-3
  np.testing.assert_array_equal(drop(1), drop(1))
  nnx_model = bert.load_linen_params_into_nnx(BertEncoderNNX(cfg, rngs=nnx.Rngs(0)), params)
  np.testing.assert_array_equal(nnx_model(ids, mask), base)
  assert np.abs(nnx_model(ids, mask, deterministic=False) - base).max() > 1e-3


def test_mean_pool():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  want = np.array([[1.0, 2.0], [6.0, 7.0]])
  np.testing.assert_allclose(mean_pool(hidden, mask), want)
  np.testing.assert_allclose(mean_pool(hidden), hidden.mean(1))


def test_sentence_classifier_linen_and_nnx(tiny):
  cfg, _, ids, mask = tiny
  model = SentenceClassifier(cfg, num_classes=3)
  params = model.init(jax.random.key(1), ids, mask)["params"]
  assert set(params) == {"bert", "classifier"}
  assert params["classifier"]["kernel"].shape == (32, 3)
  logits = model.apply({"params": params}, ids, mask)
  assert logits.shape == (2, 3)
  enc = BertEncoder(cfg).apply({"params": params["bert"]}, ids, mask)
  pooled = mean_pool(enc, mask)
  want = pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  np.testing.assert_allclose(logits, want, atol=1e-5)
  nnx_model = SentenceClassifierNNX(cfg, 3, rngs=nnx.Rngs(0))
  bert.load_linen_params_into_nnx(nnx_model, params)
  np.testing.assert_array_equal(nnx_model(ids, mask), logits)


# ----------------------------------------------------------------------------- ConvNet


def test_convnet_shapes_and_nnx_parity():
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  model = ConvNet(num_classes=10, features=(16, 32))
  params = model.init(jax.random.key(1), x)["params"]
  assert _flat_shapes(params) == {
    "conv_0/kernel": (3, 3, 1, 16),
    "conv_0/bias": (16,),
    "conv_1/kernel": (3, 3, 16, 32),
    "conv_1/bias": (32,),
    "head/kernel": (32, 10),
    "head/bias": (10,),
  }
  logits = model.apply({"params": params}, x)
  assert logits.shape == (3, 10)
  nnx_model = ConvNetNNX(10, (16, 32), rngs=nnx.Rngs(0), in_channels=1)
  convnet.load_linen_params_into_nnx(nnx_model, params)
  np.testing.assert_allclose(nnx_model(x), logits, atol=1e-6)


def test_convnet_other_sizes_and_errors():
  x = jnp.ones((2, 8, 8, 3))
  model = ConvNet(num_classes=4, features=(8, 8, 8))
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (2, 4)
  assert ConvNetNNX(4, (8,), rngs=nnx.Rngs(0), in_channels=3)(x).shape == (2, 4)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(params, jnp.ones((8, 8, 3)))
  with pytest.raises(ValueError, match="input channels"):
    ConvNetNNX(4, (8,), rngs=nnx.Rngs(0))(x)


# ----------------------------------------------------------------------------- MiniLM weights

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread."]


@pytest.fixture(scope="module")
def minilm():
  # Installed by `make test` (see the Makefile); a missing package is a failure.
  from safetensors.numpy import load_file

  from experiments.models import minilm as mod

  cfg, params = mod.load_minilm_params()
  raw = load_file(os.path.join(mod.model_path(), "model.safetensors"))
  return mod, cfg, params, raw


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _numpy_bert(w: dict, ids: np.ndarray, mask: np.ndarray, layers=6, heads=12, eps=1e-12):
  """Plain float64 BERT forward on the Hugging Face arrays (the test oracle)."""
  w = {k: v.astype(np.float64) for k, v in w.items()}

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

  def lin(x, name):
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

  b, t = ids.shape
  x = (
    w["embeddings.word_embeddings.weight"][ids]
    + w["embeddings.position_embeddings.weight"][np.arange(t)][None]
    + w["embeddings.token_type_embeddings.weight"][0]
  )
  x = ln(x, "embeddings.LayerNorm")
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
  for i in range(layers):
    p = f"encoder.layer.{i}"
    split = lambda y: y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + bias
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    x = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
    h = lin(x, f"{p}.intermediate.dense")
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
  return x


def test_tokenize(minilm):
  mod = minilm[0]
  with open(os.path.join(mod.model_path(), "vocab.txt")) as f:
    vocab = f.read().split("\n")
  words = ["[CLS]", "a", "man", "is", "eating", "food", ".", "[SEP]"]
  ids, mask = mod.tokenize(SENTENCES, max_len=16)
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32
  assert ids[0, :8].tolist() == [vocab.index(wd) for wd in words]
  assert mask.sum(1).tolist() == [8, 11] and (ids[mask == 0] == 0).all()
  short, _ = mod.tokenize(SENTENCES, max_len=6, pad_to_max=False)
  assert short.shape == (2, 6) and short[:, -1].tolist() == [vocab.index("[SEP]")] * 2


def test_minilm_matches_numpy_reference_and_cosine(minilm):
  mod, cfg, params, raw = minilm
  assert cfg == BertConfig()
  ids, mask = mod.tokenize(SENTENCES, max_len=16)
  hidden = np.asarray(jax.jit(BertEncoder(cfg).apply)({"params": params}, ids, mask))
  ref = _numpy_bert(raw, ids, mask)
  real = mask.astype(bool)
  diff = np.abs(hidden[real] - ref[real]).max()
  print(f"max |flax - numpy| = {diff:.3g}")
  assert diff < 1e-4
  emb = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  cosine = float(emb[0] @ emb[1])
  print(f"cosine = {cosine:.6f}")
  assert abs(cosine - 0.755) < 0.02


def test_minilm_nnx_matches_linen(minilm):
  mod, cfg, params, _ = minilm
  ids, mask = mod.tokenize(SENTENCES, max_len=12)
  _, model = mod.load_minilm_nnx()
  want = BertEncoder(cfg).apply({"params": params}, ids, mask)
  np.testing.assert_allclose(model(ids, mask), want, atol=1e-6)


def test_hf_names_and_layouts_cover_checkpoint(minilm):
  mod, _, params, raw = minilm
  seen = set()
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [k.key for k in path]
    leaf = "bias" if keys[-1] == "bias" else "weight"
    name = f"{mod.hf_module_name('/'.join(keys))}.{leaf}"
    np.testing.assert_array_equal(mod.to_hf_weight("/".join(keys), value), raw[name])
    np.testing.assert_array_equal(mod.to_hf_weight(path, value), raw[name])
    seen.add(name)
  assert seen == {k for k in raw if not k.startswith("pooler.") and "position_ids" not in k}


def test_hf_module_name_examples():
  from experiments.models.minilm import hf_module_name

  cases = {
    "encoder/layer_0/attention/query/kernel": "encoder.layer.0.attention.self.query",
    "params/encoder/layer_5/attention/output/bias": "encoder.layer.5.attention.output.dense",
    "encoder/layers/2/intermediate/kernel": "encoder.layer.2.intermediate.dense",
    "encoder/layer_1/output": "encoder.layer.1.output.dense",
    "encoder/layer_1/output_LayerNorm/scale": "encoder.layer.1.output.LayerNorm",
    "bert/encoder/layer_3/attention/value/kernel": "bert.encoder.layer.3.attention.self.value",
    "embeddings/word_embeddings/embedding": "embeddings.word_embeddings",
    "classifier/kernel": "classifier",
  }
  for path, want in cases.items():
    assert hf_module_name(path) == want
  with pytest.raises(ValueError, match="No Hugging Face"):
    hf_module_name("encoder/layer_0/attention/nope/kernel")


def test_init_classifier_params(minilm):
  mod, cfg, _params, _ = minilm
  c, tree = mod.init_classifier_params(2, jax.random.key(0))
  assert c == cfg and set(tree) == {"bert", "classifier"}
  assert tree["classifier"]["kernel"].shape == (384, 2)
  ids, mask = mod.tokenize(SENTENCES[:1], max_len=8)
  assert SentenceClassifier(cfg, 2).apply({"params": tree}, ids, mask).shape == (1, 2)


def test_fully_padded_row_and_bfloat16(tiny):
  _, params, ids, mask = tiny
  mask = mask.at[1].set(0)
  out = BertEncoder(tiny_config()).apply({"params": params}, ids, mask)
  assert np.isfinite(np.asarray(out)).all()
  assert np.isfinite(np.asarray(mean_pool(out, mask))).all()
  half = BertEncoder(tiny_config(dtype=jnp.bfloat16)).apply({"params": params}, ids, mask)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=0.1)
