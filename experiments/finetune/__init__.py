"""Fine-tuning trainer for text and image classification with LoRA / SDS-LoRA adapters."""
