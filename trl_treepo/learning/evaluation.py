"""Held-out accuracy with honest standard errors: greedy, and sampled at the training temperature.

The held-out problems are distinct and none of them is a training prompt (`ReasoningTask.problems` excludes them
from the warm-up and RL data). Samples of one problem are not independent draws of the accuracy: a hard problem is
missed by all of them. So the sampled accuracy's standard error clusters by problem: it is the spread of the
per-problem accuracies, ÷ √problems, not the binomial error of all samples.
"""

from __future__ import annotations

import math
import statistics


def clustered_mean_and_se(per_problem: list[list[float]]) -> tuple[float, float]:
    """Mean accuracy over problems (each the mean of its samples) and its standard error, clustered by problem."""
    means = [statistics.mean(samples) for samples in per_problem]
    mean = statistics.mean(means)
    return mean, (statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan"))


def difference_se(before: dict, after: dict, key: str = "sampled") -> float:
    """Standard error of an after − before difference, taken as √(se_before² + se_after²)."""
    return math.sqrt(before[f"{key}_se"] ** 2 + after[f"{key}_se"] ** 2)


def completions(model, tokenizer, task, problems, max_new_tokens: int, **sampling) -> list[str]:
    """One completion by `model` of each problem's prompt (chat-templated when the task is conversational), decoded
    in one left-padded batch without gradients; `sampling` goes to `generate` (greedy when empty)."""
    import torch

    texts = [
        row["prompt"] if isinstance(row["prompt"], str)
        else tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        for row in task.dataset(problems)
    ]  # fmt: skip
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    tokenizer.padding_side = padding_side
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **{"do_sample": False, **sampling})  # fmt: skip
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def held_out_accuracy(model, tokenizer, task, problems, samples: int, max_new_tokens: int, seed: int) -> dict:
    """Greedy and sampled (temperature 1, `samples` per problem) accuracy of `model` on `problems`, each with its
    clustered standard error. Sampling is seeded and the caller's random state restored, so that the same weights
    give the same numbers and evaluation does not change the training run's random draws."""
    import torch

    entries = [entry for _, entry in problems]

    def correct(**sampling) -> list[float]:
        texts = completions(model, tokenizer, task, problems, max_new_tokens, **sampling)
        return [float(task.correct(text, entry)) for text, entry in zip(texts, entries)]

    was_training = model.training
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    greedy = correct()
    draws = [correct(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) for _ in range(samples)]
    torch.random.set_rng_state(state)
    model.train(was_training)
    greedy_mean, greedy_se = clustered_mean_and_se([[value] for value in greedy])
    sampled_mean, sampled_se = clustered_mean_and_se([list(values) for values in zip(*draws)])
    return {"greedy": greedy_mean, "greedy_se": greedy_se, "sampled": sampled_mean, "sampled_se": sampled_se,
            "problems": len(problems), "samples": samples}  # fmt: skip
