"""Optax transforms for LoRA / SDS-LoRA adapter trees.

``sds_lora`` (also ``sdslora_jax.sds_lora``) wraps the user's optimizer chain and
runs the SDS-LoRA life cycle (plain-LoRA warm-up, exact switch, base refreshes);
``trainable_params`` is the tree its inner optimizer sees and ``SdsLoraState`` its
state. ``loraplus``, ``scale_by_riemannian_lora`` and ``riemannian_lora`` are
baselines on the same trees; ``factor_labels`` labels factors for
``optax.partition``.

References:
  Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
  Low-Rank Adaptation", arXiv 2606.16454, 2026.
"""

from sdslora_jax.optim.baselines import factor_labels, loraplus, riemannian_lora, scale_by_riemannian_lora
from sdslora_jax.optim.sds import SdsLoraState, sds_lora, trainable_params

__all__ = [
    "SdsLoraState",
    "factor_labels",
    "loraplus",
    "riemannian_lora",
    "sds_lora",
    "scale_by_riemannian_lora",
    "trainable_params",
]
