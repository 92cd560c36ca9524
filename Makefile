# The two README commands. Each sets up .venv on first use (and again when setup.py changes):
# `make demo` installs what the main job needs, `make test` adds the test extra (PyTorch, timm,
# scikit-learn, TensorFlow: the references the tests compare against; libtpu: the TPU compiler).
PYTHON ?= python3
VENV := .venv
SETUP := $(shell cksum setup.py | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.installed-demo-$(SETUP)
TEST_STAMP := $(VENV)/.installed-test-$(SETUP)
# The `datasets` library, in an environment of its own, writes the Hugging Face fixtures of
# tests/test_hf_datasets.py (tests/hf_writer.requirements.txt says why).
HF_WRITER := $(VENV)/hf-writer
HF_WRITER_STAMP := $(HF_WRITER)/.installed-$(shell cksum tests/hf_writer.requirements.txt | cut -d' ' -f1)

.PHONY: demo test

$(DEMO_STAMP): setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "Setting up $(VENV) for the demo (first run only; pip shows its progress)"
	$(VENV)/bin/python -m pip install --upgrade --progress-bar on pip
	$(VENV)/bin/python -m pip install --progress-bar on -e .
	@rm -f $(VENV)/.installed-demo-* && touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	@echo "Adding the test extra to $(VENV) (first run only)"
	$(VENV)/bin/python -m pip install --progress-bar on -e '.[test]'
	@rm -f $(VENV)/.installed-test-* && touch $@

$(HF_WRITER_STAMP): tests/hf_writer.requirements.txt
	@test -x $(HF_WRITER)/bin/python || $(PYTHON) -m venv $(HF_WRITER)
	@echo "Setting up $(HF_WRITER), the Hugging Face fixtures' writer (first run only)"
	$(HF_WRITER)/bin/python -m pip install --progress-bar on -r tests/hf_writer.requirements.txt
	@rm -f $(HF_WRITER)/.installed-* && touch $@

# The main job on its embedded default (tiny model, tiny random CLIP teacher, CPU): pretrain,
# then fine-tune the pretrained encoder and print the test table. Each run trains afresh (the
# generated data and teacher are reused).
demo: $(DEMO_STAMP)
	rm -rf workdirs/demo/checkpoints workdirs/demo/metrics.jsonl workdirs/demo/events.out.* \
	  workdirs/demo/evaluations \
	  workdirs/demo/finetune
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m uniemox_jax.demo --workdir workdirs/demo

test: $(TEST_STAMP) $(HF_WRITER_STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest
