"""``ml_collections`` config files for the fine-tuning trainer (``--config=FILE[:variant]``)."""
