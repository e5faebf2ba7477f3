"""EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST, 10 classes.

Images are resized to ``data.image_size`` and repeated to RGB inside the model step.
Fashion-MNIST has no validation split; the last 5,000 training images serve as one.
"""

from experiments.finetune.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "efficientnet_lite0"
  c.data.source = "fashion_mnist"
  c.data.train_split = "train[:55000]"
  c.data.eval_split = "train[55000:]"
  c.data.test_split = "test"
  c.data.image_size = 64
  # The 1x1 convolutions (expand, project, head); not the depthwise ones.
  c.adapter.targets = (r"block_\d+/(expand_conv|project_conv)/kernel", r"conv_head/kernel")
  c.batch_size = 64
  c.num_steps = 300
  c.optim.learning_rate = 2e-3
  if variant == "smoke":
    c.data.train_split = "train[:64]"
    c.data.eval_split = "train[64:96]"
    c.data.test_split = "test[:32]"
    c.data.image_size = 32
    default.apply_smoke_loop(c, num_steps=4)
    # Fewer adapted convolutions: each is merged per call, which dominates compile time.
    c.adapter.targets = (r"block_15/(expand_conv|project_conv)/kernel", r"conv_head/kernel")
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return c
