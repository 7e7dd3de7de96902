"""Reliability of TreePOTrainer on CPU (transformers backend): bad rewards and prompts, determinism, resume.

Multi-process runs are in test_multiprocess.py; server faults in test_backends.py and test_vllm.py.
"""

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_trainer import record_batches, reward_length, tiny_args
from transformers import TrainerCallback

from trl_treepo import TreePOTrainer, compute_tree_advantages, whiten
from trl_treepo.testing import make_math_dataset
from trl_treepo.trainer import RewardFunctionError


def make_trainer(tiny_model, tmp_path, reward_funcs=reward_length, dataset=None, **overrides):
    return TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_funcs,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else make_math_dataset(size=16),
    )


def parameters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


# ------------------------------------------------------------------------------------------------------- rewards


def test_a_reward_function_that_raises_is_named_in_the_error(tiny_model, tmp_path):
    def reward_judge(completions, **kwargs):
        raise KeyError("score")

    trainer = make_trainer(tiny_model, tmp_path, reward_funcs=[reward_length, reward_judge], max_steps=1)
    with pytest.raises(RewardFunctionError, match=r"'reward_judge' raised KeyError: 'score'"):
        trainer.train()


def test_unscored_leaves_join_no_group_statistic_and_do_not_train(tiny_model, tmp_path):
    """TRL's None means "not scored": with every function None (or NaN) a leaf leaves the groups and the loss."""

    def reward_sometimes(completions, **kwargs):
        values = reward_length(completions)
        return [None if i % 3 == 0 else math.nan if i % 3 == 1 and i % 2 else v for i, v in enumerate(values)]

    def reward_rarely(completions, **kwargs):
        return [1.0 if i % 6 == 1 else None for i in range(len(completions))]

    trainer = make_trainer(
        tiny_model, tmp_path, reward_funcs=[reward_sometimes, reward_rarely], max_steps=1,
        tree_filter_zero_std_prompts=False,
    )  # fmt: skip
    batches = record_batches(trainer)
    trainer.train()
    (batch,) = batches
    per_func = batch["rewards_per_func"].double()
    unscored = torch.isnan(per_func).all(dim=1)
    assert unscored.any() and not unscored.all()
    rewards = torch.where(unscored, torch.nan, per_func.nansum(dim=1))
    # The reference: group means over scored leaves only, then whitening over scored tokens.
    expected = compute_tree_advantages(rewards, batch["paths"])
    expected = torch.nan_to_num(whiten(expected, batch["mask"].sum(dim=1).double()), nan=0.0)
    torch.testing.assert_close(batch["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    assert (batch["mask"].sum(dim=1)[unscored] == 0).all()
    assert (batch["mask"].sum(dim=1)[~unscored] > 0).all()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert log["tree/unscored_leaf_ratio"] == pytest.approx(unscored.double().mean().item())
    assert math.isfinite(log["loss"])


@pytest.mark.parametrize("filter_prompts", [True, False])
def test_all_equal_rewards_teach_nothing_and_do_not_break_the_step(tiny_model, tmp_path, filter_prompts):
    def reward_constant(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(
        tiny_model, tmp_path, reward_funcs=reward_constant, max_steps=1, tree_filter_zero_std_prompts=filter_prompts
    )
    batches = record_batches(trainer)
    before = parameters(trainer)
    trainer.train()
    (batch,) = batches
    assert (batch["advantages"] == 0).all()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert log["loss"] == 0.0
    if filter_prompts:  # every prompt filtered: nothing trains, and the step still completes
        assert log["tree/filtered_prompt_ratio"] == 1.0 and (batch["mask"] == 0).all()
        assert all(torch.equal(before[name], p) for name, p in parameters(trainer).items())


# ------------------------------------------------------------------------------------------------------- prompts


def test_an_empty_prompt_is_rejected_with_its_row(tiny_model, tmp_path):
    # a step draws 2 distinct prompts, so at least one is empty
    dataset = Dataset.from_dict({"prompt": [""] * 7 + ["1 + 1 ="]})
    trainer = make_trainer(tiny_model, tmp_path, dataset=dataset, max_steps=1)
    with pytest.raises(ValueError, match="empty prompt"):
        trainer.train()


def test_a_prompt_beyond_the_model_context_warns_once(tiny_model, tmp_path, caplog):
    trainer = make_trainer(tiny_model, tmp_path, max_steps=1)
    limit = trainer.model.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="trl_treepo.trainer"):
        trainer._rollouts.check_prompts([[1] * limit, [1, 2]])
        trainer._rollouts.check_prompts([[1] * limit])
    warnings = [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(warnings) == 1 and str(limit) in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------ determinism, resume


def test_the_same_seed_grows_the_same_trees(tiny_model, tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        trainer = make_trainer(tiny_model, tmp_path / name, max_steps=2, seed=seed)
        batches = record_batches(trainer)
        trainer.train()
        runs[name] = batches
    for first, second in zip(runs["a"], runs["b"]):
        assert torch.equal(first["completion_ids"], second["completion_ids"])
        assert [path[1:] for path in first["paths"]] == [path[1:] for path in second["paths"]]
        assert torch.equal(first["advantages"], second["advantages"])
    assert not torch.equal(runs["a"][0]["completion_ids"], runs["c"][0]["completion_ids"])


class _Interrupt(TrainerCallback):
    """Kills the run after `step` steps, as a preemption between checkpoints would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("preempted")


def test_resume_from_checkpoint_continues_exactly_where_the_uninterrupted_run_goes(tiny_model, tmp_path):
    """Same data order, same trees, same weights: the steps after the last checkpoint are redone, not lost."""
    steps = dict(max_steps=3, save_strategy="steps", save_steps=2)

    straight = make_trainer(tiny_model, tmp_path / "straight", **steps)
    straight_batches = record_batches(straight)
    straight.train()

    interrupted = make_trainer(tiny_model, tmp_path / "resumed", **steps)
    interrupted.add_callback(_Interrupt(step=2))  # after checkpoint-2 is written
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()

    resumed = make_trainer(tiny_model, tmp_path / "resumed", **steps)
    resumed_batches = record_batches(resumed)
    resumed.train(resume_from_checkpoint=True)

    (resumed_batch,) = resumed_batches  # only step 3 ran
    assert torch.equal(resumed_batch["completion_ids"], straight_batches[2]["completion_ids"])
    assert [p[1:] for p in resumed_batch["paths"]] == [p[1:] for p in straight_batches[2]["paths"]]
    torch.testing.assert_close(resumed_batch["advantages"], straight_batches[2]["advantages"])
    final = parameters(straight)
    for name, value in parameters(resumed).items():
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)
    straight_log = [e for e in straight.state.log_history if "loss" in e][-1]
    resumed_log = [e for e in resumed.state.log_history if "loss" in e][-1]
    assert resumed_log["step"] == straight_log["step"] == 3
    assert resumed_log["reward"] == pytest.approx(straight_log["reward"])
    assert resumed_log["loss"] == pytest.approx(straight_log["loss"], rel=1e-4, abs=1e-6)


def test_a_trl_release_that_changes_an_overridden_method_fails_at_import():
    """Every GRPOTrainer method TreePOTrainer overrides is checked against the signature it was written for."""
    import trl

    from trl_treepo.trainer.compatibility import OVERRIDDEN, SUPPORTED_TRL, check_grpo_trainer, signature_mismatches

    assert signature_mismatches(trl.GRPOTrainer) == []  # the installed TRL is a supported one
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"trl{SUPPORTED_TRL}"' in pyproject  # the pin says what the check was written for
    overridden = {name for name, value in vars(TreePOTrainer).items()
                  if callable(value) and hasattr(trl.GRPOTrainer, name) and name != "__init__"}  # fmt: skip
    assert overridden == set(OVERRIDDEN)

    class Renamed(trl.GRPOTrainer):
        def _prepare_inputs(self, batch):  # a parameter renamed
            return batch

    assert signature_mismatches(Renamed) == [
        "`_prepare_inputs(self, batch)` was `_prepare_inputs(self, generation_batch)`"
    ]
    with pytest.raises(ImportError, match=rf"TRL 9\.9\.9 changed: .*_prepare_inputs.*supports TRL {SUPPORTED_TRL}"):
        check_grpo_trainer(Renamed, "9.9.9")
    gone = signature_mismatches(type("Gone", (), {}))
    assert len(gone) == len(OVERRIDDEN) and "`_generate_single_turn` no longer exists" in gone
