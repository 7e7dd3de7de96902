"""The TRL releases the pin admits besides the installed one: on each, the parity test (`tree_sampling=False` is
GRPOTrainer to the bit) and TreePO steps: unpacked and packed on the transformers backend, and through vLLM colocate
(docs/reliability.md#trl-releases).

`make setup` installs each release beside the environment's own TRL (`.venv/trl-versions/<version>`, without its
dependencies, which the environment already satisfies); each test runs a few of the suite's tests in a subprocess
that imports that TRL first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each supported release other than the installed one. TRL 1.14.0 lacks `_generate_single_turn`'s `num_generations`
# and is refused at import; TRL 1.14.1's GRPOTrainer has no `eos_token_ids`, which the tree's EOS stop reads; TRL
# 1.15.0's GRPOTrainer scores tokens with a Triton kernel even on a CPU, so it cannot run on a machine without a GPU.
# The pin leaves all three out.
VERSIONS = ("1.14.2",)
TESTS = (
    "tests/test_parity.py::test_tree_sampling_off_trains_exactly_as_grpo_trainer",
    "tests/test_trainer.py::test_train_end_to_end_decodes_fewer_tokens_than_it_trains_on",
    "tests/test_trainer.py::test_packed_training_passes_its_self_check_against_trls_own_forward",
    "tests/test_vllm.py::test_colocate_training_keeps_vllm_in_sync_and_shares_prefixes",
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", VERSIONS)
def test_parity_and_treepo_steps_on_each_supported_trl_release(version):
    site = Path(sys.prefix) / "trl-versions" / version
    assert (site / "trl").is_dir(), f"TRL {version} is not installed beside the environment ({site}): run `make setup`."
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"], env=environment,
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert check.stdout.strip() == version, check.stderr[-2000:]
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], env=environment,
                              capture_output=True, text=True, cwd=ROOT, timeout=1200)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-4000:]
    assert f"{len(TESTS)} passed" in finished.stdout
