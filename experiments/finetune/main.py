r"""Fine-tunes a pretrained model from a config file.

  python -m experiments.finetune.main --workdir runs/sst \
    --config experiments/finetune/configs/minilm_sentiment.py [--config.method=lora] [--resume]

Any config field can be overridden on the command line (``--config.adapter.rank=16``).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (FILE[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and exports go.")
flags.DEFINE_bool("resume", False, "Continue from the newest intact checkpoint in workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and TFDS log every file at INFO
  if config.distributed.enabled:  # before any other JAX call
    import jax
    d = config.distributed
    kwargs = {}
    if d.coordinator_address:
      kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes:
      kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
      kwargs["process_id"] = d.process_id
    if d.local_device_ids:
      kwargs["local_device_ids"] = list(d.local_device_ids)
    jax.distributed.initialize(**kwargs)
  from experiments.finetune.train import WorkdirInUseError, train_and_evaluate
  try:
    train_and_evaluate(config, FLAGS.workdir, resume=FLAGS.resume)
  except (ValueError, FileExistsError, FileNotFoundError, KeyError, FloatingPointError,
          WorkdirInUseError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
