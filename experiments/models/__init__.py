"""Models for the fine-tuning experiments: BERT / MiniLM, EfficientNet-Lite0 and a small ConvNet."""

from experiments.models.bert import (
  BertConfig,
  BertEncoder,
  BertEncoderNNX,
  SentenceClassifier,
  SentenceClassifierNNX,
  linen_to_nnx_params,
  load_linen_params_into_nnx,
  mean_pool,
  nnx_to_linen_params,
  tiny_config,
)
from experiments.models.convnet import ConvNet, ConvNetNNX
from experiments.models.efficientnet import EfficientNetLite0, load_efficientnet_lite0

__all__ = [
  "BertConfig",
  "BertEncoder",
  "BertEncoderNNX",
  "ConvNet",
  "ConvNetNNX",
  "EfficientNetLite0",
  "SentenceClassifier",
  "SentenceClassifierNNX",
  "linen_to_nnx_params",
  "load_efficientnet_lite0",
  "load_linen_params_into_nnx",
  "mean_pool",
  "nnx_to_linen_params",
  "tiny_config",
]
