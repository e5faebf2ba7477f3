"""Test set-up: 8 simulated CPU devices, set before JAX is imported."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_ignore_collect(collection_path, config):
  """The PyTorch PEFT modules are collected only when ``-m peft_torch`` selects them."""
  if collection_path.name not in ("test_peft_torch.py", "test_peft_torch_llm.py"):
    return None
  expr = config.getoption("markexpr") or ""
  return True if "peft_torch" not in expr or "not peft_torch" in expr else None
