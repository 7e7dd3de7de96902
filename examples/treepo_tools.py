# Train a tool-using model with TreePO, in the style of TRL's example scripts: the GRPOTrainer tool-calling recipe
# with TreePOTrainer and TreePOConfig in place of GRPOTrainer and GRPOConfig.
#
# Each prompt grows a tree through tool calls: a turn that calls the calculator ends its segment, the call runs once
# for that tree node, and every leaf below shares its result (docs/algorithm.md §8).
#
#     python examples/treepo_tools.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --output_dir qwen-treepo-tools \
#         --num_generations 8 --tree_segment_length 128 --tree_max_depth 4 --max_tool_calling_iterations 4
#
# Offline, on a CPU, with a tiny model warmed up to call the tool (about 5 minutes to build, then cached):
#     python -c "from trl_treepo.testing import make_warm_model as m; m('outputs/tool-model', warm='tool-calls', steps=300)"
#     python examples/treepo_tools.py --model_name_or_path outputs/tool-model --output_dir outputs/treepo-tools \
#         --use_cpu --num_generations 8 --per_device_train_batch_size 16 --tree_segment_length 32 \
#         --tree_max_depth 6 --max_tool_calling_iterations 3 --max_steps 10 --logging_steps 1 --report_to none
#
# With `--use_environment`, the calculator is a method of an environment (`environment_factory`): every tree path
# owns its instance (`--tree_environment_branching copy`, the default, or `replay`), which counts the path's calls.
#
# The dataset is reasoning-gym's `basic_arithmetic` with 2–3 one-digit terms, built offline. (The tiny offline model
# calls the tool in the right format but rarely copies the numbers right, so its rewards start near 0.) The logs add,
# per step, `tree/tool_calls` (calls run) against `tree/sequential_tool_calls` (calls that sequential rollouts of the
# same leaves would have run) and `tree/tool_failures`.

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_treepo import TreePOConfig, TreePOTrainer
from trl_treepo.testing import calculate, make_tool_dataset  # the calculator tool: `a + b` or `a - b`
from trl_treepo.tree import find_boxed_answers

calculator = calculate  # the name `CalculatorEnv.calculate` calls, where `calculate` is the method itself


@dataclass
class ToolScriptArguments(ScriptArguments):
    """Script arguments for `examples/treepo_tools.py`.

    Args:
        dataset_size (`int`, *optional*, defaults to `2000`):
            Number of reasoning-gym problems to generate.
        use_environment (`bool`, *optional*, defaults to `False`):
            Serve the calculator from an `environment_factory` environment instead of a standalone tool.
    """

    dataset_size: int = field(default=2000, metadata={"help": "Number of reasoning-gym problems to generate."})
    use_environment: bool = field(default=False, metadata={"help": "Serve the calculator from an environment."})


def final_answer(text: str) -> str | None:
    boxed = find_boxed_answers(text or "")
    return boxed[-1][2].strip() if boxed else None


def answer_reward(completions, solution, **kwargs):
    """1.0 when the boxed answer of the conversation's last message is the solution."""
    return [float(final_answer(messages[-1]["content"]) == answer) for messages, answer in zip(completions, solution)]


class CalculatorEnv:
    """An environment whose tool is the calculator; it keeps the path's call count and the example's solution."""

    def __init__(self):
        self.solution, self.calls = None, 0

    def reset(self, solution, **kwargs):
        self.solution, self.calls = solution, 0

    def calculate(self, expression: str) -> str:
        self.calls += 1
        return calculator(expression)

    calculate.__doc__ = calculator.__doc__  # the same schema in the prompt as `tools=[calculate]`


def main(script_args, training_args, model_args):
    tools = {"environment_factory": CalculatorEnv} if script_args.use_environment else {"tools": [calculate]}
    trainer = TreePOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=answer_reward,
        args=training_args,
        train_dataset=make_tool_dataset(script_args.dataset_size, seed=0),
        peft_config=get_peft_config(model_args),
        **tools,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name="reasoning_gym/basic_arithmetic")


if __name__ == "__main__":
    parser = TrlParser((ToolScriptArguments, TreePOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
