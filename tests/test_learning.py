"""`python -m trl_treepo.learning`, the TreePO-vs-GRPO study: a 2-step smoke run, and its summary arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trl_treepo.learning import TASK_CONFIG, _tokens_to_reach, summarize, summary_table
from trl_treepo.testing import make_math_dataset, worked_steps


def test_the_study_command_runs_every_arm_and_writes_its_report(tmp_path):
    command = [sys.executable, "-m", "trl_treepo.learning", "--output_dir", str(tmp_path / "study"), "--seeds", "0",
               "--arms", "treepo,grpo", "--max_steps", "2", "--eval_every", "1", "--warmup_steps", "10",
               "--backend", "transformers", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, finished.stderr[-3000:]
    study = tmp_path / "study"
    report = json.loads((study / "study.json").read_text())
    assert {run["arm"] for run in report["runs"]} == {"treepo", "grpo"}
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [0, 1, 2]
        assert all(0 <= point["sampled"] <= 1 and point["sampled_se"] >= 0 for point in run["curve"])
        assert run["curve"][-1]["decoded_tokens"] == pytest.approx(sum(run["decoded_tokens"]))
    treepo = next(run for run in report["runs"] if run["arm"] == "treepo")
    assert sum(treepo["decoded_tokens"]) < sum(treepo["leaf_tokens"])  # the tree decodes shared prefixes once
    assert (study / "accuracy-vs-decoded-tokens.png").stat().st_size > 0
    assert (study / "accuracy-vs-wall-time.png").stat().st_size > 0
    assert "TRL GRPO" in (study / "summary.md").read_text()


def curve(*points):
    return [{"decoded_tokens": tokens, "sampled": sampled, "greedy": sampled, "wall_s": 1.0, "sampled_se": 0.0}
            for tokens, sampled in points]  # fmt: skip


def test_tokens_to_reach_an_accuracy_interpolates_between_measurements():
    points = curve((0, 0.5), (1000, 0.6), (2000, 0.7))
    assert _tokens_to_reach(points, "sampled", 0.65) == pytest.approx(1500)
    assert _tokens_to_reach(points, "sampled", 0.5) == 0.0
    assert _tokens_to_reach(points, "sampled", 0.8) is None


def test_the_summary_gives_gains_over_seeds_and_compares_each_seed_with_its_grpo_run():
    runs = [
        {"arm": "grpo", "seed": 0, "curve": curve((0, 0.5), (1000, 0.6)), "rewards": [0.4, 0.6],
         "decoded_tokens": [500, 500], "leaf_tokens": [500, 500]},
        {"arm": "grpo", "seed": 1, "curve": curve((0, 0.5), (1000, 0.7)), "rewards": [0.4, 0.8],
         "decoded_tokens": [500, 500], "leaf_tokens": [500, 500]},
        {"arm": "treepo", "seed": 0, "curve": curve((0, 0.5), (400, 0.7)), "rewards": [0.5, 0.5],
         "decoded_tokens": [200, 200], "leaf_tokens": [600, 600]},
        {"arm": "treepo", "seed": 1, "curve": curve((0, 0.5), (800, 0.6)), "rewards": [0.5, 0.7],
         "decoded_tokens": [400, 400], "leaf_tokens": [600, 600]},
    ]  # fmt: skip
    summary = summarize(runs)
    assert summary["grpo"]["sampled_gain"] == pytest.approx(0.15)
    assert summary["grpo"]["sampled_gain_se"] == pytest.approx(0.05)  # stdev 0.0707 / sqrt(2)
    assert summary["grpo"]["reward_gain"] == pytest.approx(0.3)
    # GRPO at 400 tokens: 0.54 on seed 0; at 800 tokens: 0.66 on seed 1
    assert summary["treepo"]["sampled_vs_grpo_at_equal_tokens"] == pytest.approx(((0.7 - 0.54) + (0.6 - 0.66)) / 2)
    # seed 0 reaches GRPO's final 0.6 after 0.5 of its 400 tokens, 0.2 of GRPO's 1000; seed 1 never reaches 0.7
    assert summary["treepo"]["share_of_grpo_tokens_to_its_final"] == pytest.approx(0.2)
    assert (summary["treepo"]["seeds_reaching_grpo_final"], summary["treepo"]["paired_seeds"]) == (1, 2)
    assert summary["treepo"]["decoded_tokens"] == 600 and summary["treepo"]["leaf_tokens"] == 1200
    assert "one seed" not in summary_table(summary) and "1/2 seeds reach it" in summary_table(summary)


def test_warm_up_answers_work_sums_left_to_right():
    assert worked_steps("4 - 1 - 7") == "4 - 1 = 3, 3 - 7 = -4."
    assert worked_steps("6 + 7") == "6 + 7 = 13."
    assert worked_steps("(1 + 2) * 3") is None and worked_steps("7") is None
    row = make_math_dataset("basic_arithmetic", size=1, seed=3, with_solution=True, **TASK_CONFIG)[0]
    answer = row["completion"][0]["content"]
    assert answer.endswith(f"The final answer is \\boxed{{{row['solution']}}}.") and " = " in answer


def test_a_warm_model_built_with_a_task_config_is_reused(tmp_path):
    from trl_treepo.testing import make_tiny_model, make_warm_model

    base = make_tiny_model(tmp_path / "base", vocab_size=512, hidden_size=32, num_layers=1)
    build = dict(task="basic_arithmetic", base_model=base, examples=8, steps=1, batch_size=4, task_config=TASK_CONFIG)  # operators: a tuple
    warm = Path(make_warm_model(tmp_path / "warm", **build))
    built = (warm / "model.safetensors").stat().st_mtime_ns
    assert make_warm_model(tmp_path / "warm", **build) == str(warm)
    assert (warm / "model.safetensors").stat().st_mtime_ns == built, "the warm-up ran again instead of reusing"
