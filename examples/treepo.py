# Train a model with TreePO, in the style of TRL's example scripts.
#
# Single process (CPU or one GPU):
#     python examples/treepo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name reasoning_gym/gsm_symbolic \
#         --output_dir qwen-treepo --num_generations 16 --tree_segment_length 512 --tree_max_depth 14
#
# Several processes (see examples/README.md for every launch, LoRA and vLLM server mode):
#     accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/treepo.py ...
#
# Datasets: `reasoning_gym/<task>` builds reasoning-gym problems offline; anything else goes to `datasets`
# (a Hub name or a directory saved with `save_to_disk`) and needs a `prompt` column and a `solution` column, the
# answer that math-verify checks (rename yours with `--prompt_column` / `--solution_column`).

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config
from trl.rewards import accuracy_reward

from trl_treepo import TreePOConfig, TreePOTrainer


@dataclass
class TreePOScriptArguments(ScriptArguments):
    """Script arguments for `examples/treepo.py`.

    Args:
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Dataset column holding the prompt (text or chat messages).
        solution_column (`str`, *optional*, defaults to `"solution"`):
            Dataset column holding the reference answer for math-verify.
        reasoning_gym_size (`int`, *optional*, defaults to `2000`):
            Number of problems to generate for a `reasoning_gym/<task>` dataset.
    """

    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column holding the prompt."})
    solution_column: str = field(default="solution", metadata={"help": "Dataset column holding the answer."})
    reasoning_gym_size: int = field(default=2000, metadata={"help": "Problems to generate for reasoning_gym/<task>."})


def load_training_dataset(script_args):
    name = script_args.dataset_name
    if name is None:
        raise ValueError("Pass --dataset_name: `reasoning_gym/<task>`, a Hub dataset, or a saved dataset directory.")
    if name.startswith("reasoning_gym/"):
        from trl_treepo.testing import make_math_dataset

        return make_math_dataset(name.split("/", 1)[1], size=script_args.reasoning_gym_size, seed=0)
    import os

    from datasets import load_dataset, load_from_disk

    if os.path.isdir(name):
        dataset = load_from_disk(name)
        dataset = dataset[script_args.dataset_train_split] if hasattr(dataset, "keys") else dataset
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, split=script_args.dataset_train_split)
    for column, wanted in ((script_args.prompt_column, "prompt"), (script_args.solution_column, "solution")):
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no `{column}` column (columns: {dataset.column_names}). Pass "
                f"--{'prompt' if wanted == 'prompt' else 'solution'}_column with the right name."
            )
        if column != wanted:
            dataset = dataset.rename_column(column, wanted)
    return dataset


def main(script_args, training_args, model_args):
    if model_args.dtype not in (None, "auto"):
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    trainer = TreePOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=accuracy_reward,
        args=training_args,
        train_dataset=load_training_dataset(script_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


if __name__ == "__main__":
    parser = TrlParser((TreePOScriptArguments, TreePOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
