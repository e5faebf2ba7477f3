"""all-MiniLM-L6-v2 on Rotten Tomatoes movie-review sentiment (binary).

``--config=experiments/finetune/configs/minilm_sentiment.py`` (the README's main job), or
``...:smoke`` (a 2-layer model, a few steps on 64 sentences; for tests).
"""

from experiments.finetune.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "minilm"
  c.data.source = "rotten_tomatoes"
  c.data.max_len = 64  # 99% of the sentences have at most 58 tokens
  c.num_steps = 250
  c.batch_size = 32
  c.eval_every = 125
  c.checkpoint_every = 125
  c.optim.learning_rate = 1e-3
  if variant == "smoke":
    apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return c


def apply_smoke(c):
  c.model.num_layers = 2
  c.model.dropout_rate = 0.0
  c.data.max_len = 16
  c.data.train_split = "train[:64]"
  c.data.eval_split = "validation[:32]"
  c.data.test_split = "test[:32]"
  default.apply_smoke_loop(c, num_steps=6)
