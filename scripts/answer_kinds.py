"""What a warm model's held-out answers get wrong, for a sums preset of `trl_treepo.learning` (docs/learning.md).

    python scripts/answer_kinds.py chains [--cache_dir outputs/tune/cache] [--problems 200] [--seed 0]

Builds (or reuses) the preset's warm model for the seed, answers the first held-out problems greedily and three times
sampled at temperature 1, and sorts every answer: right; unfinished (its boxed answer is a sum still to reduce); a
wrong partial result where the terms left were copied right ("value"); a term miscopied ("copy"); anything else.
"""

from __future__ import annotations

import argparse
import collections

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_treepo.learning import PRESETS, completions, held_out_problems, task_of, warm_model
from trl_treepo.testing import reduction_steps


def kind(task, entry, text: str) -> str:
    if task.correct(text, entry):
        return "right"
    if "+" in text.split("boxed")[-1]:
        return "unfinished"
    gold = reduction_steps(entry["metadata"]["expression"]).rstrip(".").split(" = ")
    written = text.strip().split("\n")[0].rstrip(".").split(" = ")
    for expected, got in zip(gold, written):
        if expected != got:
            return "value" if expected.split()[1:] == got.split()[1:] else "copy"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--cache_dir", default="outputs/tune/cache")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setting = PRESETS[args.preset]
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    path = warm_model(setting, args.seed, args.cache_dir, task, held_out)
    problems = held_out[: args.problems]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    for name, sampling, draws in [("greedy", {}, 1),
                                  ("sampled", dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0), 3)]:  # fmt: skip
        kinds = collections.Counter()
        for _ in range(draws):
            texts = completions(model, tokenizer, task, problems, setting.held_out["max_new_tokens"], **sampling)
            kinds.update(kind(task, entry, text) for (_, entry), text in zip(problems, texts))
        total = sum(kinds.values())
        print(f"{name}: " + ", ".join(f"{k} {v / total:.1%}" for k, v in kinds.most_common()) + f" (of {total})")


if __name__ == "__main__":
    main()
