"""Prepares the fine-tuning data sets as TFDS array_record datasets from installed files.

``python -m experiments.finetune.prepare_data [--data_dir DIR] [--rotten_tomatoes PATH]``

* Rotten Tomatoes sentences: ``PATH`` is the ``vaderSentiment-3.3.2.tar.gz`` source
  distribution (``pip download --no-deps --no-binary :all: vadersentiment==3.3.2``), the
  ``hutto_ICWSM_2014.tar.gz`` inside it, or the extracted text file; by default the first
  of these found under ``data/``.
* Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist`` package.

Nothing is downloaded. A dataset already prepared in ``DIR`` is left as it is.
"""

from __future__ import annotations

import glob
import os
import tarfile
import tempfile

from absl import flags

from experiments import cli
from experiments.finetune import input_pipeline as ip
from experiments.finetune.tasks import default_data_dir


_SDIST = "vaderSentiment-3.3.2.tar.gz"


def _rotten_tomatoes_file(path: str | None, search: str) -> str:
  """The tarball or text file to build from, extracting it from the sdist if needed."""
  if path is None:
    found = sorted(glob.glob(os.path.join(search, "**", _SDIST), recursive=True))
    if not found:
      raise FileNotFoundError(
        f"no {_SDIST} under {search!r}: run `pip download --no-deps --no-binary :all: "
        f"vadersentiment==3.3.2 -d {search}` (the README's set-up does) or pass --rotten_tomatoes"
      )
    path = found[0]
  if os.path.basename(path) != _SDIST:
    return path
  with tarfile.open(path) as sdist:
    member = next(
      (m for m in sdist.getmembers() if m.name.endswith("/" + ip._RT_TARBALL)), None
    )
    if member is None:
      raise FileNotFoundError(f"{path} has no {ip._RT_TARBALL}")
    out = os.path.join(tempfile.mkdtemp(prefix="sdslora_rt_"), ip._RT_TARBALL)
    with open(out, "wb") as f:
      f.write(sdist.extractfile(member).read())
  return out


def prepare_all(data_dir: str, rotten_tomatoes: str | None = None, search: str = "data",
                fashion_mnist: str | None = None, which=("rotten_tomatoes", "fashion_mnist")):
  """Prepares the named datasets into ``data_dir``; returns their builders."""
  builders = {}
  if "rotten_tomatoes" in which:
    builders["rotten_tomatoes"] = ip.prepare(
      ip.RottenTomatoesSentences, data_dir, _rotten_tomatoes_file(rotten_tomatoes, search)
    )
  if "fashion_mnist" in which:
    source = fashion_mnist or ip._FASHION_MNIST_DIR
    if not os.path.isdir(source):
      raise FileNotFoundError(
        f"no Fashion-MNIST files in {source!r}: `apt-get install dataset-fashion-mnist` "
        "(the README's set-up does) or pass --fashion_mnist DIR"
      )
    builders["fashion_mnist"] = ip.prepare(ip.FashionMnistIdx, data_dir, source)
  return builders


FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", None, "The TFDS data directory (default: $SDSLORA_DATA_DIR "
                    "or ./data/tfds).", flag_values=FLAGS)
flags.DEFINE_string("rotten_tomatoes", None, "sdist, tarball or text file.", flag_values=FLAGS)
flags.DEFINE_string("fashion_mnist", None, "Directory of the IDX files.", flag_values=FLAGS)
flags.DEFINE_string("search", "data", "Where to look for the sdist.", flag_values=FLAGS)
flags.DEFINE_enum("only", None, ["rotten_tomatoes", "fashion_mnist"], "Prepare only this one.",
                  flag_values=FLAGS)


def main(argv=None):
  args = cli.parse(FLAGS, argv)
  which = (args.only,) if args.only else ("rotten_tomatoes", "fashion_mnist")
  builders = prepare_all(args.data_dir or default_data_dir(), args.rotten_tomatoes, args.search, args.fashion_mnist,
                         which)
  for name, b in builders.items():
    sizes = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"{name}: {b.data_dir} {sizes}")


if __name__ == "__main__":
  cli.run(main, FLAGS)
