"""sdslora-jax: LoRA and SDS-LoRA adapters for JAX and Flax.

SDS-LoRA (Oh, Baik & Lee, arXiv 2606.16454) keeps the singular values of the
LoRA factors out of the backward pass: the full fine-tuning gradient reaches the
factors only through orthonormal bases of their subspaces.

The public API is the names below plus the Flax frontends ``sdslora_jax.linen``
and ``sdslora_jax.nnx``, the Optax baselines in ``sdslora_jax.optim`` and the
metrics in ``sdslora_jax.diagnostics`` (the README's "Public API" table lists
them all). Other modules and names are internal and may change.
"""

from sdslora_jax.adapter import (
    Adapter,
    adapted_matmul,
    adapter_matmul,
    init_adapter,
    is_adapter,
    kernel_delta,
    restamp,
    verify_stamps,
    with_fresh_bases,
)
from sdslora_jax.basis import orthonormal_basis, refresh_bases
from sdslora_jax.checkpoint import (
    CheckpointDamagedError,
    CheckpointMismatchError,
    read_extra,
    restore_adapters,
    restore_from_manager,
    save_adapters,
    save_args,
)
from sdslora_jax.fused import merging
from sdslora_jax.intercept import OpLevelError, apply, init_adapters
from sdslora_jax.ops import lora_delta, lora_matmul, sds_delta, sds_matmul, warmup_sds_matmul
from sdslora_jax.optim.sds import sds_lora
from sdslora_jax.peft import export_peft, import_peft
from sdslora_jax.reparam import activate_sds
from sdslora_jax.sharding import adapter_shardings, opt_state_shardings
from sdslora_jax.targets import rule
from sdslora_jax.tree import merge

__version__ = "0.1.0"

__all__ = [
    # The functional core: one adapter, its ops and its switch.
    "Adapter",
    "init_adapter",
    "is_adapter",
    "adapter_matmul",
    "adapted_matmul",
    "kernel_delta",
    "merging",
    "lora_matmul",
    "lora_delta",
    "sds_matmul",
    "sds_delta",
    "warmup_sds_matmul",
    "activate_sds",
    "orthonormal_basis",
    "refresh_bases",
    # Any model: adapters for the weights rules select, applied at the ops using them.
    "rule",
    "init_adapters",
    "apply",
    "merge",
    "OpLevelError",
    # Training: the Optax transform and its guard.
    "sds_lora",
    "verify_stamps",
    "restamp",
    "with_fresh_bases",
    # Scaling out, saving, exporting.
    "adapter_shardings",
    "opt_state_shardings",
    "save_adapters",
    "restore_adapters",
    "read_extra",
    "save_args",
    "restore_from_manager",
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "export_peft",
    "import_peft",
]
