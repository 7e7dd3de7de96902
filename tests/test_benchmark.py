"""`python -m trl_treepo.benchmark` end to end on the tiny model (small shapes: this checks the tool, not speed)."""

import json
import subprocess
import sys

from trl_treepo.benchmark import main


def test_rollout_benchmark_reports_both_modes_and_their_ratios(tiny_model):
    report = main(["--model", tiny_model, "--task", "basic_arithmetic", "--prompts", "2", "--width", "4",
                   "--segment-length", "4", "--depth", "3", "--warmup", "0", "--repeats", "1"])  # fmt: skip
    for mode in ("sequential", "tree"):
        assert report[mode]["trajectories"] == 8
    assert report["tree"]["decoded_tokens"] < report["tree"]["leaf_tokens"]
    assert report["decoded_token_ratio"] == report["tree"]["decoded_tokens"] / report["sequential"]["decoded_tokens"]
    assert report["speedup"] > 0 and report["efficiency"] == report["speedup"] * report["decoded_token_ratio"]


def test_rollout_benchmark_compares_the_schedules_side_by_side(tiny_model):
    report = main(["--model", tiny_model, "--task", "basic_arithmetic", "--prompts", "3", "--width", "4",
                   "--segment-length", "4", "--depth", "3", "--warmup", "0", "--repeats", "1",
                   "--compare-schedules"])  # fmt: skip
    level, per_tree = report["schedules"]["level"], report["schedules"]["per_tree"]
    assert report["schedule"] == "level" and report["tree"] == level["tree"]
    assert level["tree"]["trajectories"] == per_tree["tree"]["trajectories"] == 12
    # transformers cannot add requests to a running batch: per tree, each tree level is its own call
    assert per_tree["tree"]["engine_calls"] > level["tree"]["engine_calls"] >= 3
    for ratios in (level, per_tree):
        assert ratios["trajectory_speedup_limit"] == 1 / ratios["decoded_token_ratio"]
        assert ratios["trajectory_speedup_of_limit"] == ratios["trajectory_speedup"] * ratios["decoded_token_ratio"]


def test_agentic_benchmark_counts_the_tool_calls_of_both_modes(tool_model):
    report = main(["--model", tool_model, "--tools", "--prompts", "2", "--width", "8", "--segment-length", "32",
                   "--depth", "6", "--warmup", "0", "--repeats", "1", "--tool-latency", "0"])  # fmt: skip
    sequential, tree = report["sequential"], report["tree"]
    assert sequential["trajectories"] == tree["trajectories"] == 16
    # sequential rollouts run every call on every trajectory; the tree runs each once per node
    assert sequential["tool_calls"] == sequential["path_tool_calls"] > 0
    assert 0 < tree["tool_calls"] < tree["path_tool_calls"]
    assert report["tree_tool_call_sharing"] == tree["tool_calls"] / tree["path_tool_calls"]
    per_trajectory = (tree["tool_calls"] / 16) / (sequential["tool_calls"] / 16)
    assert report["tool_call_ratio"] == per_trajectory
    assert sequential["engine_calls"] >= 2  # the first turn, then the turns after tool results


def test_training_benchmark_compares_grpo_treepo_and_packed_steps(tiny_model):
    command = [sys.executable, "-m", "trl_treepo.benchmark", "--model", tiny_model, "--task", "basic_arithmetic",
               "--prompts", "2", "--width", "4", "--segment-length", "4", "--depth", "3", "--warmup", "0",
               "--repeats", "1", "--train", "--json"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    train = json.loads(finished.stdout.strip().splitlines()[-1])["train"]
    assert set(train) >= {"grpo", "treepo", "treepo-packed", "step_speedup", "packed_loss_speedup"}
    assert train["treepo"]["completion_tokens"] == train["treepo-packed"]["completion_tokens"]  # the same trees
    assert 0 < train["treepo-packed"]["packed_token_ratio"] < 1
    assert all(train[name]["loss_s"] > 0 and train[name]["peak_memory_mb"] > 0 for name in ("grpo", "treepo"))


def test_packing_benchmark_measures_every_path_on_the_same_tree():
    command = [sys.executable, "-m", "trl_treepo.benchmark", "--packing", "2x16", "--layers", "1", "--width", "4",
               "--json"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (point,) = json.loads(finished.stdout.strip().splitlines()[-1])["packing"]
    assert (point["depth"], point["segment_length"]) == (2, 16)
    assert 0 < point["packed_token_ratio"] < 1 and point["unique_tokens"] < point["row_tokens"]
    for mode in ("unpacked", "dense", "tree"):
        assert point[mode]["loss_s"] > 0 and point[mode]["peak_mb"] > 0
    assert point["tree_speedup"] == point["unpacked"]["loss_s"] / point["tree"]["loss_s"]
