"""A setting where RL visibly learns on a CPU, and the TreePO-vs-GRPO study on it (docs/learning.md).

The setting (`make demo` uses it too): reasoning-gym sums and differences of two one-digit numbers; the offline tiny
Qwen2 (hidden 64, 2 layers, 8k vocabulary) warmed up with 600 SFT steps on worked answers, after which its greedy
answers are right about 80% of the time but its samples at temperature 1 only about 53%: the headroom RL can take.
RL: 32 prompts × 8 completions per step, learning rate 2e-4, TRL's math-verify `accuracy_reward`, vLLM colocate.

Held-out accuracy is measured on 200 problems the model never trains on, both ways: greedy, and sampled at the
training temperature (4 samples per problem). The study runs each arm from the same warm model, seeds and prompts:

    python -m trl_treepo.learning --output_dir outputs/learning --seeds 0,1,2 [--arm_seeds random_initial_divergence=0]

and writes `study.json`, `accuracy-vs-decoded-tokens.png`, `accuracy-vs-wall-time.png` and `summary.md`. Each arm runs
in its own process (one vLLM engine each). Long runs belong here, never to `make test`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo")) / "learning"

TASK = "basic_arithmetic"
TASK_CONFIG = dict(
    min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"), allow_parentheses=False,
    allow_negation=False,
)  # fmt: skip
WARMUP = dict(examples=4000, steps=600, batch_size=16, learning_rate=3e-3)
HELD_OUT = dict(size=200, seed=10_000, samples=4, max_new_tokens=32)
RL = dict(prompts_per_step=32, num_generations=8, learning_rate=2e-4, max_steps=40, segment_length=4, max_depth=8)

# The study's arms: TRL's GRPO, TreePO with the paper's defaults, and the paper's cheap ablations.
ARMS = {
    "treepo": {},
    "grpo": {"tree_sampling": False},
    "tree_sampling_grpo_advantage": {"tree_advantage_estimator": "grpo"},
    "tree_advantage_group_size": {"tree_advantage_weighting": "group_size"},
    "random_initial_divergence": {"tree_initial_divergence": 2, "tree_initial_divergence_max": 8},
}
ARM_LABELS = {
    "treepo": "TreePO (paper defaults)",
    "grpo": "TRL GRPO",
    "tree_sampling_grpo_advantage": "tree sampling, GRPO advantage",
    "tree_advantage_group_size": "TreePO, group-size weighting (Eq. 6)",
    "random_initial_divergence": "TreePO, random initial divergence 2-8",
}


def warm_model(cache_dir: str | os.PathLike, seed: int, steps: int = WARMUP["steps"]) -> str:
    """The tiny model after the SFT warm-up (built offline once, then reused from `cache_dir`)."""
    from .testing import make_tiny_model, make_warm_model

    cache_dir = Path(cache_dir)
    base = make_tiny_model(cache_dir / f"base-{seed}", seed=seed)
    warmup = {**WARMUP, "steps": steps}
    return make_warm_model(cache_dir / f"warm-{seed}-{steps}", TASK, base_model=base, seed=seed, task_config=TASK_CONFIG,
                           **warmup)  # fmt: skip


def held_out_accuracy(model, tokenizer, size=None, seed=None, samples=None, max_new_tokens=None) -> dict:
    """Greedy and sampled (temperature 1) pass@1 with math-verify on problems the model never trains on.

    Returns the two accuracies and the standard error of the sampled one (binomial over all samples).
    """
    import torch
    from trl.rewards import accuracy_reward

    from .testing import make_math_dataset

    size, seed = size or HELD_OUT["size"], HELD_OUT["seed"] if seed is None else seed
    samples, max_new_tokens = samples or HELD_OUT["samples"], max_new_tokens or HELD_OUT["max_new_tokens"]
    dataset = make_math_dataset(TASK, size=size, seed=seed, **TASK_CONFIG)
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in dataset]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    tokenizer.padding_side = padding_side

    def accuracy(**sampling) -> float:
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **sampling)  # fmt: skip
        completions = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        rewards = accuracy_reward([[{"content": c}] for c in completions], dataset["solution"])
        return sum(r or 0.0 for r in rewards) / len(rewards)

    was_training = model.training
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same samples for the same weights: before/after differences are the model's
    with torch.no_grad():
        greedy = accuracy(do_sample=False)
        sampled = statistics.mean(accuracy(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) for _ in range(samples))
    torch.random.set_rng_state(state)  # evaluation must not change the training run's random draws
    model.train(was_training)
    return {"greedy": greedy, "sampled": sampled,
            "sampled_se": math.sqrt(sampled * (1 - sampled) / (size * samples))}  # fmt: skip


def rl_config(output_dir, seed: int, max_steps: int, backend: str = "vllm", **overrides):
    """The RL run's `TreePOConfig` (tree sampling, unless `tree_sampling=False` is among the overrides)."""
    from . import TreePOConfig

    return TreePOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=RL["prompts_per_step"] * RL["num_generations"],
        num_generations=RL["num_generations"],
        tree_segment_length=RL["segment_length"],
        tree_max_depth=RL["max_depth"],
        max_steps=max_steps,
        learning_rate=RL["learning_rate"],
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_vllm=backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=512,
        **overrides,
    )


def rl_dataset(seed: int, max_steps: int):
    from .testing import make_math_dataset

    return make_math_dataset(TASK, size=max_steps * RL["prompts_per_step"], seed=seed + 1, **TASK_CONFIG)


def leaf_tokens(log: dict) -> float:
    """Completion tokens of a step's rows: what the loss trains on, and what sequential sampling decodes."""
    return log["completions/mean_length"] * RL["prompts_per_step"] * RL["num_generations"]


def decoded_tokens(log: dict) -> float:
    """Tokens the rollout of a step decoded: the tree's count, or every completion token of sequential sampling."""
    return log["tree/decoded_tokens"] if "tree/decoded_tokens" in log else leaf_tokens(log)


def make_held_out_callback(trainer, every: int):
    """A callback that measures held-out accuracy every `every` steps, against cumulative decoded tokens and the
    training's wall time (evaluation time excluded)."""
    from transformers import TrainerCallback

    class HeldOutCurve(TrainerCallback):
        def __init__(self):
            self.points, self.evaluating, self.started = [], 0.0, time.perf_counter()

        def measure(self, state):
            began = time.perf_counter()
            model = trainer.accelerator.unwrap_model(trainer.model)
            result = held_out_accuracy(model, trainer.processing_class)
            self.evaluating += time.perf_counter() - began
            logs = [log for log in state.log_history if "reward" in log]
            self.points.append({
                "step": state.global_step,
                "decoded_tokens": sum(decoded_tokens(log) for log in logs),
                "wall_s": time.perf_counter() - self.started - self.evaluating,
                **result,
            })  # fmt: skip

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.measure(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Not on_step_end: the step's log, with its decoded tokens, joins log_history only after that.
            if "reward" in (logs or {}) and (state.global_step % every == 0 or state.global_step == state.max_steps):
                self.measure(state)

    return HeldOutCurve()


def run_arm(arm: str, seed: int, output_dir, max_steps: int, cache_dir, every: int, backend: str,
            warmup_steps: int = WARMUP["steps"]) -> dict:
    """One RL run of `arm` from the seed's warm model, with its held-out curve and per-step logs."""
    from trl.rewards import accuracy_reward

    from . import TreePOTrainer

    trainer = TreePOTrainer(
        model=warm_model(cache_dir, seed, warmup_steps),
        reward_funcs=accuracy_reward,
        args=rl_config(output_dir, seed, max_steps, backend, **ARMS[arm]),
        train_dataset=rl_dataset(seed, max_steps),
    )
    curve = make_held_out_callback(trainer, every)
    trainer.add_callback(curve)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    return {
        "arm": arm,
        "seed": seed,
        "curve": curve.points,
        "rewards": [log["reward"] for log in logs],
        "decoded_tokens": [decoded_tokens(log) for log in logs],
        "leaf_tokens": [leaf_tokens(log) for log in logs],
    }


# --------------------------------------------------------------------------------------------------- the study


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def _quarter_gain(rewards: list[float]) -> float:
    quarter = max(len(rewards) // 4, 1)
    return statistics.mean(rewards[-quarter:]) - statistics.mean(rewards[:quarter])


def _tokens_to_reach(curve: list[dict], key: str, target: float) -> float | None:
    """Decoded tokens at which the held-out accuracy first reaches `target`, interpolated between measurements."""
    for before, after in zip(curve, curve[1:]):
        if before[key] < target <= after[key]:
            share = (target - before[key]) / (after[key] - before[key])
            return before["decoded_tokens"] + share * (after["decoded_tokens"] - before["decoded_tokens"])
    return 0.0 if curve and curve[0][key] >= target else None


def _accuracy_at(curve: list[dict], key: str, tokens: float) -> float | None:
    """Held-out accuracy after `tokens` decoded tokens, interpolated between measurements (None past the curve)."""
    for before, after in zip(curve, curve[1:]):
        if before["decoded_tokens"] <= tokens <= after["decoded_tokens"]:
            share = (tokens - before["decoded_tokens"]) / max(after["decoded_tokens"] - before["decoded_tokens"], 1e-9)
            return before[key] + share * (after[key] - before[key])
    return None


def summarize(runs: list[dict]) -> dict:
    """Per arm over seeds: held-out gains with standard errors, the reward gain, tokens decoded, and two comparisons
    with TRL GRPO on the same seed (same warm model and prompts): the sampled accuracy minus GRPO's after as many
    decoded tokens, and the decoded tokens needed to reach GRPO's final sampled accuracy, as a share of GRPO's."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    grpo = {run["seed"]: run for run in by_arm.get("grpo", [])}
    summary = {}
    for arm, arm_runs in by_arm.items():
        row = {"seeds": len(arm_runs)}
        for key in ("greedy", "sampled"):
            gains = [run["curve"][-1][key] - run["curve"][0][key] for run in arm_runs]
            row[f"{key}_before"] = statistics.mean(run["curve"][0][key] for run in arm_runs)
            row[f"{key}_after"] = statistics.mean(run["curve"][-1][key] for run in arm_runs)
            row[f"{key}_gain"], row[f"{key}_gain_se"] = _mean_and_se(gains)
        row["reward_gain"], row["reward_gain_se"] = _mean_and_se([_quarter_gain(run["rewards"]) for run in arm_runs])
        row["decoded_tokens"] = statistics.mean(sum(run["decoded_tokens"]) for run in arm_runs)
        row["leaf_tokens"] = statistics.mean(sum(run["leaf_tokens"]) for run in arm_runs)
        row["wall_s"] = statistics.mean(run["curve"][-1]["wall_s"] for run in arm_runs)
        paired = [(run, grpo[run["seed"]]) for run in arm_runs if run["seed"] in grpo]
        if arm != "grpo" and paired:
            differences, shares = [], []
            for run, base in paired:
                final = run["curve"][-1]
                grpo_then = _accuracy_at(base["curve"], "sampled", final["decoded_tokens"])
                if grpo_then is not None:
                    differences.append(final["sampled"] - grpo_then)
                reached = _tokens_to_reach(run["curve"], "sampled", base["curve"][-1]["sampled"])
                if reached is not None:
                    shares.append(reached / base["curve"][-1]["decoded_tokens"])
            versus = _mean_and_se(differences) if differences else (None, None)
            row["sampled_vs_grpo_at_equal_tokens"], row["sampled_vs_grpo_at_equal_tokens_se"] = versus
            row["share_of_grpo_tokens_to_its_final"] = statistics.mean(shares) if shares else None
            row["seeds_reaching_grpo_final"], row["paired_seeds"] = len(shares), len(paired)
        summary[arm] = row
    return summary


def plot_curves(runs: list[dict], x_key: str, x_label: str, path, arms=tuple(ARMS)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(ARMS, ("tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red")))
    for axis, key in zip(axes, ("sampled", "greedy")):
        for arm in arms:
            arm_runs = [run for run in runs if run["arm"] == arm]
            for index, run in enumerate(arm_runs):
                xs = [point[x_key] / (1000 if x_key == "decoded_tokens" else 60) for point in run["curve"]]
                axis.plot(xs, [point[key] for point in run["curve"]], color=colors[arm], alpha=0.8, marker=".",
                          label=ARM_LABELS[arm] if index == 0 else None)  # fmt: skip
        axis.set_xlabel(x_label)
        axis.set_ylabel(f"held-out accuracy, {key}")
        axis.set_title(f"{key} (temperature 1)" if key == "sampled" else "greedy", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Same warm model, seeds and prompts; one line per seed", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _gain(value: float, se: float, form: str = ".1%") -> str:
    """A mean gain with its standard error over seeds, or a single seed's gain said as such."""
    return f"{value:+{form}} ± {se:{form}}" if se == se else f"{value:+{form}}, one seed"


def summary_table(summary: dict) -> str:
    lines = [
        "| arm | seeds | sampled accuracy, before → after (gain ± SE) | greedy accuracy, before → after (gain ± SE) "
        "| training reward gain ± SE | decoded tokens | leaf tokens | sampled accuracy − GRPO's at equal decoded tokens "
        "| decoded tokens to reach GRPO's final sampled accuracy, ÷ GRPO's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary.items():
        versus = reach = "—"
        if row.get("sampled_vs_grpo_at_equal_tokens") is not None:
            versus = _gain(row["sampled_vs_grpo_at_equal_tokens"], row["sampled_vs_grpo_at_equal_tokens_se"])
        if "paired_seeds" in row:
            reached = f"{row['seeds_reaching_grpo_final']}/{row['paired_seeds']} seeds reach it"
            share = row["share_of_grpo_tokens_to_its_final"]
            reach = f"{share:.2f} ({reached})" if share is not None else reached
        lines.append(
            f"| {ARM_LABELS[arm]} | {row['seeds']} | {row['sampled_before']:.1%} → {row['sampled_after']:.1%} "
            f"({_gain(row['sampled_gain'], row['sampled_gain_se'])}) | {row['greedy_before']:.1%} → "
            f"{row['greedy_after']:.1%} ({_gain(row['greedy_gain'], row['greedy_gain_se'])}) | "
            f"{_gain(row['reward_gain'], row['reward_gain_se'], '.3f')} | {row['decoded_tokens']:,.0f} | "
            f"{row['leaf_tokens']:,.0f} | {versus} | {reach} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trl_treepo.learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--output_dir", default="outputs/learning")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arm_seeds", action="append", default=[], metavar="ARM=SEEDS",
                        help="other seeds for one arm, e.g. random_initial_divergence=0 when fewer runs fit the time "
                        "(a run takes about 7 minutes on 2 cores); repeatable")  # fmt: skip
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, among: {', '.join(ARMS)}")
    parser.add_argument("--max_steps", type=int, default=RL["max_steps"])
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every this many steps")
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help="where warm models are built once")
    parser.add_argument("--warmup_steps", type=int, default=WARMUP["steps"], help="SFT warm-up steps")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # ARM:SEED, one run in this process
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    if args.run:
        arm, seed = args.run.split(":")
        result = run_arm(arm, int(seed), output / f"{arm}-{seed}", args.max_steps, args.cache_dir, args.eval_every,
                         args.backend, args.warmup_steps)  # fmt: skip
        (output / f"{arm}-{seed}.json").write_text(json.dumps(result))
        return result

    arms = [arm.strip() for arm in args.arms.split(",")]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"Unknown arms {sorted(unknown)}; choose among {', '.join(ARMS)}.")
    seeds = {arm: [int(s) for s in args.seeds.split(",")] for arm in arms}
    for choice in args.arm_seeds:
        arm, _, arm_seeds = choice.partition("=")
        if arm not in seeds or not arm_seeds:
            raise SystemExit(f"--arm_seeds {choice!r}: give ARM=SEEDS for an arm among {', '.join(arms)}.")
        seeds[arm] = [int(s) for s in arm_seeds.split(",")]
    for seed in sorted({seed for arm_seeds in seeds.values() for seed in arm_seeds}):
        warm_model(args.cache_dir, seed, args.warmup_steps)  # once per seed, before the arms share it
    runs = []
    # Arm by arm, so that an interrupted study already holds every seed of the first arms; a run whose result is in
    # `output_dir` is not run again, so rerunning the command resumes the study.
    for arm in arms:
        for seed in seeds[arm]:
            result = output / f"{arm}-{seed}.json"
            started = time.perf_counter()
            if not result.exists():
                command = [sys.executable, "-m", "trl_treepo.learning", "--output_dir", str(output), "--run",
                           f"{arm}:{seed}", "--max_steps", str(args.max_steps), "--eval_every", str(args.eval_every),
                           "--backend", args.backend, "--cache_dir", args.cache_dir, "--warmup_steps",
                           str(args.warmup_steps)]  # fmt: skip
                finished = subprocess.run(command, capture_output=True, text=True)
                if finished.returncode != 0:
                    raise RuntimeError(f"The {arm} run (seed {seed}) failed:\n{finished.stderr[-3000:]}")
            run = json.loads(result.read_text())
            if run["curve"][-1]["step"] != args.max_steps:
                raise SystemExit(f"{result} holds a run of {run['curve'][-1]['step']} steps, not {args.max_steps}: "
                                 "remove it, or pass another --output_dir.")  # fmt: skip
            runs.append(run)
            first, last = run["curve"][0], run["curve"][-1]
            print(f"seed {seed} {arm}: sampled {first['sampled']:.1%} -> {last['sampled']:.1%}, greedy "
                  f"{first['greedy']:.1%} -> {last['greedy']:.1%}, decoded {sum(run['decoded_tokens']):,.0f} tokens "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    summary = summarize(runs)
    report = {"setting": {"task": TASK, "task_config": TASK_CONFIG, "warmup": {**WARMUP, "steps": args.warmup_steps},
                          "held_out": HELD_OUT, "rl": RL, "seeds": seeds,
                          "max_steps": args.max_steps, "backend": args.backend}, "summary": summary, "runs": runs}  # fmt: skip
    (output / "study.json").write_text(json.dumps(report, indent=1))
    plot_curves(runs, "decoded_tokens", "cumulative decoded tokens (thousands)", output / "accuracy-vs-decoded-tokens.png")
    # Wall time answers the A/B's question only: ablation runs are often fitted around other jobs on the machine.
    plot_curves(runs, "wall_s", "training wall time (minutes, evaluation excluded)", output / "accuracy-vs-wall-time.png",
                arms=("treepo", "grpo"))  # fmt: skip
    (output / "summary.md").write_text(summary_table(summary) + "\n")
    print(summary_table(summary), flush=True)
    return report


if __name__ == "__main__":
    main()
