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

# The main job on its embedded default (tiny model, tiny random CLIP teacher, CPU): pretrain,
# then fine-tune the pretrained encoder and print the test table. Each run trains afresh (the
# generated data and teacher are reused).
demo: $(STAMP)
	rm -rf workdirs/demo/checkpoints workdirs/demo/metrics.jsonl workdirs/demo/events.out.* \
	  workdirs/demo/finetune
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m uniemox_jax.main --config configs/demo.py --workdir workdirs/demo
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m uniemox_jax.main --config configs/demo_finetune.py \
	  --workdir workdirs/demo/finetune

test: $(STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest
