"""Where the experiments rely on another library's internals: one test each, failing when they change."""

import subprocess
import sys
import pathlib

import tensorflow_datasets as tfds

from experiments.finetune import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_tfds_builders_override_code_path_which_tfds_still_has():
  # input_pipeline._LocalBuilder overrides ``code_path`` (TFDS looks for a checksums file
  # through it); if TFDS stops defining it, the override is dead and can go.
  assert any("code_path" in vars(c) for c in tfds.core.GeneratorBasedBuilder.__mro__[1:])
  assert input_pipeline.RottenTomatoesSentences.code_path is None


def test_reporting_loads_clu_writers_without_tensorflow():
  # reporting._import_clu registers clu.metric_writers from the modules it uses (clu 0.0.12
  # imports TensorFlow in the package's __init__): the classes must be clu's own.
  code = ("import sys; from experiments.finetune import reporting as r; "
          "from clu.metric_writers import interface, multi_writer, logging_writer; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
          "assert r.metric_writers.MultiWriter is multi_writer.MultiWriter; "
          "assert r.metric_writers.LoggingWriter is logging_writer.LoggingWriter; "
          "assert issubclass(r.JsonlWriter, interface.MetricWriter)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
