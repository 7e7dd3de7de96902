"""Offline reasoning tasks from `reasoning-gym`: prompts with a `\\boxed{}` answer format, and worked answers for the
SFT warm-up."""

from __future__ import annotations

import json

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


def make_synthetic_dataset(size: int = 64, seed: int = 0):
    """Conversational "Calculate a + b." prompts (two numbers below 100) with a `solution` column, built without
    reasoning-gym: for machines that lack it and cannot download it (the GPU check, `scripts/gpu_check.py`)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Calculate {a} + {b}."}]
        rows.append({"prompt": prompt, "solution": str(a + b)})
    return Dataset.from_list(rows)


def reduction_steps(expression: str) -> str | None:
    """A `basic_arithmetic` sum without parentheses, reduced one operation at a time, each step restating what is left:
    "4 - 1 - 7 + 5" gives "4 - 1 - 7 + 5 = 3 - 7 + 5 = -4 + 5 = 1." (None for other expressions).

    Every step only combines the two leading numbers and copies the rest, so a small model can learn it from the text
    just before; left-to-right partial results (`worked_steps`) instead make it find the next term in the prompt.
    """
    steps = left_to_right(expression)
    if steps is None:
        return None
    rest = expression.split()[3:]
    lines = [expression]
    for _, value in steps:
        lines.append(" ".join([str(value), *rest]))
        rest = rest[2:]
    return " = ".join(lines) + "."


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




# ---------------------------------------------------------------------------------- any reasoning-gym task


def _sum_of(values: list[int]) -> str:
    """Partial results summed one addition at a time, as `reduction_steps` does: [3, 0, 2] gives "3 + 0 + 2 = 3 + 2 =
    5." (a single value is said as itself)."""
    if len(values) == 1:
        return f"{values[0]}."
    return reduction_steps(" + ".join(str(value) for value in values))


def leg_counting_steps(entry: dict) -> str | None:
    """Each animal's legs, then their sum: "2 woodlouse: 2 * 14 = 28.\n1 leech: 1 * 0 = 0.\n28 + 0 = 28." """
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry.get("metadata", {}).get("animals") or {}
    if not animals or any(animal not in ANIMALS for animal in animals):
        return None
    lines = [f"{count} {animal}: {count} * {ANIMALS[animal]} = {count * ANIMALS[animal]}." for animal, count in
             animals.items()]  # fmt: skip
    totals = [count * ANIMALS[animal] for animal, count in animals.items()]
    if sum(totals) != int(entry["answer"]):
        return None
    return "\n".join([*lines, _sum_of(totals)])


def letter_counting_steps(entry: dict) -> str | None:
    """The letter's count in each word, then their sum: 'hundred: 0.\nthousand: 0.\nnames: 1.\n0 + 0 + 1 = 0 + 1 = 1.'
    (case-insensitive, as reasoning-gym counts)."""
    metadata = entry.get("metadata", {})
    span, letter = metadata.get("span"), metadata.get("target_letter")
    if not span or not letter:
        return None
    counts = [word.lower().count(letter) for word in span]
    if sum(counts) != int(entry["answer"]):
        return None
    return "\n".join([*(f"{word}: {count}." for word, count in zip(span, counts)), _sum_of(counts)])


def simple_equation_steps(entry: dict) -> str | None:
    """A linear equation a*x + b = c solved in two steps: "5 - 8*e = -51" gives "-8*e = -51 - 5 = -56.\ne = -56 / -8
    = 7." (None for an equation that is not linear in one variable with an integer solution)."""
    import sympy

    metadata = entry.get("metadata", {})
    equation, name = metadata.get("equation", ""), metadata.get("variable")
    if equation.count("=") != 1 or not name:
        return None
    variable = sympy.Symbol(name)
    try:
        left, right = (sympy.sympify(side) for side in equation.split("="))
        polynomial = sympy.Poly(left - right, variable)
    except (sympy.SympifyError, sympy.PolynomialError, TypeError):
        return None
    if polynomial.degree() != 1 or not right.is_Integer:
        return None
    slope, constant = (int(c) for c in sympy.Poly(left, variable).all_coeffs())
    target = int(right)
    moved = target - constant
    if slope == 0 or moved % slope != 0 or str(moved // slope) != str(entry["answer"]):
        return None
    term = name if slope == 1 else (f"-{name}" if slope == -1 else f"{slope}*{name}")
    lines = []
    if constant:
        operation = f"{target} - {constant}" if constant > 0 else f"{target} + {-constant}"
        lines.append(f"{term} = {operation} = {moved}.")
    if slope != 1:
        lines.append(f"{name} = {moved} / {slope} = {moved // slope}.")
    return "\n".join(lines) or None


# Worked answers of the tasks the learning suite uses beyond sums (`trl_treepo.learning.settings.SUITES`).
WORKED_STEPS = {
    "leg_counting": leg_counting_steps,
    "letter_counting": letter_counting_steps,
    "simple_equations": simple_equation_steps,
}


def _answer_of(completion) -> str | None:
    """The last `\\boxed{}` answer of a completion (text, or a conversation whose last message is the answer)."""
    from ..tree import find_boxed_answers

    text = completion[-1]["content"] if isinstance(completion, list) and completion else completion
    boxed = find_boxed_answers(text or "") if isinstance(text, str) else []
    return boxed[-1][2].strip() if boxed else None


class ReasoningTask:
    """One reasoning-gym task and its configuration: problems, worked answers for the warm-up, a held-out set that no
    training prompt repeats, and the task's own scorer as the reward.

    A completion is correct when reasoning-gym's `score_answer` gives full marks to its last `\\boxed{}` answer. Worked
    answers: sums (`basic_arithmetic`, `chain_sum`) reduced one operation at a time (`reduction_steps`), the task's
    `answer_cot` where it has one (`gsm_symbolic`), otherwise the answer alone. Prompts are conversations opened by
    `system_prompt`, or, with `conversational=False`, the question as plain text (TRL's standard format: no chat
    template, so short prompts, for tiny models that learn the answer format from the warm-up).

    Raises `ValueError` naming the task for an unknown task name or a configuration reasoning-gym rejects.
    """

    def __init__(self, name: str, config: dict | None = None, system_prompt: str = SYSTEM_PROMPT,
                 conversational: bool = True):  # fmt: skip
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        self.name, self.config, self.system_prompt = name, dict(config or {}), system_prompt
        self.conversational = conversational
        if name not in DATASETS:
            import difflib

            close = difflib.get_close_matches(name, DATASETS, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"Unknown reasoning-gym task {name!r}.{hint} Tasks: {', '.join(sorted(DATASETS))}.")
        try:
            self._scorer = reasoning_gym.create_dataset(name, size=1, seed=0, **self.config)
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"reasoning-gym rejected the configuration {json.dumps(self.config)} of task {name!r}: "
                f"{type(error).__name__}: {error}. Give a JSON object of that task's config fields."
            ) from error
        self.entries: dict[str, dict] = {}  # problem id -> reasoning-gym entry, for scoring

    def problems(self, size: int, seed: int, exclude=frozenset(), unique: bool = False) -> list[tuple[str, dict]]:
        """`size` (problem id, entry) pairs drawn with `seed`, none of whose questions is in `exclude`; all distinct
        with `unique`. Raises if the task's problem space cannot supply them."""
        import reasoning_gym

        chosen, seen, attempt = [], set(exclude), 0
        while len(chosen) < size:
            batch = reasoning_gym.create_dataset(self.name, size=max(2 * size, 64), seed=seed + 7919 * attempt,
                                                 **self.config)  # fmt: skip
            for index, entry in enumerate(batch):
                if entry["question"] in seen:
                    continue
                if unique:
                    seen.add(entry["question"])
                problem_id = f"{seed}:{attempt}:{index}"
                self.entries[problem_id] = entry
                chosen.append((problem_id, entry))
                if len(chosen) == size:
                    break
            attempt += 1
            if attempt == 50 and len(chosen) < size:
                raise ValueError(
                    f"Task {self.name!r} with configuration {json.dumps(self.config)} yields only {len(chosen)} "
                    f"{'distinct ' if unique else ''}problems outside the held-out set, not {size}: widen the "
                    "configuration or hold out fewer problems."
                )
        return chosen

    def dataset(self, problems, with_solution: bool = False, unfinished_share: float = 0.0, seed: int = 0):
        """Rows with `prompt`, `solution` and `problem_id` (with `with_solution`, a worked `completion`), as
        conversations or plain text (`conversational`).

        With `unfinished_share`, that fraction of the completions (drawn with `seed`) is the `unfinished_answer`
        instead of the worked one: a warm-up after which the model sometimes stops before it is done, a habit RL has
        to find costly."""
        import random

        from datasets import Dataset

        if not 0.0 <= unfinished_share <= 1.0:
            raise ValueError(f"unfinished_share must be a fraction in [0, 1], got {unfinished_share}.")
        rng = random.Random(seed)
        rows = []
        for problem_id, entry in problems:
            row = {"prompt": self.prompt(entry), "solution": str(entry["answer"]), "problem_id": problem_id}
            if with_solution:
                unfinished = rng.random() < unfinished_share
                answer = self.unfinished_answer(entry) if unfinished else self.worked_answer(entry)
                row["completion"] = [{"role": "assistant", "content": answer}] if self.conversational else answer
            rows.append(row)
        return Dataset.from_list(rows)

    def prompt(self, entry: dict):
        if not self.conversational:
            return f"{entry['question']}\n"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": entry["question"]}]

    def worked_answer(self, entry: dict) -> str:
        metadata = entry.get("metadata", {})
        reasoning = None
        if self.name in ("basic_arithmetic", "chain_sum") and "expression" in metadata:
            reasoning = reduction_steps(metadata["expression"])
        elif self.name in WORKED_STEPS:
            reasoning = WORKED_STEPS[self.name](entry)
        reasoning = reasoning or (metadata.get("answer_cot") or "").split("\n####")[0].strip()
        final = f"The final answer is \\boxed{{{entry['answer']}}}."
        return f"{reasoning}\n{final}" if reasoning else final

    def unfinished_answer(self, entry: dict) -> str:
        """The worked answer stopped one step early, with what is left boxed as if it were the answer:
        "4 + 1 + 7 = 5 + 7.\nThe final answer is \\boxed{5 + 7}." (the scorer gives it no marks). For sums only.

        Raises `ValueError` for a task whose answers have no reduction steps to stop before."""
        expression = entry.get("metadata", {}).get("expression", "")
        worked = reduction_steps(expression) if self.name in ("basic_arithmetic", "chain_sum") else None
        if worked is None:
            raise ValueError(
                f"Unfinished warm-up answers need sums reduced one step at a time (basic_arithmetic or chain_sum with "
                f"+ and - only, no parentheses); task {self.name!r} problem {entry['question']!r} has none. Set the "
                "warm-up's unfinished_share to 0."
            )
        steps = worked.rstrip(".").split(" = ")
        kept = steps[:-1] if len(steps) > 2 else steps[:1]
        return f"{' = '.join(kept)}.\nThe final answer is \\boxed{{{kept[-1]}}}."

    def correct(self, completion, entry: dict) -> bool:
        answer = _answer_of(completion)
        try:
            return answer is not None and self._scorer.score_answer(answer, entry) >= 1.0
        except Exception:  # a scorer that cannot parse the answer: wrong, as an unparsable answer is
            return False

    def reward(self):
        """A TRL reward function: 1.0 for a correct completion of the row's problem (`problem_id` column), else 0."""

        def task_accuracy(completions, problem_id, **kwargs) -> list[float]:
            return [float(self.correct(c, self.entries[p])) for c, p in zip(completions, problem_id)]

        task_accuracy.__name__ = f"{self.name}_accuracy"
        return task_accuracy
