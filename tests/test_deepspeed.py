"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch`, two CPU processes (DeepSpeed's CPU accelerator, gloo).

The job (deepspeed_job.py) trains two TreePO steps with deliberately uneven trees (rank 0's stop at once and fall
back; rank 1's run the full depth and pack into more sequences), packed and unpacked, under the shipped CPU configs
(examples/accelerate_configs/deepspeed_zero{2,3}_cpu.yaml), within a timeout: under ZeRO-3 every forward gathers
the weights, so a rank that ran fewer forwards would wait forever. Each run must match the same job run unsharded
(two processes of plain data parallelism, multi_cpu.yaml): the same gradient norms and the same updated weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_treepo.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples/accelerate_configs"
# Float32 throughout: the sharded reductions only reorder sums (measured: weights within 1e-6, norms within 2e-5).
WEIGHT_TOLERANCE, NORM_TOLERANCE = 1e-5, 1e-4


def launch(config: str, model: str, output: Path, *modes: str) -> list[dict]:
    output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--main_process_port", str(free_port()), str(ROOT / "tests/deepspeed_job.py"), model, str(output),
               *modes]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, run in enumerate(runs):
        run["weights"] = torch.load(output / f"weights{rank}.pt")
    return runs


@pytest.fixture(scope="module")
def unsharded(tiny_model, tmp_path_factory):
    """The reference runs: the same jobs under plain data parallelism, packed and unpacked."""
    root = tmp_path_factory.mktemp("unsharded")
    return {packing: launch("multi_cpu.yaml", tiny_model, root / packing, packing, "uneven")
            for packing in ("packed", "unpacked")}  # fmt: skip


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("packing", ["packed", "unpacked"])
def test_zero_trains_uneven_trees_in_step_and_matches_unsharded_training(tiny_model, tmp_path, unsharded, stage,
                                                                         packing):  # fmt: skip
    runs = launch(f"deepspeed_zero{stage}_cpu.yaml", tiny_model, tmp_path, packing, "uneven")
    reference = unsharded[packing]
    for run in runs:
        assert run["distributed_type"] == "DistributedType.DEEPSPEED" and run["zero_stage"] == stage
        assert run["partitioned"] is (stage == 3)  # ZeRO-3 holds a partition of each weight, ZeRO-2 all of it
        assert (run["packing"] is True) == (packing == "packed")  # packed forwards passed their self-check
    # the premise: the ranks' trees differ (rank 0 falls back), yet every step both ran as many forwards and
    # generate calls
    assert runs[0]["logs"][0]["tree/fallback_events"] > 0
    for step in runs[0]["steps"]:
        assert step[0] == step[1], f"ranks ran different numbers of forwards or generate calls: {step}"
    for run, base in zip(runs, reference):
        assert [log["grad_norm"] for log in run["logs"]] == pytest.approx(
            [log["grad_norm"] for log in base["logs"]], rel=NORM_TOLERANCE)
        assert [log["loss"] for log in run["logs"]] == pytest.approx([log["loss"] for log in base["logs"]], abs=1e-6)
        for name, weight in base["weights"].items():
            torch.testing.assert_close(run["weights"][name], weight, rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
