"""A small CNN classifier for NHWC images, in Flax Linen and flax.nnx.

Parameter layout (both versions)::

  conv_{i}/kernel  (3, 3, C_in, features[i])   conv_{i}/bias
  head/kernel      (features[-1], num_classes) head/bias

Each conv block is 3x3 SAME conv -> ReLU -> 2x2 average pooling (stride 2); the
feature map is then averaged over space and fed to the linear ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn
from flax import nnx

Array = jax.Array

__all__ = ["ConvNet", "ConvNetNNX", "linen_to_nnx_params", "load_linen_params_into_nnx"]


def _check(num_classes: int, features: Sequence[int]) -> None:
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  if not features or any(f <= 0 for f in features):
    raise ValueError(f"features must be a non-empty sequence of positive ints, got {features}.")


def _check_images(x: Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"Expected NHWC images (B, H, W, C), got shape {x.shape}.")


def _pool(x: Array) -> Array:
  # Pooling a 1-pixel map would empty it; keep it as is instead.
  if min(x.shape[1], x.shape[2]) < 2:
    return x
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ConvNet(nn.Module):
  """Conv(3x3) + ReLU + avg-pool blocks, global average, dense head.

  Attributes:
    num_classes: number of output logits.
    features: output channels of each conv block.
  """

  num_classes: int = 10
  features: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps (B, H, W, C) images to (B, num_classes) logits."""
    _check(self.num_classes, self.features)
    _check_images(x)
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding="SAME", name=f"conv_{i}")(x)
      x = _pool(nn.relu(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class ConvNetNNX(nnx.Module):
  """flax.nnx twin of ``ConvNet`` (convs in ``self.convs``, linear ``self.head``)."""

  def __init__(
    self,
    num_classes: int = 10,
    features: Sequence[int] = (16, 32),
    *,
    rngs: nnx.Rngs,
    in_channels: int = 1,
  ):
    _check(num_classes, features)
    if in_channels <= 0:
      raise ValueError(f"in_channels must be positive, got {in_channels}.")
    self.in_channels = in_channels
    chans = [in_channels, *features]
    self.convs = nnx.List(
      [
        nnx.Conv(chans[i], chans[i + 1], (3, 3), padding="SAME", rngs=rngs)
        for i in range(len(features))
      ]
    )
    self.head = nnx.Linear(features[-1], num_classes, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """Maps (B, H, W, in_channels) images to (B, num_classes) logits."""
    _check_images(x)
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"Expected {self.in_channels} input channels, got shape {x.shape}.")
    for conv in self.convs:
      x = _pool(nnx.relu(conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def linen_to_nnx_params(params: dict) -> dict:
  """``ConvNet`` params -> ``ConvNetNNX`` pure dict (``conv_{i}`` -> ``convs/{i}``)."""
  if set(params) == {"params"}:
    params = params["params"]
  convs = {int(k.split("_")[1]): v for k, v in params.items() if k.startswith("conv_")}
  return {"convs": convs, "head": params["head"]}


def load_linen_params_into_nnx(model: ConvNetNNX, params: dict) -> ConvNetNNX:
  """Writes ``ConvNet`` params into a ``ConvNetNNX`` in place; returns the model."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, linen_to_nnx_params(params))
  nnx.update(model, state)
  return model
