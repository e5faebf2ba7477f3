"""The experiments' tests (models, trainer, data pipeline, benchmarks, result tables, and the
library on the experiments' models and teacher problem).

Everything in this folder carries the ``experiments`` marker: ``make test`` runs it with the
library's tests; ``make test-library`` leaves it out.
"""

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _HERE in pathlib.Path(item.fspath).parents:
      item.add_marker(pytest.mark.experiments)
