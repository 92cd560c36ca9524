# The two README commands. Each sets up .venv on first use (and again when setup.py changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: demo test

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The main job on its embedded default (tiny model, tiny random CLIP teacher, CPU). Each run
# trains afresh (the generated data and teacher are reused).
demo: $(STAMP)
	rm -rf workdirs/demo/checkpoints workdirs/demo/metrics.jsonl workdirs/demo/events.out.*
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m uniemox_jax.main --config configs/demo.py --workdir workdirs/demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest
