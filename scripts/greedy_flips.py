"""Which held-out greedy answers a short RL run changes, and how (docs/learning.md, "Why greedy accuracy falls").

    python scripts/greedy_flips.py --preset chains --arm grpo --learning_rate 2e-4 --max_steps 12 \
        [--cache_dir outputs/tune/cache] [--problems 300] [--seed 0]

Trains the arm from the preset's warm model exactly as the study does (vLLM colocate in float32), then answers the
first held-out problems greedily with the model before and after, and prints the counts of right→right, right→wrong,
wrong→right and wrong→wrong with the first right→wrong pairs.
"""

from __future__ import annotations

import argparse
import collections

from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_treepo import TreePOTrainer
from trl_treepo.learning import (PRESETS, completions, held_out_problems, rl_config, rl_dataset, task_of,  # fmt: skip
                                 vllm_in_policy_precision, warm_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="chains", choices=sorted(PRESETS))
    parser.add_argument("--arm", default="grpo")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--cache_dir", default="outputs/tune/cache")
    parser.add_argument("--output_dir", default="outputs/greedy-flips")
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setting = PRESETS[args.preset].with_overrides(rl={"learning_rate": args.learning_rate, "max_steps": args.max_steps})
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    warm = warm_model(setting, args.seed, args.cache_dir, task, held_out)
    tokenizer = AutoTokenizer.from_pretrained(warm)
    problems = held_out[: args.problems]

    def greedy(model) -> list[str]:
        return completions(model.eval(), tokenizer, task, problems, setting.held_out["max_new_tokens"])

    before = greedy(AutoModelForCausalLM.from_pretrained(warm))
    with vllm_in_policy_precision():
        trainer = TreePOTrainer(model=warm, reward_funcs=task.reward(),
                                args=rl_config(setting, args.arm, args.output_dir, args.seed),
                                train_dataset=rl_dataset(setting, args.seed, task, held_out))  # fmt: skip
    trainer.train()
    after = greedy(trainer.accelerator.unwrap_model(trainer.model))
    flips, shown = collections.Counter(), 0
    for (_, entry), old, new in zip(problems, before, after):
        was, now = task.correct(old, entry), task.correct(new, entry)
        flips[f"{'right' if was else 'wrong'}->{'right' if now else 'wrong'}"] += 1
        if was and not now and shown < 8:
            print(f"before: {old.splitlines()[0]}\nafter:  {new.splitlines()[0]}\n")
            shown += 1
    print(dict(flips))


if __name__ == "__main__":
    main()
