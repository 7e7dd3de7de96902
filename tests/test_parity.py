"""Drop-in parity with GRPOTrainer: each GRPO option behaves in a tree as it does in GRPO, or is refused clearly."""

import logging

import pytest
import torch
from test_trainer import record_batches, reward_length, reward_vowels, tiny_args
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from trl_treepo import TreePOTrainer, compute_tree_advantages, whiten
from trl_treepo.config import grpo_differences_reference
from trl_treepo.testing import make_math_dataset

SEGMENT, DEPTH, WIDTH = 6, 3, 4


def make_trainer(tiny_model, tmp_path, reward_funcs=reward_length, **overrides):
    return TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_funcs,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=make_math_dataset(size=16),
    )


def full_segment(encode, text, length=SEGMENT):
    """`text`'s tokens padded with " x" tokens (or cut) to exactly `length`: a segment the engine did not end."""
    ids = encode(text)
    return (ids + encode(" x" * length))[:length] if len(ids) < length else ids[:length]


# ----------------------------------------------------------------------------------------- tree_sampling=False


def test_tree_sampling_off_trains_exactly_as_grpo_trainer(tiny_model, tmp_path):
    """One flag for the A/B baseline: the same arguments give GRPOTrainer's losses and weights."""
    shared = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                  num_generations=4, max_steps=2, learning_rate=0.05, report_to="none", save_strategy="no",
                  logging_steps=1, gradient_checkpointing=False, seed=0, max_completion_length=18,
                  epsilon_high=0.28, delta=10.0)  # fmt: skip
    runs = {}
    for name, trainer_class, config in [
        ("grpo", GRPOTrainer, GRPOConfig(**shared)),
        ("treepo", TreePOTrainer, tiny_args(tmp_path, tree_sampling=False, tree_segment_length=6, tree_max_depth=3)),
    ]:
        torch.manual_seed(0)
        trainer = trainer_class(model=tiny_model, reward_funcs=reward_length, args=config,
                                train_dataset=make_math_dataset(size=16))  # fmt: skip
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert runs["treepo"][0] == pytest.approx(runs["grpo"][0], abs=1e-7)
    for name, weight in runs["grpo"][1].items():
        torch.testing.assert_close(runs["treepo"][1][name], weight, rtol=0, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------- fallback "none" + grpo


def test_padding_rows_stay_out_of_grpo_group_statistics(tiny_model, tmp_path, scripted_rollouts):
    """With fallback off a prompt keeps the leaves it grew; GRPO's group mean and std see only those."""

    def both_first_paths_stop(encode, eos, request, branch):
        return encode(" a" * (1 + branch)) + [eos]  # two real leaves of different lengths (rewards 2+ and 4+)

    scripted_rollouts(both_first_paths_stop)
    trainer = make_trainer(tiny_model, tmp_path, tree_fallback_policy="none", tree_advantage_estimator="grpo",
                           tree_filter_zero_std_prompts=False, max_steps=1)  # fmt: skip
    batches = record_batches(trainer)
    trainer.train()
    batch = batches[0]
    rewards = batch["rewards_per_func"][:, 0].view(-1, WIDTH)
    real = ~torch.isnan(rewards)
    assert real.sum(dim=1).tolist() == [2, 2]  # 2 real leaves and 2 padding rows per prompt
    advantages = batch["advantages"].view(-1, WIDTH)
    for group, advantage, is_real in zip(rewards, advantages, real):
        values = group[is_real]
        expected = (values - values.mean()) / (values.std() + 1e-4)  # GRPO over the real leaves only
        torch.testing.assert_close(advantage[is_real], expected, rtol=1e-5, atol=1e-6)
        assert (advantage[~is_real] == 0).all()
    assert (batch["mask"].view(-1, WIDTH, batch["mask"].size(1))[~real].sum(dim=-1) == 0).all()


# --------------------------------------------------------------------------- stops on purpose are not truncated


def answers_repeats_or_runs_on(encode, eos, request, branch):
    """Width 8: at depth 2 branch 0 answers (boxed, no EOS), at depth 3 branch 0 repeats itself, the rest runs on.

    Leaves: 2 answers, 2 repetitions and 4 paths that the length limit (depth 3) stops.
    """
    (words,) = encode(" words")
    depth = list(request.token_ids).count(words) + 1
    if depth == 2 and branch == 0:
        return full_segment(encode, " \\boxed{7}")
    if depth == 3 and branch == 0:
        return full_segment(encode, "ab" * 6)
    return full_segment(encode, " words about the cat and")


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_answer_and_repetition_stops_train_and_are_not_counted_as_clipped(
    tiny_model, tmp_path, scripted_rollouts, mask_truncated
):
    scripted_rollouts(answers_repeats_or_runs_on)
    trainer = make_trainer(tiny_model, tmp_path, num_generations=8, tree_answer_stop="boxed",
                           tree_repetition_window=4, tree_repetition_min_count=4,
                           mask_truncated_completions=mask_truncated, tree_filter_zero_std_prompts=False,
                           max_steps=1)  # fmt: skip
    captured = {}
    original = trainer._advantage_step.replace_advantages

    def spy(output, batch, paths, truncated):
        original(output, batch, paths, truncated)
        captured["leaves"], captured["mask"] = batch.leaves, output["completion_mask"] * output.get("tool_mask", 1)

    trainer._advantage_step.replace_advantages = spy
    trainer.train()
    reasons = [leaf.finish_reason.value for leaf in captured["leaves"]]
    assert sorted(reasons[:8]) == ["answer"] * 2 + ["length"] * 4 + ["repetition"] * 2
    trained = captured["mask"].sum(dim=1)
    for reason, tokens in zip(reasons, trained.tolist()):
        if reason == "length" and mask_truncated:
            assert tokens == 0  # the length limit cut it: masked, as GRPO masks a truncated completion
        else:
            assert tokens > 0  # stopped on purpose: a finished leaf, it trains
    log = trainer.state.log_history[0]
    assert log["completions/clipped_ratio"] == pytest.approx(0.5)
    # answers end after 2 segments of 6 tokens, repetitions after 3
    assert (log["completions/min_terminated_length"], log["completions/max_terminated_length"]) == (12, 18)


# ---------------------------------------------------------------------------------------------- stop strings


def test_stop_strings_end_leaves_on_the_transformers_backend(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trainer = make_trainer(tiny_model, tmp_path, max_steps=1, generation_kwargs={"stop_strings": ["e"]})
    captured = record_batches(trainer)
    trainer.train()
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(captured[0]["completion_ids"], captured[0]["mask"])]
    stopped = [ids for ids in completions if "e" in tokenizer.decode(ids)]
    assert len(stopped) > len(completions) // 2, "the random tiny model writes an 'e' in most completions"
    # every leaf ends at the token that completes its first stop string
    assert all("e" not in tokenizer.decode(ids[:-1]) for ids in completions)


# ---------------------------------------------------------------------------------- caches beyond plain attention


@pytest.mark.parametrize("family", ["nemotron_h", "mistral", "lfm2"])
def test_models_whose_cache_cannot_be_split_by_row_train_without_kv_reuse(
    tmp_path_factory, tmp_path, family, caplog, monkeypatch
):
    """Mamba/conv hybrids and sliding windows: each tree level re-reads prefixes instead, after a one-time warning."""
    from trl_treepo.backends import transformers as backend
    from trl_treepo.testing import make_tiny_model

    monkeypatch.setattr(backend, "_warned_models", set())
    model = make_tiny_model(tmp_path_factory.mktemp(family), family=family)
    with caplog.at_level(logging.WARNING, logger="trl_treepo.backends.transformers"):
        trainer = TreePOTrainer(model=model, reward_funcs=reward_length, args=tiny_args(tmp_path, max_steps=2),
                                train_dataset=make_math_dataset(size=16))  # fmt: skip
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["tree/decoded_tokens"] < entry["tree/leaf_tokens"] for entry in logs)
    (warning,) = [r.getMessage() for r in caplog.records if "tree_reuse_kv_cache is off" in r.getMessage()]
    assert family in warning and "Layer" in warning


# ------------------------------------------------------------------------------------------------ rollout_func


def test_a_rollout_func_is_refused_with_tree_sampling(tiny_model, tmp_path):
    def rollout(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="rollout_func"):
        TreePOTrainer(model=tiny_model, reward_funcs=reward_length, args=tiny_args(tmp_path),
                      train_dataset=make_math_dataset(size=4), rollout_func=rollout)  # fmt: skip


# ---------------------------------------------------------------------------------------- normalize_then_sum


def test_normalize_then_sum_standardizes_each_function_over_the_prompts_leaves(tiny_model, tmp_path):
    def large_scale(completions, **kwargs):
        return [100.0 * value for value in reward_length(completions)]

    trainer = make_trainer(tiny_model, tmp_path, reward_funcs=[large_scale, reward_vowels], max_steps=1,
                           multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 2.0])  # fmt: skip
    batches = record_batches(trainer)
    trainer.train()
    batch = batches[0]
    per_func = batch["rewards_per_func"].double().view(-1, WIDTH, 2)
    standardized = (per_func - per_func.mean(dim=1, keepdim=True)) / (per_func.std(dim=1, keepdim=True) + 1e-4)
    rewards = (standardized * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum(dim=-1).view(-1)
    informative = (rewards.view(-1, WIDTH).max(dim=1).values > rewards.view(-1, WIDTH).min(dim=1).values)
    rewards = torch.where(informative.repeat_interleave(WIDTH), rewards, torch.nan)
    expected = whiten(compute_tree_advantages(rewards, batch["paths"]), batch["mask"].sum(dim=1).double())
    torch.testing.assert_close(batch["advantages"].double(), torch.nan_to_num(expected), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ differences from GRPO


def test_the_differences_from_grpo_are_logged_once_at_start_up(tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        make_trainer(tiny_model, tmp_path)
    (message,) = [r.getMessage() for r in caplog.records if "differently from GRPOTrainer" in r.getMessage()]
    for item in ("epsilon_high", "delta", "Advantages", "all equal", "Truncation"):
        assert item in message
    assert "stop strings" not in message.lower()  # only the differences in effect for this run


def test_the_differences_table_in_the_docs_is_generated_from_the_code():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = text.split("<!-- BEGIN GENERATED: GRPO differences -->\n")[1].split("\n<!-- END GENERATED -->")[0]
    assert block == grpo_differences_reference(), "docs/configuration.md is stale: run `python -m trl_treepo.config`"
