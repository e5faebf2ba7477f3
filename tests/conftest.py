"""Test set-up: 8 simulated CPU devices, set before JAX is imported."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile hundreds of small programs and run each for milliseconds, so XLA:CPU's
# LLVM optimisation was a third of the suite's time. This skips it (backend optimisation
# level 0); the HLO passes (fusion, sharding, buffer assignment: what the tests that read
# HLO text or memory_analysis() check) run as usual. Values round differently from the
# optimised build (test_scan's tolerances say by how much). JAX_DISABLE_MOST_OPTIMIZATIONS=0
# runs the suite fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs are kept on disk between runs (JAX's persistent compilation cache; its
# key is the whole program with the compiler's version and options, so an edit recompiles
# only the programs it changes). A clean checkout, as in CI, starts empty.
# JAX_ENABLE_COMPILATION_CACHE=0 turns it off; JAX_COMPILATION_CACHE_DIR moves it.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
# Programs that took 0.1 s or more to compile (JAX's default, 1 s, would skip most of the
# tests'); eager op-by-op programs compile faster than they could be written and read.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# No size limit: JAX's eviction lists the whole folder on every write (quadratic in the
# entries). `make clean` removes the folder.


def pytest_ignore_collect(collection_path, config):
  """The PyTorch PEFT modules are collected only when ``-m peft_torch`` selects them."""
  if collection_path.name not in ("test_peft_torch.py", "test_peft_torch_llm.py"):
    return None
  expr = config.getoption("markexpr") or ""
  return True if "peft_torch" not in expr or "not peft_torch" in expr else None
