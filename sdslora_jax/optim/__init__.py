"""Optax transforms for LoRA / SDS-LoRA adapter trees.

``sds_lora`` wraps the user's optimizer chain and runs the SDS-LoRA life cycle
(plain-LoRA warm-up, exact switch, base refreshes). ``loraplus``,
``scale_by_riemannian_lora`` and ``riemannian_lora`` are baselines on the same
trees; ``factor_labels`` labels factors for ``optax.partition``.

References:
  Oh, Baik & Lee, "SDS-LoRA: Overcoming Anisotropic Gradient Scaling in
  Low-Rank Adaptation", arXiv 2606.16454, 2026.
"""

from sdslora_jax.optim.baselines import (
    FACTOR_LABELS,
    factor_labels,
    loraplus,
    riemannian_lora,
    scale_by_riemannian_lora,
)
from sdslora_jax.optim.schedules import (
    RefreshSchedule,
    make_refresh_schedule,
    refresh_every,
    refresh_phases,
    refresh_steps,
)
from sdslora_jax.optim.sds import SWITCH_STATES, SdsLoraState, sds_lora, trainable_params

__all__ = [
    "FACTOR_LABELS",
    "RefreshSchedule",
    "SWITCH_STATES",
    "SdsLoraState",
    "factor_labels",
    "loraplus",
    "make_refresh_schedule",
    "refresh_every",
    "refresh_phases",
    "refresh_steps",
    "riemannian_lora",
    "scale_by_riemannian_lora",
    "sds_lora",
    "trainable_params",
]
