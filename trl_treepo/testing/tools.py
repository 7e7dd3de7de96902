"""An offline tool task: one-digit sums solved through a `calculate` tool, its reward, and the transcripts that teach a
tiny model to call the tool (agentic trees, docs/algorithm.md §8)."""

from __future__ import annotations

from .tasks import left_to_right

TOOL_TASK_CONFIG = {"min_terms": 2, "max_terms": 3, "max_digits": 1, "operators": ("+", "-"), "allow_parentheses": False}
TOOL_SYSTEM_PROMPT = (
    "Compute the expression with the calculate tool, one operation per call, then give the final answer as "
    "\\boxed{answer}."
)


def calculate(expression: str) -> str:
    """
    Evaluates one addition or subtraction of two integers.

    Args:
        expression: The operation to evaluate, for example "3 + 4" or "7 - 9".

    Returns:
        The result, as an integer.
    """
    parts = expression.split()
    if len(parts) != 3 or parts[1] not in ("+", "-"):
        raise ValueError(f"Expected 'a + b' or 'a - b', got {expression!r}.")
    left, right = int(parts[0]), int(parts[2])
    return str(left + right if parts[1] == "+" else left - right)


def counting_calculator():
    """`calculate` as a tool that records each expression it is called with: `(tool, calls)`."""
    import functools

    calls = []

    @functools.wraps(calculate)
    def counted(expression: str) -> str:
        calls.append(expression)
        return calculate(expression)

    return counted, calls


def make_tool_dataset(size: int = 64, seed: int = 0, **task_config):
    """Conversational reasoning-gym `basic_arithmetic` problems (2–3 one-digit terms by default) to solve with the
    `calculate` tool: a `prompt` column with a system message naming the tool, and a `solution` column."""
    import reasoning_gym
    from datasets import Dataset

    items = reasoning_gym.create_dataset("basic_arithmetic", size=size, seed=seed, **{**TOOL_TASK_CONFIG, **task_config})
    rows = [
        {
            "prompt": [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, {"role": "user", "content": item["question"]}],
            "solution": str(item["answer"]),
        }
        for item in items
    ]
    return Dataset.from_list(rows)


def final_answer_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 where the last message's last `\\boxed{}` answer equals the solution: a tool-using completion is a
    conversation, and its answer comes after the tool results (TRL's `accuracy_reward` reads the first message)."""
    from ..tree import find_boxed_answers

    rewards = []
    for completion, answer in zip(completions, solution):
        text = completion[-1]["content"] if isinstance(completion, list) and completion else str(completion)
        boxed = find_boxed_answers(text or "")
        rewards.append(float(bool(boxed) and boxed[-1][2].strip() == str(answer).strip()))
    return rewards


def tool_transcript(expression: str) -> list[dict] | None:
    """The assistant/tool messages that solve `expression` left to right with `calculate`, one call per operation
    (None for expressions `left_to_right` does not take)."""
    steps = left_to_right(expression)
    if steps is None:
        return None
    messages = []
    for operation, result in steps:
        call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": operation}}}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": str(result)},
        ]
    messages.append({"role": "assistant", "content": f"The final answer is \\boxed{{{steps[-1][1]}}}."})
    return messages


def tool_sft_dataset(tokenizer, size: int, seed: int, task_config: dict | None):
    """Prompt/completion texts of `tool_transcript` conversations, rendered by the chat template with the tool."""
    from datasets import Dataset

    rows = []
    for row in make_tool_dataset(size, seed, **(task_config or {})):
        expression = row["prompt"][-1]["content"].removeprefix("Calculate ").removesuffix(".")
        transcript = tool_transcript(expression)
        if transcript is None:
            continue
        prompt = tokenizer.apply_chat_template(row["prompt"], tools=[calculate], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + transcript, tools=[calculate], tokenize=False)
        rows.append({"prompt": prompt, "completion": full[len(prompt) :].rstrip("\n")})
    return Dataset.from_list(rows)


