"""BERT encoder (post-LayerNorm) in Flax Linen and flax.nnx.

Both versions share one parameter layout, named after BERT's modules::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value}/kernel   (H, heads, head_dim)
  encoder/layer_{i}/attention/output/kernel              (heads, head_dim, H)
  encoder/layer_{i}/attention/LayerNorm/{scale,bias}
  encoder/layer_{i}/intermediate/kernel                  (H, I)
  encoder/layer_{i}/output/kernel                        (I, H)
  encoder/layer_{i}/output_LayerNorm/{scale,bias}

The NNX modules hold the layers in ``encoder.layers[i]``; ``linen_to_nnx_params``
and ``nnx_to_linen_params`` translate between the two trees, so the same
weights run in both.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

Array = jax.Array
Params = dict[str, Any]

__all__ = [
  "BertConfig",
  "BertEncoder",
  "BertEncoderNNX",
  "SentenceClassifier",
  "SentenceClassifierNNX",
  "attention_bias",
  "linen_to_nnx_params",
  "load_linen_params_into_nnx",
  "mean_pool",
  "nnx_to_linen_params",
  "tiny_config",
]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Static BERT hyperparameters; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in (
      "vocab_size",
      "hidden_size",
      "num_layers",
      "num_heads",
      "intermediate_size",
      "max_position_embeddings",
      "type_vocab_size",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def tiny_config(**overrides: Any) -> BertConfig:
  """A small BERT for tests: vocab 100, hidden 32, 2 layers, 4 heads."""
  kwargs = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
  }
  kwargs.update(overrides)
  return BertConfig(**kwargs)


# ----------------------------------------------------------------------------- shared helpers


def _check_inputs(
  config: BertConfig, input_ids: Array, attention_mask: Array | None, token_type_ids: Array | None
) -> tuple[Array, Array]:
  """Validates shapes and fills default mask / token types."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}.")
  length = input_ids.shape[1]
  if length > config.max_position_embeddings:
    raise ValueError(
      f"Sequence length {length} exceeds max_position_embeddings "
      f"({config.max_position_embeddings})."
    )
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  elif attention_mask.shape != input_ids.shape:
    raise ValueError(
      f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}."
    )
  if token_type_ids is None:
    token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
  elif token_type_ids.shape != input_ids.shape:
    raise ValueError(
      f"token_type_ids shape {token_type_ids.shape} != input_ids shape {input_ids.shape}."
    )
  return attention_mask, token_type_ids


def attention_bias(attention_mask: Array, dtype: Any = jnp.float32) -> Array:
  """(B, T) 0/1 key mask -> additive (B, 1, 1, T) bias: 0 keep, dtype min masked."""
  keep = attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _attention_weights(query: Array, key: Array, bias: Array, dtype: Any) -> Array:
  """Softmax attention probabilities (B, heads, Tq, Tk) from (B, T, heads, d)."""
  scale = 1.0 / jnp.sqrt(query.shape[-1]).astype(dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key) + bias
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def mean_pool(hidden: Array, attention_mask: Array | None = None) -> Array:
  """Mean of the (B, T, H) hidden states over unmasked tokens -> (B, H)."""
  if attention_mask is None:
    return hidden.mean(axis=1)
  if attention_mask.shape != hidden.shape[:2]:
    raise ValueError(
      f"attention_mask shape {attention_mask.shape} != hidden leading shape {hidden.shape[:2]}."
    )
  mask = attention_mask.astype(hidden.dtype)[..., None]
  total = (hidden * mask).sum(axis=1)
  count = jnp.maximum(mask.sum(axis=1), 1e-9)
  return total / count


# ----------------------------------------------------------------------------- Linen


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    cfg = self.config
    init = nn.initializers.normal(0.02)
    word = nn.Embed(
      cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=cfg.dtype, name="word_embeddings"
    )(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    pos = nn.Embed(
      cfg.max_position_embeddings,
      cfg.hidden_size,
      embedding_init=init,
      dtype=cfg.dtype,
      name="position_embeddings",
    )(positions)
    types = nn.Embed(
      cfg.type_vocab_size,
      cfg.hidden_size,
      embedding_init=init,
      dtype=cfg.dtype,
      name="token_type_embeddings",
    )(token_type_ids)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="LayerNorm")(
      word + pos + types
    )
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class BertAttention(nn.Module):
  """Multi-head self-attention with BERT's output projection and post-LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    init = nn.initializers.normal(0.02)
    proj = lambda name: nn.DenseGeneral(
      features=(cfg.num_heads, cfg.head_dim), axis=-1, kernel_init=init, dtype=cfg.dtype, name=name
    )
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    probs = _attention_weights(q, k, bias, cfg.dtype)
    probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = nn.DenseGeneral(
      features=cfg.hidden_size, axis=(-2, -1), kernel_init=init, dtype=cfg.dtype, name="output"
    )(ctx)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="LayerNorm")(out + x)


class BertLayer(nn.Module):
  """One post-LN transformer block: attention, then GELU feed-forward."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    init = nn.initializers.normal(0.02)
    x = BertAttention(cfg, name="attention")(x, bias, deterministic)
    h = nn.Dense(cfg.intermediate_size, kernel_init=init, dtype=cfg.dtype, name="intermediate")(x)
    h = nn.gelu(h, approximate=False)
    h = nn.Dense(cfg.hidden_size, kernel_init=init, dtype=cfg.dtype, name="output")(h)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="output_LayerNorm")(h + x)


class BertStack(nn.Module):
  """The stack of ``num_layers`` blocks, named ``layer_{i}``."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, bias, deterministic)
    return x


class BertEncoder(nn.Module):
  """BERT encoder (no pooler) returning the last hidden states.

  Attributes:
    config: model hyperparameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    deterministic: bool = True,
  ) -> Array:
    """Encodes token ids.

    Args:
      input_ids: (B, T) int token ids.
      attention_mask: (B, T), 1 for real tokens and 0 for padding; default all ones.
      token_type_ids: (B, T) segment ids; default zeros.
      deterministic: disables dropout; when False a 'dropout' rng is required.

    Returns:
      (B, T, hidden_size) last hidden states.
    """
    cfg = self.config
    attention_mask, token_type_ids = _check_inputs(cfg, input_ids, attention_mask, token_type_ids)
    x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    bias = attention_bias(attention_mask, cfg.dtype)
    return BertStack(cfg, name="encoder")(x, bias, deterministic)


class SentenceClassifier(nn.Module):
  """BERT encoder + masked mean pooling + dropout + linear ``classifier`` head.

  Parameters live under ``bert/...`` (the encoder) and ``classifier/...``.
  """

  config: BertConfig
  num_classes: int

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    deterministic: bool = True,
  ) -> Array:
    """Returns (B, num_classes) logits."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    hidden = BertEncoder(self.config, name="bert")(
      input_ids, attention_mask, token_type_ids, deterministic
    )
    pooled = mean_pool(hidden, attention_mask)
    pooled = nn.Dropout(self.config.dropout_rate)(pooled, deterministic=deterministic)
    return nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.normal(0.02),
      dtype=self.config.dtype,
      name="classifier",
    )(pooled)


# ----------------------------------------------------------------------------- NNX


class BertEmbeddingsNNX(nnx.Module):
  """NNX twin of ``BertEmbeddings``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    cfg = config
    init = nnx.initializers.normal(0.02)
    embed = lambda n: nnx.Embed(n, cfg.hidden_size, embedding_init=init, dtype=cfg.dtype, rngs=rngs)
    self.word_embeddings = embed(cfg.vocab_size)
    self.position_embeddings = embed(cfg.max_position_embeddings)
    self.token_type_embeddings = embed(cfg.type_vocab_size)
    self.LayerNorm = nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs
    )
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      self.word_embeddings(input_ids)
      + self.position_embeddings(positions)
      + self.token_type_embeddings(token_type_ids)
    )
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class BertAttentionNNX(nnx.Module):
  """NNX twin of ``BertAttention``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    init = nnx.initializers.normal(0.02)
    proj = lambda: nnx.LinearGeneral(
      cfg.hidden_size,
      (cfg.num_heads, cfg.head_dim),
      axis=-1,
      kernel_init=init,
      dtype=cfg.dtype,
      rngs=rngs,
    )
    self.query, self.key, self.value = proj(), proj(), proj()
    self.output = nnx.LinearGeneral(
      (cfg.num_heads, cfg.head_dim),
      cfg.hidden_size,
      axis=(-2, -1),
      kernel_init=init,
      dtype=cfg.dtype,
      rngs=rngs,
    )
    self.LayerNorm = nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs
    )
    self.attention_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    q, k, v = self.query(x), self.key(x), self.value(x)
    probs = _attention_weights(q, k, bias, self.config.dtype)
    probs = self.attention_dropout(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = self.dropout(self.output(ctx), deterministic=deterministic)
    return self.LayerNorm(out + x)


class BertLayerNNX(nnx.Module):
  """NNX twin of ``BertLayer``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    cfg = config
    init = nnx.initializers.normal(0.02)
    self.attention = BertAttentionNNX(cfg, rngs=rngs)
    self.intermediate = nnx.Linear(
      cfg.hidden_size, cfg.intermediate_size, kernel_init=init, dtype=cfg.dtype, rngs=rngs
    )
    self.output = nnx.Linear(
      cfg.intermediate_size, cfg.hidden_size, kernel_init=init, dtype=cfg.dtype, rngs=rngs
    )
    self.output_LayerNorm = nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs
    )
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    x = self.attention(x, bias, deterministic)
    h = nnx.gelu(self.intermediate(x), approximate=False)
    h = self.dropout(self.output(h), deterministic=deterministic)
    return self.output_LayerNorm(h + x)


class BertStackNNX(nnx.Module):
  """NNX twin of ``BertStack``; blocks in ``self.layers``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([BertLayerNNX(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    for layer in self.layers:
      x = layer(x, bias, deterministic)
    return x


class BertEncoderNNX(nnx.Module):
  """flax.nnx BERT encoder, the same computation and weights as ``BertEncoder``.

  Dropout draws from the ``rngs`` given at construction (stream 'dropout', else
  'default').
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddingsNNX(config, rngs=rngs)
    self.encoder = BertStackNNX(config, rngs=rngs)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    deterministic: bool = True,
  ) -> Array:
    """See ``BertEncoder.__call__``; returns (B, T, hidden_size)."""
    cfg = self.config
    attention_mask, token_type_ids = _check_inputs(cfg, input_ids, attention_mask, token_type_ids)
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    return self.encoder(x, attention_bias(attention_mask, cfg.dtype), deterministic)


class SentenceClassifierNNX(nnx.Module):
  """NNX twin of ``SentenceClassifier`` (attributes ``bert`` and ``classifier``)."""

  def __init__(self, config: BertConfig, num_classes: int, *, rngs: nnx.Rngs):
    if num_classes <= 0:
      raise ValueError(f"num_classes must be positive, got {num_classes}.")
    self.config = config
    self.num_classes = num_classes
    self.bert = BertEncoderNNX(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.classifier = nnx.Linear(
      config.hidden_size,
      num_classes,
      kernel_init=nnx.initializers.normal(0.02),
      dtype=config.dtype,
      rngs=rngs,
    )

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    deterministic: bool = True,
  ) -> Array:
    """Returns (B, num_classes) logits."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    hidden = self.bert(input_ids, attention_mask, token_type_ids, deterministic)
    pooled = self.dropout(mean_pool(hidden, attention_mask), deterministic=deterministic)
    return self.classifier(pooled)


# ----------------------------------------------------------------------------- Linen <-> NNX

_LINEN_LAYER = re.compile(r"^layer_(\d+)$")


def linen_to_nnx_params(params: Params) -> Params:
  """Linen param tree -> NNX pure dict (``encoder/layer_{i}`` -> ``encoder/layers/{i}``).

  Accepts the tree with or without the top-level ``{'params': ...}`` wrapper.
  """
  if set(params) == {"params"}:
    params = params["params"]

  def convert(tree: Any) -> Any:
    if not isinstance(tree, dict):
      return tree
    out: dict[Any, Any] = {}
    layers: dict[int, Any] = {}
    for key, value in tree.items():
      match = _LINEN_LAYER.match(str(key))
      if match:
        layers[int(match.group(1))] = convert(value)
      else:
        out[key] = convert(value)
    if layers:
      if "layers" in out:
        raise ValueError("Tree has both 'layer_{i}' and 'layers' entries.")
      out["layers"] = layers
    return out

  return convert(dict(params))


def nnx_to_linen_params(state: Any) -> Params:
  """NNX model, ``nnx.State`` or pure dict -> Linen param tree (no 'params' wrapper)."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)

  def convert(tree: Any) -> Any:
    if not isinstance(tree, dict):
      return tree
    out = {}
    for key, value in tree.items():
      if key == "layers" and isinstance(value, dict):
        for i, layer in value.items():
          out[f"layer_{int(i)}"] = convert(layer)
      else:
        out[key] = convert(value)
    return out

  return convert(dict(state))


def load_linen_params_into_nnx(model: nnx.Module, params: Params) -> nnx.Module:
  """Writes a Linen param tree into an NNX model in place; returns the model.

  Raises:
    ValueError: if the trees do not have the same paths and shapes.
  """
  pure = linen_to_nnx_params(params)
  state = nnx.state(model, nnx.Param)
  target = nnx.to_pure_dict(state)
  want = {p: jnp.shape(v) for p, v in _flatten(target).items()}
  got = {p: jnp.shape(v) for p, v in _flatten(pure).items()}
  if want != got:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    raise ValueError(
      f"Param trees differ: missing={missing[:5]} extra={extra[:5]} "
      f"shape mismatch={[(p, got[p], want[p]) for p in bad[:5]]}"
    )
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _flatten(tree: Any, prefix: tuple = ()) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  if not isinstance(tree, dict):
    return {"/".join(str(p) for p in prefix): tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, prefix + (key,)))
  return out
