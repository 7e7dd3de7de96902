"""Offline reasoning tasks from `reasoning-gym`: prompts with a `\\boxed{}` answer format, and worked answers for the
SFT warm-up."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "Solve the problem. Reason step by step, then give the final answer as \\boxed{answer}."
)


def left_to_right(expression: str) -> list[tuple[str, int]] | None:
    """The operations of a `basic_arithmetic` sum without parentheses, left to right, each with its partial result:
    "4 - 1 - 7" gives [("4 - 1", 3), ("3 - 7", -4)] (None for other expressions)."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in "+-" for op in parts[1::2]):
        return None
    try:
        value = int(parts[0])
        steps = []
        for op, term in zip(parts[1::2], parts[2::2]):
            result = value + int(term) if op == "+" else value - int(term)
            steps.append((f"{value} {op} {term}", result))
            value = result
    except ValueError:
        return None
    return steps


def worked_steps(expression: str) -> str | None:
    """Left-to-right partial results of a `basic_arithmetic` sum without parentheses: "4 - 1 - 7" gives
    "4 - 1 = 3, 3 - 7 = -4." (None for other expressions)."""
    steps = left_to_right(expression)
    return None if steps is None else ", ".join(f"{operation} = {result}" for operation, result in steps) + "."


def make_math_dataset(
    task: str = "basic_arithmetic",
    size: int = 64,
    seed: int = 0,
    conversational: bool = True,
    with_solution: bool = False,
    **task_config,
):
    """A `datasets.Dataset` of reasoning-gym problems with a `prompt` column and a `solution` column (the answer).

    Conversational rows carry a system message asking for a `\\boxed{}` answer; `solution` is what TRL's
    `accuracy_reward` checks against. With `with_solution`, a `completion` column holds a worked answer ending in
    `\\boxed{answer}`, for the SFT warm-up: the task's own worked solution, or for `basic_arithmetic` the partial
    results left to right. `task_config` goes to `reasoning_gym.create_dataset` (for example
    `max_terms=2, max_digits=1` for `basic_arithmetic`).
    """
    import reasoning_gym
    from datasets import Dataset

    items = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    rows = []
    for item in items:
        question, answer = item["question"], str(item["answer"])
        if conversational:
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        else:
            prompt = f"{SYSTEM_PROMPT}\n\nProblem: {question}\nSolution:"
        row = {"prompt": prompt, "solution": answer}
        if with_solution:
            expression = item["metadata"].get("expression", question)
            reasoning = item["metadata"].get("answer_cot") or worked_steps(expression) or f"{expression} = {answer}"
            reasoning = reasoning.split("\n####")[0].strip()
            text = f"{reasoning}\nThe final answer is \\boxed{{{answer}}}."
            row["completion"] = [{"role": "assistant", "content": text}] if conversational else " " + text
        rows.append(row)
    return Dataset.from_list(rows)



