# `make tiles features distill` runs the embedded demo; `make test` runs the tests.
# Both create (or reuse) the virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
DEMO := data/demo/SOURCES.json

.PHONY: venv demo-data tiles features distill evaluate test bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench,teachers]'
	touch $@

$(DEMO): | $(VENV)/.installed
	$(PY) cli.py demo-data

demo-data: $(DEMO)

tiles: $(VENV)/.installed $(DEMO)
	$(PY) cli.py tiles --config $(CONFIG)

features: $(VENV)/.installed
	$(PY) cli.py features --config $(CONFIG)

distill: $(VENV)/.installed
	$(PY) cli.py distill --config $(CONFIG) --resume

evaluate: $(VENV)/.installed
	$(PY) cli.py evaluate --config $(CONFIG)

# Two workers, one test file each (--dist loadfile keeps a module's local Ray or Slurm cluster in one
# worker): much of the suite waits on Ray start-up and subprocesses, so two fill two cores.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(VENV)/.installed $(DEMO)
	$(PY) -m bench

clean-demo:
	rm -rf runs/demo
