"""`python -m trl_treepo.learning`, the TreePO-vs-GRPO study: a smoke run on a task no preset uses, its errors, its
held-out set, and its statistics."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_treepo.learning import PRESETS, clustered_mean_and_se, cost_to_reach, difference_se, summarize, verdict
from trl_treepo.learning import held_out_problems, rl_dataset, summary_table, task_of
from trl_treepo.learning.cli import build_parser, resolve_setting
from trl_treepo.testing import ReasoningTask, worked_steps


def study_command(tmp_path, *extra):
    return [sys.executable, "-m", "trl_treepo.learning", "--output_dir", str(tmp_path / "study"), "--cache_dir",
            str(tmp_path / "cache"), "--backend", "transformers", *extra]  # fmt: skip


def test_the_study_runs_every_arm_on_a_task_no_preset_was_tuned_on(tmp_path):
    command = study_command(
        tmp_path, "--task", "leg_counting", "--task_config", '{"min_animals": 1, "max_animals": 2, "max_instances": 3}',
        "--seeds", "0", "--arms", "treepo,grpo,wide", "--arm", 'wide={"tree_initial_divergence": 4}',
        "--max_steps", "2", "--eval_every", "1", "--warmup_steps", "10", "--warmup_examples", "64",
        "--held_out_size", "8", "--held_out_samples", "2", "--prompts_per_step", "2", "--num_generations", "4",
        "--segment_length", "4", "--max_depth", "4", "--vocab_size", "1024", "--config", '{"tree_packed_training": true}',
    )  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert finished.returncode == 0, finished.stderr[-3000:]
    study = tmp_path / "study"
    report = json.loads((study / "study.json").read_text())
    assert report["setting"]["task"] == "leg_counting" and report["setting"]["model"]["vocab_size"] == 1024
    assert report["setting"]["arms"]["wide"] == {"tree_initial_divergence": 4}
    assert {run["arm"] for run in report["runs"]} == {"treepo", "grpo", "wide"}
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [0, 1, 2]
        assert all(0 <= point["sampled"] <= 1 and point["sampled_se"] >= 0 for point in run["curve"])
        assert run["curve"][-1]["decoded_tokens"] == pytest.approx(sum(run["decoded_tokens"]))
        assert run["curve"][-1]["wall_s"] > 0
    treepo = next(run for run in report["runs"] if run["arm"] == "treepo")
    assert sum(treepo["decoded_tokens"]) < sum(treepo["leaf_tokens"])  # the tree decodes shared prefixes once
    assert set(report["verdict"]) >= {"token_share", "wall_share", "greedy_holds", "met"}
    assert (study / "accuracy-vs-decoded-tokens.png").stat().st_size > 0
    assert (study / "accuracy-vs-wall-time.png").stat().st_size > 0
    assert "TRL GRPO" in (study / "summary.md").read_text()

    # A later call with fewer arms runs nothing again, and its summary still counts every run in the directory.
    arms_at = command.index("--arms")
    again = subprocess.run([*command[:arms_at], "--arms", "treepo", *command[arms_at + 2 :]], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "also counts the 2 other finished runs" in again.stdout
    report = json.loads((study / "study.json").read_text())
    assert sorted(run["arm"] for run in report["runs"]) == ["grpo", "treepo", "wide"]
    assert report["seeds"] == {"treepo": [0], "grpo": [0], "wide": [0]} and report["verdict"] is not None


TINY = ["--warmup_steps", "4", "--warmup_examples", "32", "--held_out_size", "4", "--held_out_samples", "1",
        "--prompts_per_step", "2", "--num_generations", "4", "--max_depth", "4", "--max_steps", "2"]  # fmt: skip


def test_the_suite_runs_every_setting_to_grpos_decoded_tokens_and_writes_one_table(tmp_path):
    command = study_command(tmp_path, "--suite", "beyond", "--seeds", "0", "--arms", "grpo,treepo,node_value",
                            "--eval_points", "2", *TINY)  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert finished.returncode == 0, finished.stderr[-3000:]
    suite = json.loads((tmp_path / "study" / "suite.json").read_text())
    assert list(suite["settings"]) == ["legs", "letters", "equations"] and suite["budget"] == "decoded_tokens"
    for name in suite["settings"]:
        runs = {run["arm"]: run for run in json.loads((tmp_path / "study" / name / "study.json").read_text())["runs"]}
        assert set(runs) == {"grpo", "treepo", "node_value"}
        grpo_tokens = sum(runs["grpo"]["decoded_tokens"])
        assert [point["step"] for point in runs["grpo"]["curve"]] == [0, 1, 2]  # max_steps in eval_points shares
        for arm in ("treepo", "node_value"):
            budget = runs[arm]["budget"]
            # every other arm spends GRPO's decoded tokens of the same seed, and stops at the step that does
            assert budget["value"] == grpo_tokens and budget["reached"] and budget["spent"] >= grpo_tokens
            assert sum(runs[arm]["decoded_tokens"][:-1]) < grpo_tokens <= sum(runs[arm]["decoded_tokens"])
            assert runs[arm]["curve"][-1]["decoded_tokens"] == pytest.approx(budget["spent"])
    table = (tmp_path / "study" / "suite.md").read_text()
    assert "fixed 2026-12-07" in table and table.count("| legs |") == 2 and "per-node values" in table
    # rows in the suite's arm order, though node_value's runs were read before the earlier round's
    assert table.index("| legs | TreePO |") < table.index("| legs | TreePO, per-node values")


def test_a_wall_time_budget_stops_every_arm_once_it_is_spent(tmp_path):
    command = study_command(tmp_path, "--preset", "equations", "--seeds", "0", "--arms", "treepo,grpo", "--budget",
                            "wall_time", "--budget_value", "1e-3", "--eval_points", "1", *TINY)  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    for run in report["runs"]:  # a given budget binds GRPO too: one step spends a millisecond
        assert run["budget"] == {"kind": "wall_time", "value": 1e-3, "spent": pytest.approx(run["curve"][-1]["wall_s"]),
                                 "reached": True}  # fmt: skip
        assert [point["step"] for point in run["curve"]] == [0, 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "decoded_tokens", "--arms", "treepo"], "GRPO does not run on seeds [0]"),
        (["--budget", "decoded_tokens", "--arms", "grpo,treepo", "--eval_points", "3", "--max_steps", "2"],
         "must divide max_steps"),
        (["--budget_value", "100"], "--budget_value needs --budget decoded_tokens or wall_time"),
    ],
)  # fmt: skip
def test_a_budget_that_cannot_be_spent_evenly_or_has_no_grpo_run_is_refused_before_any_run(tmp_path, flags, message):
    finished = subprocess.run(study_command(tmp_path, "--seeds", "0", "--warmup_steps", "2", "--warmup_examples", "8",
                                            *flags), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert finished.returncode != 0 and message in finished.stderr, finished.stderr[-2000:]
    assert not list((tmp_path / "study").glob("*-0.json"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "leg_countin"], "Unknown reasoning-gym task 'leg_countin'. Did you mean 'leg_counting'"),
        (["--task", "leg_counting", "--task_config", '{"max_animalz": 3}'],
         "reasoning-gym rejected the configuration {\"max_animalz\": 3} of task 'leg_counting'"),
        (["--task_config", '{"min_terms": 5, "max_terms": 2}'], "max_terms must be >= min_terms"),
        (["--task_config", "[1, 2]"], "--task_config: give a JSON object"),
        (["--arms", "treepo,nope"], "Unknown arms ['nope']"),
    ],
)  # fmt: skip
def test_an_unknown_task_or_a_bad_configuration_is_a_clear_error(tmp_path, flags, message):
    finished = subprocess.run(study_command(tmp_path, *flags), capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0 and message in finished.stderr, finished.stderr[-2000:]


def test_command_line_fields_override_the_preset():
    args = build_parser().parse_args(["--preset", "sums", "--hidden_size", "96", "--max_steps", "7",
                                      "--config", '{"beta": 0.01}'])  # fmt: skip
    setting = resolve_setting(args)
    assert setting.model == {**PRESETS["sums"].model, "hidden_size": 96}
    assert setting.rl["max_steps"] == 7 and setting.config == {**PRESETS["sums"].config, "beta": 0.01}
    assert setting.task == PRESETS["sums"].task


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_held_out_problems_are_distinct_and_no_training_prompt_repeats_one(preset):
    """Two one-digit terms make only 200 distinct problems, so drawing training prompts at random would hit held-out
    ones often; the held-out set is left out of the warm-up and RL data, for every seed."""
    setting = PRESETS[preset]
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    questions = [entry["question"] for _, entry in held_out]
    assert len(questions) == len(set(questions)) == setting.held_out["size"]
    for seed in (0, 1):
        rl_prompts = {task.entries[row["problem_id"]]["question"] for row in rl_dataset(setting, seed, task, held_out)}
        warmup = task.problems(setting.warmup["examples"], seed + 123, exclude=frozenset(questions))
        assert rl_prompts and not rl_prompts & set(questions)
        assert not {entry["question"] for _, entry in warmup} & set(questions)


def test_the_task_scorer_rewards_the_last_boxed_answer():
    task = ReasoningTask("basic_arithmetic", {"min_terms": 3, "max_terms": 3, "max_digits": 1})
    (problem_id, entry), = task.problems(1, 0)
    right, wrong = f"1 + 2 = 3.\nThe final answer is \\boxed{{{entry['answer']}}}.", "\\boxed{1000}"
    assert task.reward()([right, wrong, "no answer", [{"content": right}]], [problem_id] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_sampled_accuracy_standard_error_clusters_by_problem():
    # Two problems, four samples each: one always right, one always wrong. The binomial error of 8 samples would say
    # sqrt(0.25 / 8) = 0.18; the samples of one problem agree, so the evidence is two problems: sd 0.71 / sqrt(2).
    mean, se = clustered_mean_and_se([[1, 1, 1, 1], [0, 0, 0, 0]])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert difference_se({"sampled_se": 0.03}, {"sampled_se": 0.04}) == pytest.approx(0.05)


@pytest.mark.parametrize("conversational", [False, True])
def test_completions_of_a_left_padded_batch_are_each_prompts_own(tmp_path, conversational):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_treepo.learning import completions
    from trl_treepo.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny", vocab_size=1024)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    task = ReasoningTask("basic_arithmetic", {"min_terms": 2, "max_terms": 5}, conversational=conversational)
    problems = task.problems(3, seed=0, unique=True)  # prompts of different lengths: the batch pads the shorter
    tokenizer.padding_side = "right"
    batched = completions(model, tokenizer, task, problems, max_new_tokens=6)
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    assert batched == [completions(model, tokenizer, task, [problem], max_new_tokens=6)[0] for problem in problems]


def test_warm_up_answers_work_sums_left_to_right():
    assert worked_steps("4 - 1 - 7") == "4 - 1 = 3, 3 - 7 = -4."
    assert worked_steps("6 + 7") == "6 + 7 = 13."
    assert worked_steps("(1 + 2) * 3") is None and worked_steps("7") is None
    task = task_of(PRESETS["chains"])
    (_, entry), = task.problems(1, 3)
    answer = task.worked_answer(entry)
    assert answer.endswith(f"The final answer is \\boxed{{{entry['answer']}}}.") and answer.count(" = ") >= 2


def test_unfinished_warm_up_answers_stop_a_step_early_and_score_nothing():
    task = task_of(PRESETS["unfinished"])
    problems = task.problems(400, 5)
    (problem_id, entry), = problems[:1]
    unfinished = task.unfinished_answer(entry)
    worked_steps_ = task.worked_answer(entry).split("\n")[0].rstrip(".").split(" = ")
    assert unfinished.split("\n")[0] == " = ".join(worked_steps_[:-1]) + "."
    assert task.reward()([unfinished, task.worked_answer(entry)], [problem_id] * 2) == [0.0, 1.0]
    rows = task.dataset(problems, with_solution=True, unfinished_share=0.3, seed=1)
    share = sum(row["completion"] != task.worked_answer(entry) for row, (_, entry) in zip(rows, problems)) / 400
    assert 0.25 < share < 0.35
    assert rows.to_list() == task.dataset(problems, with_solution=True, unfinished_share=0.3, seed=1).to_list()
    with pytest.raises(ValueError, match="unfinished_share must be a fraction"):
        task.dataset(problems, with_solution=True, unfinished_share=1.5)
    with pytest.raises(ValueError, match="Set the warm-up's unfinished_share to 0"):
        ReasoningTask("leg_counting").unfinished_answer(ReasoningTask("leg_counting").problems(1, 0)[0][1])


def test_a_warm_model_is_reused_whether_its_base_is_named_relatively_or_absolutely(tmp_path, monkeypatch):
    """The study and the scripts name the same cache relatively or absolutely; either way the warm model built once is
    reused, not rebuilt (and overwritten under a run that reads it)."""
    from trl_treepo.testing import make_tiny_model, make_warm_model

    make_tiny_model(tmp_path / "base", vocab_size=512, hidden_size=32, num_layers=1)
    task = task_of(PRESETS["unfinished"])
    sft = task.dataset(task.problems(8, 0), with_solution=True)
    monkeypatch.chdir(tmp_path)
    options = dict(steps=1, batch_size=2, sft_dataset=sft)
    warm = Path(make_warm_model(tmp_path / "warm", "basic_arithmetic", base_model="base", **options))
    built = (warm / "model.safetensors").stat().st_mtime_ns
    make_warm_model(tmp_path / "warm", "basic_arithmetic", base_model=str(tmp_path / "base"), **options)
    assert (warm / "model.safetensors").stat().st_mtime_ns == built


# ---------------------------------------------------------------------------------------- the study's arithmetic


def curve(*points):
    return [{"step": i, "decoded_tokens": tokens, "wall_s": tokens / 10, "sampled": sampled, "greedy": sampled,
             "sampled_se": 0.0} for i, (tokens, sampled) in enumerate(points)]  # fmt: skip


def run(arm, seed, points, rewards=(0.5, 0.5)):
    tokens = points[-1][0] / 2
    return {"arm": arm, "seed": seed, "curve": curve(*points), "rewards": list(rewards),
            "decoded_tokens": [tokens, tokens], "leaf_tokens": [tokens, tokens]}  # fmt: skip


def test_cost_to_reach_an_accuracy_interpolates_between_measurements():
    points = curve((0, 0.5), (1000, 0.6), (2000, 0.7))
    assert cost_to_reach(points, "sampled", 0.65) == pytest.approx(1500)
    assert cost_to_reach(points, "sampled", 0.65, "wall_s") == pytest.approx(150)
    assert cost_to_reach(points, "sampled", 0.5) == 0.0
    assert cost_to_reach(points, "sampled", 0.8) is None


def test_the_summary_compares_each_arm_with_grpo_per_seed_and_on_mean_curves():
    runs = [
        run("grpo", 0, [(0, 0.5), (1000, 0.6)], rewards=(0.4, 0.6)),
        run("grpo", 1, [(0, 0.5), (1000, 0.7)], rewards=(0.4, 0.8)),
        run("treepo", 0, [(0, 0.5), (400, 0.7)]),
        run("treepo", 1, [(0, 0.5), (800, 0.6)], rewards=(0.5, 0.7)),
    ]
    summary = summarize(runs)
    assert summary["grpo"]["sampled_gain"] == pytest.approx(0.15)
    assert summary["grpo"]["sampled_gain_se"] == pytest.approx(0.05)  # stdev 0.0707 / sqrt(2)
    assert summary["grpo"]["reward_gain"] == pytest.approx(0.3)
    treepo = summary["treepo"]
    # GRPO at 400 tokens: 0.54 on seed 0; at 800 tokens: 0.66 on seed 1
    assert treepo["sampled_vs_grpo_at_equal_tokens"] == pytest.approx(((0.7 - 0.54) + (0.6 - 0.66)) / 2)
    # per seed: seed 0 reaches GRPO's final 0.6 after 200 of its tokens (0.2 of GRPO's 1000); seed 1 never does
    assert treepo["token_share_per_seed"] == [pytest.approx(0.2)] and treepo["seeds_reaching_grpo_final"] == 1
    # mean curves: TreePO (0, 0.5) -> (600, 0.65); GRPO ends at 0.65 after 1000 tokens and 100 s
    assert treepo["mean_curve_token_share"] == pytest.approx(0.6)
    assert treepo["mean_curve_wall_share"] == pytest.approx(0.6)
    assert treepo["decoded_tokens"] == 600 and treepo["leaf_tokens"] == 600
    assert "2 seeds" not in summary_table(summary) and "1/2" in summary_table(summary)
    headline = verdict(summary)
    assert headline["grpo_learns"]  # +0.15 ± 0.05
    assert headline["tokens_within_goal"] and headline["wall_within_goal"] and headline["greedy_holds"]
    assert not headline["met"]  # two paired seeds are not the five the goal asks for
    flat = summarize([run("grpo", 0, [(0, 0.5), (1000, 0.5)]), run("grpo", 1, [(0, 0.5), (1000, 0.51)]),
                      run("treepo", 0, [(0, 0.5), (400, 0.6)]), run("treepo", 1, [(0, 0.5), (400, 0.6)])])  # fmt: skip
    assert not verdict(flat)["grpo_learns"]  # a GRPO that did not learn sets no bar worth reaching
