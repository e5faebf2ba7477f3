"""sdslora-jax: LoRA and SDS-LoRA adapters for JAX and Flax.

SDS-LoRA (Oh, Baik & Lee, arXiv 2606.16454) keeps the singular values of the
LoRA factors out of the backward pass: the full fine-tuning gradient reaches the
factors only through orthonormal bases of their subspaces.
"""

from sdslora_jax.adapter import (
    Adapter,
    adapter_delta,
    adapter_matmul,
    init_adapter,
    is_adapter,
    kernel_delta,
    layer_view,
    restamp,
    take_layer,
)
from sdslora_jax.basis import align_signs, factor_bases, orthonormal_basis, refresh_bases
from sdslora_jax.gram_basis import gram_orthonormal_basis, gram_qr
from sdslora_jax.ops import lora_delta, lora_matmul, sds_delta, sds_matmul, warmup_sds_matmul
from sdslora_jax.reparam import activate_sds

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "adapter_delta",
    "adapter_matmul",
    "init_adapter",
    "is_adapter",
    "kernel_delta",
    "layer_view",
    "restamp",
    "take_layer",
    "activate_sds",
    "align_signs",
    "factor_bases",
    "gram_orthonormal_basis",
    "gram_qr",
    "lora_delta",
    "lora_matmul",
    "orthonormal_basis",
    "refresh_bases",
    "sds_delta",
    "sds_matmul",
    "warmup_sds_matmul",
]
