"""all-MiniLM-L6-v2 on a user's text-classification file (CSV with a header, or JSONL).

  python -m experiments.finetune.main --workdir runs/mine \\
    --config=experiments/finetune/configs/text_csv.py \\
    --config.data.train_file=reviews.csv --config.data.text_key=review \\
    --config.data.label_key=stars

Without ``data.validation_file``, ``data.validation_fraction`` of the file is held out.
"""

from experiments.finetune.configs import default
from experiments.finetune.configs.minilm_sentiment import apply_smoke


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "minilm"
  c.data.source = "csv"
  c.data.test_split = ""
  c.num_steps = 200
  if variant == "smoke":
    apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return c
