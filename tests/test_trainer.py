"""TreePOTrainer end to end on CPU with the transformers backend."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_treepo import TreePOConfig, TreePOTrainer, compute_tree_advantages, whiten
from trl_treepo.testing import make_math_dataset


def reward_length(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(text) % 5) for text in texts]


def reward_vowels(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(ch in "aeiou" for ch in text) % 3) for text in texts]


def tiny_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        tree_segment_length=6,
        tree_max_depth=3,
        max_steps=2,
        learning_rate=0.05,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        seed=0,
    )
    base.update(overrides)
    return TreePOConfig(**base)


def train(tiny_model, tmp_path, dataset=None, reward_funcs=reward_length, trainer_kwargs=None, **overrides):
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_funcs,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else make_math_dataset(size=16),
        **(trainer_kwargs or {}),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, logs, changed, before


def record_batches(trainer):
    """Capture what each training step's advantage step saw and produced (the spy replaces `AdvantageStep.replace_advantages`)."""
    batches = []
    original = trainer._advantage_step.replace_advantages

    def spy(output, batch, paths, truncated):
        original(output, batch, paths, truncated)
        batches.append(
            dict(
                paths=list(paths),
                local_paths=list(batch.paths),
                rewards_per_func=trainer._advantage_step.rewards_per_func.clone(),
                prompt_ids=output["prompt_ids"].clone(),
                prompt_mask=output["prompt_mask"].clone(),
                completion_ids=output["completion_ids"].clone(),
                mask=(output["completion_mask"] * output.get("tool_mask", 1)).clone(),
                advantages=output["advantages"].clone(),
            )
        )

    trainer._advantage_step.replace_advantages = spy
    return batches


def test_train_end_to_end_decodes_fewer_tokens_than_it_trains_on(tiny_model, tmp_path):
    trainer, logs, changed, before = train(tiny_model, tmp_path)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert len(changed) == len(before)
    for entry in logs:
        assert entry["tree/decoded_tokens"] < entry["tree/leaf_tokens"]
        assert entry["tree/mean_depth"] <= entry["tree/max_depth"] <= 3
        assert entry["tree/engine_calls"] >= 3
        reasons = sum(v for k, v in entry.items() if k.startswith("tree/finish_reason/"))
        assert reasons == pytest.approx(1.0)


def test_standard_prompts_and_weighted_reward_functions(tiny_model, tmp_path):
    dataset = make_math_dataset(size=16, conversational=False)
    _, logs, changed, _ = train(
        tiny_model, tmp_path, dataset=dataset, reward_funcs=[reward_length, reward_vowels], reward_weights=[1.0, 0.5]
    )
    assert changed and "rewards/reward_vowels/mean" in logs[0]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_trl_loss_type_trains(tiny_model, tmp_path, loss_type):
    _, logs, changed, _ = train(tiny_model, tmp_path, loss_type=loss_type, max_steps=1)
    assert changed and torch.isfinite(torch.tensor(logs[0]["loss"]))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tree_advantage_estimator="grpo"),
        dict(tree_advantage_estimator="tree_segment"),
        dict(tree_advantage_estimator="node_value", tree_packed_training=True),
        dict(tree_advantage_weighting="group_size", tree_reject_zero_std_subgroups=True),
        dict(tree_advantage_normalization="none"),
        dict(tree_sampling=False),
        dict(tree_fallback_policy="none", tree_answer_stop="none"),
        dict(tree_divergence_policy="low_prob", tree_initial_divergence=1, tree_initial_divergence_max=3),
        dict(tree_reuse_kv_cache=False),
        dict(gradient_checkpointing=True),
        dict(beta=0.05),
        dict(importance_sampling_level="sequence", top_entropy_quantile=0.5, off_policy_mask_threshold=0.5),
    ],
    ids=lambda overrides: ",".join(f"{k}={v}" for k, v in overrides.items()),
)
def test_options_train(tiny_model, tmp_path, overrides):
    _, logs, changed, _ = train(tiny_model, tmp_path, max_steps=1, **overrides)
    assert changed and torch.isfinite(torch.tensor(logs[0]["loss"]))
    assert ("tree/decoded_tokens" in logs[0]) == overrides.get("tree_sampling", True)


def test_packed_training_passes_its_self_check_against_trls_own_forward(tiny_model, tmp_path):
    """The packed log-probs equal TRL's unpacked ones on the first batch, whichever way the installed TRL scores
    tokens (a fused LM head from TRL 1.15 on, full logits before), so packing stays on."""
    trainer, logs, changed, _ = train(tiny_model, tmp_path, max_steps=1, tree_packed_training=True)
    assert changed and trainer._packed_forward.verified and 0 < logs[0]["tree/packed_token_ratio"] < 1


def test_lora_through_peft_config(tiny_model, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, _, changed, before = train(tiny_model, tmp_path, trainer_kwargs={"peft_config": config}, max_steps=1)
    assert changed and all("lora" in name for name in before)


def test_trained_advantages_are_the_whitened_tree_estimates(tiny_model, tmp_path):
    trainer = TreePOTrainer(
        model=tiny_model, reward_funcs=reward_length, args=tiny_args(tmp_path), train_dataset=make_math_dataset(size=8)
    )
    batches = record_batches(trainer)
    trainer.train()
    captured = batches[-1]
    rewards, paths = captured["rewards_per_func"][:, 0].double(), captured["paths"]
    # dynamic sampling: prompts whose leaves all share one reward are left out
    groups = rewards.view(-1, 4)
    informative = (groups.max(dim=1).values > groups.min(dim=1).values).repeat_interleave(4)
    expected = compute_tree_advantages(torch.where(informative, rewards, torch.nan), paths)
    expected = torch.nan_to_num(whiten(expected, captured["mask"].sum(dim=1).double()), nan=0.0)
    torch.testing.assert_close(captured["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    assert (captured["mask"].sum(dim=1)[~informative] == 0).all()
    # leaves of one prompt share node ids exactly where the tree says so
    assert all(len(path) >= 2 for path in paths)


def test_prompt_groups_that_are_not_whole_per_process_are_rejected(tmp_path, monkeypatch):
    # 2 processes x 2 rows: the generation batch holds whole groups of 4, but each process holds half a group.
    monkeypatch.setattr(TreePOConfig, "world_size", property(lambda self: 2))
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_generations=4,
                  tree_segment_length=4, tree_max_depth=2)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        TreePOConfig(**kwargs)
    assert TreePOConfig(**kwargs, tree_sampling=False).generation_batch_size == 4


BAD_VALUES = [
    (dict(tree_segment_length=0), "tree_segment_length"),
    (dict(tree_max_depth=-1), "tree_max_depth"),
    (dict(tree_branching_factor=0), "tree_branching_factor"),
    (dict(tree_divergence_policy="wide"), "tree_divergence_policy"),
    (dict(tree_fallback_policy="dfs"), "tree_fallback_policy"),
    (dict(tree_answer_stop="eos"), "tree_answer_stop"),
    (dict(tree_advantage_estimator="ppo"), "tree_advantage_estimator"),
    (dict(tree_advantage_weighting="mean"), "tree_advantage_weighting"),
    (dict(tree_advantage_normalization="group"), "tree_advantage_normalization"),
    (dict(tree_repetition_priority="middle"), "tree_repetition_priority"),
    (dict(max_completion_length=100), "max_completion_length"),
    (dict(tree_initial_divergence=0), "tree_initial_divergence"),
    (dict(tree_initial_divergence=3, tree_initial_divergence_max=2), "tree_initial_divergence_max"),
    (dict(tree_divergence_temperature=0.0), "tree_divergence_temperature"),
    (dict(tree_repetition_window=-1), "tree_repetition_window"),
    (dict(tree_segment_advantage_discount=0.0), "tree_segment_advantage_discount"),
    (dict(tree_advantage_estimator="tree_segment", tree_reject_zero_std_subgroups=True), "tree_reject_zero_std"),
    (dict(tree_advantage_estimator="node_value", tree_advantage_weighting="group_size"), "own weighting"),
    (dict(scale_rewards="batch"), "scale_rewards='batch' is GRPO's normalisation"),
    (dict(scale_rewards=False), "tree_advantage_normalization"),
    (dict(generation_kwargs={"frequency_penalty": 0.5}), "frequency_penalty"),
    (dict(generation_kwargs={"presence_penalty": 0.1}), "presence_penalty"),
    (dict(generation_kwargs={"min_tokens": 8}), "min_tokens"),
    (dict(generation_kwargs={"structured_outputs": {"regex": "[0-9]+"}}), "structured_outputs"),
    (dict(generation_kwargs={"stop": ["", "x"]}), "non-empty strings"),
    (dict(tree_repetition_min_count=-1), "tree_repetition_min_count"),
    (dict(tree_server_request_timeout=0), "tree_server_request_timeout"),
    (dict(tree_server_max_retries=-1), "tree_server_max_retries"),
    (dict(tree_rollout_timeout=0.0), "tree_rollout_timeout"),
    (dict(tree_rollout_schedule="async"), "tree_rollout_schedule"),
    (dict(tree_rollout_schedule="per_tree"), "tree_rollout_schedule='per_tree' needs vLLM"),
    (dict(tree_server_max_concurrency=0), "tree_server_max_concurrency"),
    (dict(tree_packed_max_tokens=0), "tree_packed_max_tokens"),
    (dict(tree_packed_training="yes"), "tree_packed_training"),
    (dict(generation_kwargs={"seed": 0}), "seed"),
    (dict(tree_tool_timeout=0.0), "tree_tool_timeout"),
    (dict(tree_environment_branching="fork"), "tree_environment_branching"),
    # As the command line and YAML give them: a JSON string, parsed by GRPOConfig before the tree checks read it.
    (dict(generation_kwargs='{"frequency_penalty": 0.5}'), "frequency_penalty"),
    (dict(generation_kwargs={"num_beams": 2}), "num_beams"),
    (dict(use_transformers_continuous_batching=True), "use_transformers_continuous_batching"),
    (dict(use_transformers_paged=True), "deprecated use_transformers_paged"),
]


def test_settings_that_change_nothing_pass_validation(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                tree_segment_length=4, tree_max_depth=2)  # fmt: skip
    assert TreePOConfig(**base, generation_kwargs={"num_beams": 1}).generation_kwargs == {"num_beams": 1}
    assert TreePOConfig(**base, generation_kwargs='{"stop": ["Q:"]}').tree_stop_strings == ("Q:",)


def test_the_defaults_take_the_fastest_exact_path_of_each_backend(tmp_path):
    """Per tree on vLLM colocate, level by level on transformers and a vLLM server; packed with trees, never without
    unless asked for (tree_sampling=False is GRPOTrainer to the bit)."""
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                tree_segment_length=4, tree_max_depth=2)  # fmt: skip
    transformers = TreePOConfig(**base)
    assert (transformers.tree_rollout_schedule, transformers.tree_packed_training) == ("level", True)
    assert TreePOConfig(**base, use_vllm=True, vllm_mode="colocate").tree_rollout_schedule == "per_tree"
    assert TreePOConfig(**base, use_vllm=True, vllm_mode="server").tree_rollout_schedule == "level"
    assert TreePOConfig(**base, use_vllm=True, vllm_mode="server", tree_rollout_schedule="per_tree").tree_rollout_schedule == "per_tree"
    assert TreePOConfig(**base, tree_sampling=False).tree_packed_training is False
    assert TreePOConfig(**base, tree_sampling=False, tree_packed_training=True).tree_packed_training is True
    assert TreePOConfig(**base, tree_packed_training=False).tree_packed_training is False
    # without trees, the schedule is unused and not checked against the backend
    assert TreePOConfig(**base, tree_sampling=False, tree_rollout_schedule="per_tree").tree_sampling is False


def test_without_tree_sampling_the_completion_length_is_grpos_choice(tmp_path):
    """An A/B against GRPO is one flag: tree_sampling=False accepts any max_completion_length, and without one
    derives the tree's, so that both arms get the same budget."""
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                tree_segment_length=4, tree_max_depth=2, tree_sampling=False)  # fmt: skip
    assert TreePOConfig(**base, max_completion_length=100).max_completion_length == 100
    assert TreePOConfig(**base).max_completion_length == 8


@pytest.mark.parametrize("overrides, field", BAD_VALUES)
def test_config_validation_names_the_field(tmp_path, overrides, field):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                tree_segment_length=4, tree_max_depth=2)
    base.update(overrides)
    with pytest.raises(ValueError, match=field):
        TreePOConfig(**base)


def test_every_tree_knob_that_can_be_wrong_has_a_validation_case():
    from trl_treepo.config import treepo_fields

    covered = {field for _, field in BAD_VALUES}
    knobs = {f.name for f in treepo_fields() if f.name.startswith("tree_") and f.type != "bool"}
    assert knobs <= covered, f"no bad-value case for {sorted(knobs - covered)}"


def test_config_derives_the_completion_budget_from_segments_and_depth(tmp_path):
    args = TreePOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4)
    assert args.max_completion_length == 512 * 14
    assert (args.tree_segment_length, args.tree_max_depth, args.tree_branching_factor) == (512, 14, 2)
    assert args.epsilon_high == 0.28 and args.delta == 10.0


def test_trainer_needs_a_treepo_config(tiny_model, tmp_path):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="TreePOConfig"):
        TreePOTrainer(model=tiny_model, reward_funcs=reward_length, args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
                      train_dataset=make_math_dataset(size=4))


class FakeHubApi:
    """Stands in for huggingface_hub's HfApi (no Hub here): records the repo and what the upload would send."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"someone/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {path.name: path for path in Path(folder_path).iterdir() if path.is_file()}
        self.uploads.append((repo_id, sorted(files), files["README.md"].read_text()))


def test_push_to_hub_uploads_the_model_with_a_treepo_model_card(tiny_model, tmp_path, monkeypatch):
    import transformers.trainer

    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer, _, _, _ = train(tiny_model, tmp_path / "my-treepo-model", max_steps=1, tree_branching_factor=3)
    trainer.push_to_hub(dataset_name="reasoning-gym/basic_arithmetic")
    ((repo_id, files, card),) = api.uploads
    assert repo_id == "someone/my-treepo-model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    header = card.split("---")[1]
    assert "- trl" in header and "- treepo" in header
    assert "@article{li2025treepo" in card and "2508.17445" in card
    section = card.split("### TreePO configuration")[1].split("###")[0]
    assert "| tree_branching_factor | 3 |" in section.replace("`", "")
    assert "reasoning-gym/basic_arithmetic" in card
    assert "None" not in card.split("## Training procedure")[0]  # the base model was a local directory
    assert 'model="someone/my-treepo-model"' in card


def test_log_completions_writes_one_tree_picture_per_logging_step(tiny_model, tmp_path):
    trainer, logs, _, _ = train(tiny_model, tmp_path, max_steps=2, log_completions=True)
    pictures = sorted((tmp_path / "trees").glob("*.html"))
    assert [p.name for p in pictures] == ["step-000001.html", "step-000002.html"]
    page = pictures[0].read_text()
    assert page.count("<svg") == 1 and page.count(" R=") == 4 and page.count(" A=") == 4  # one tag per leaf
    assert page.count("<rect") > 4  # segments drawn as boxes
