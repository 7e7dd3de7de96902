"""One RL run of one arm on one seed: the warm model, the data, the trainer, and the held-out curve it traces.

Every arm of a seed starts from the same warm model and trains on the same prompts; only the arm's options differ.
The held-out curve records, at every evaluation, the accuracies with their standard errors against the decoded
tokens and the training wall time so far (evaluation excluded).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from pathlib import Path

from ..benchmark.training import StepProfile
from .evaluation import held_out_accuracy
from .settings import Setting

DEFAULT_CACHE = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo")) / "learning"


def task_of(setting: Setting):
    from ..testing import ReasoningTask

    return ReasoningTask(setting.task, setting.task_config, conversational=setting.conversational)


def held_out_problems(setting: Setting, task) -> list:
    """The held-out problems: distinct, the same for every seed and arm."""
    return task.problems(setting.held_out["size"], setting.held_out["seed"], unique=True)


def _excluded(held_out: list) -> frozenset:
    return frozenset(entry["question"] for _, entry in held_out)


def warm_model(setting: Setting, seed: int, cache_dir, task=None, held_out=None) -> str:
    """The seed's tiny model after the SFT warm-up on worked answers of problems outside the held-out set (built
    offline once, then reused from `cache_dir`). A setting whose warm-up names a `seed` shares that seed's warm model
    among all its RL seeds."""
    from ..testing import make_tiny_model, make_warm_model

    task = task or task_of(setting)
    held_out = held_out if held_out is not None else held_out_problems(setting, task)
    warmup = dict(setting.warmup)
    seed = warmup.pop("seed", seed)
    key = json.dumps([setting.task, setting.task_config, setting.model, warmup, setting.held_out, seed],
                     sort_keys=True)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    base = make_tiny_model(cache_dir / f"base-{seed}-{digest}", seed=seed, **setting.model)
    unfinished_share = warmup.pop("unfinished_share", 0.0)
    problems = task.problems(warmup["examples"], seed + 123, exclude=_excluded(held_out))
    sft_dataset = task.dataset(problems, with_solution=True, unfinished_share=unfinished_share, seed=seed)
    return make_warm_model(cache_dir / f"warm-{seed}-{digest}", setting.task, base_model=base, seed=seed,
                           sft_dataset=sft_dataset, **warmup)  # fmt: skip


@contextlib.contextmanager
def vllm_in_policy_precision(dtype: str = "float32"):
    """Within the block, the vLLM engine TRL builds (colocate) samples in `dtype`, the policy's precision.

    vLLM's `dtype="auto"` downcasts a float32 checkpoint to bfloat16 (on a CPU, always), and TRL does not pass a
    dtype: TRL's GRPO and TreePO alike then sample from a rounded copy of the float32 policy they train. On the
    study's tiny models the rounded copy is about as accurate (`scripts/vllm_precision.py`: 55.9% against 55.6%
    held-out sampled accuracy for the `chains` warm model), but on a CPU without bfloat16 units it decodes about three
    times slower (a 32-prompt step's engine time, 20.1 s against 6.9 s), and float32 samples are the policy's own.
    """
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)
    if original is None:  # vLLM not installed: nothing to pin
        yield
        return
    vllm_generation.LLM = functools.partial(original, dtype=dtype)
    try:
        yield
    finally:
        vllm_generation.LLM = original


# Under a budget other than steps, an arm may need more steps than GRPO took to spend what GRPO spent: it may run up
# to this many times the setting's `max_steps`.
BUDGET_STEP_CEILING = 3


def max_steps_of(setting: Setting, budget: float | None = None) -> int:
    """The steps a run may take: the setting's `max_steps`, or under a spending budget its ceiling."""
    return setting.rl["max_steps"] * (BUDGET_STEP_CEILING if budget is not None else 1)


def rl_dataset(setting: Setting, seed: int, task, held_out: list):
    """The run's prompts, none of them held out: `max_steps × prompts_per_step` problems, or under a budget other
    than steps as many as its step ceiling needs. Every arm of a study draws the same set (same size, same seed),
    so the arms of a seed see the same prompts in the same order for as long as they run."""
    size = setting.rl["max_steps"] * setting.rl["prompts_per_step"]
    if setting.budget != "steps":
        size *= BUDGET_STEP_CEILING
    return task.dataset(task.problems(size, seed + 1, exclude=_excluded(held_out)))


def rl_config(setting: Setting, arm: str, output_dir, seed: int, backend: str = "vllm", max_steps: int | None = None):
    """The run's `TreePOConfig`: the setting's RL knobs and configuration, then the arm's overrides."""
    from .. import TreePOConfig

    rl = setting.rl
    options = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=rl["prompts_per_step"] * rl["num_generations"],
        num_generations=rl["num_generations"],
        tree_segment_length=rl["segment_length"],
        tree_max_depth=rl["max_depth"],
        max_steps=max_steps or rl["max_steps"],
        learning_rate=rl["learning_rate"],
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_vllm=backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=512 + setting.max_completion_length,
    )
    return TreePOConfig(**{**options, **setting.config, **setting.arms[arm]})


def leaf_tokens(log: dict, setting: Setting) -> float:
    """Completion tokens of a step's rows: what the loss trains on, and what sequential sampling decodes."""
    return log["completions/mean_length"] * setting.rl["prompts_per_step"] * setting.rl["num_generations"]


def decoded_tokens(log: dict, setting: Setting) -> float:
    """Tokens the rollout of a step decoded: the tree's count, or every completion token of sequential sampling."""
    return log["tree/decoded_tokens"] if "tree/decoded_tokens" in log else leaf_tokens(log, setting)


def spent(point_or_log_history, setting: Setting, wall_s: float) -> float:
    """What a run has spent of its budget so far: decoded tokens (summed over its step logs) or wall seconds."""
    if setting.budget == "wall_time":
        return wall_s
    return sum(decoded_tokens(log, setting) for log in point_or_log_history if "reward" in log)


def held_out_curve(trainer, setting: Setting, task, held_out: list, every: int, budget: float | None = None,
                   eval_points: int = 4):  # fmt: skip
    """A callback measuring held-out accuracy at the start and every `every` steps (and after the last), against the
    decoded tokens and the training wall time so far, evaluation excluded.

    With a `budget` (of the setting's kind: decoded tokens or wall seconds), it measures instead at the first step
    that spends past each of `eval_points` even shares of it, and stops training once the whole budget is spent."""
    from transformers import TrainerCallback

    def measure():
        model = trainer.accelerator.unwrap_model(trainer.model)
        spec = setting.held_out
        return held_out_accuracy(model, trainer.processing_class, task, held_out, spec["samples"],
                                 spec["max_new_tokens"], spec["seed"])  # fmt: skip

    class HeldOutCurve(TrainerCallback):
        def __init__(self):
            self.points, self.evaluating, self.started = [], 0.0, time.perf_counter()

        def record(self, state):
            began = time.perf_counter()
            result = measure()
            self.evaluating += time.perf_counter() - began
            logs = [log for log in state.log_history if "reward" in log]
            self.points.append({
                "step": state.global_step,
                "decoded_tokens": sum(decoded_tokens(log, setting) for log in logs),
                "wall_s": time.perf_counter() - self.started - self.evaluating,
                **result,
            })  # fmt: skip

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.record(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Not on_step_end: the step's log, with its decoded tokens, joins log_history only after that.
            if "reward" not in (logs or {}):
                return
            if budget is None:
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    self.record(state)
                return
            so_far = spent(state.log_history, setting, time.perf_counter() - self.started - self.evaluating)
            next_share = len(self.points) / eval_points  # the start was the first point
            if so_far >= budget * next_share - 1e-9 or so_far >= budget:
                self.record(state)
            if so_far >= budget:
                control.should_training_stop = True

    return HeldOutCurve()


def run_arm(setting: Setting, arm: str, seed: int, output_dir, cache_dir, every: int, backend: str = "vllm",
            budget: float | None = None, eval_points: int = 4) -> dict:  # fmt: skip
    """One RL run of `arm` from the seed's warm model, with its held-out curve and per-step logs: `max_steps` steps,
    or with a `budget` (`setting.budget`'s kind) until it has spent it (`held_out_curve`)."""
    from .. import TreePOTrainer

    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    with vllm_in_policy_precision():
        trainer = TreePOTrainer(
            model=warm_model(setting, seed, cache_dir, task, held_out),
            reward_funcs=task.reward(),
            args=rl_config(setting, arm, output_dir, seed, backend, max_steps_of(setting, budget)),
            train_dataset=rl_dataset(setting, seed, task, held_out),
        )
    curve = held_out_curve(trainer, setting, task, held_out, every, budget, eval_points)
    trainer.add_callback(curve)
    profile = StepProfile()  # where each step's time goes, by phase (`benchmark.training.PHASES`)
    trainer.add_callback(profile.callback())
    profile.install(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    spent_at_end = spent(logs, setting, curve.points[-1]["wall_s"])
    return {
        "arm": arm,
        "seed": seed,
        # What the run was to spend (None: the setting's max_steps), and whether it did before its step ceiling.
        "budget": {"kind": setting.budget, "value": budget, "spent": spent_at_end,
                   "reached": budget is None or spent_at_end >= budget},  # fmt: skip
        "curve": curve.points,
        "rewards": [log["reward"] for log in logs],
        "decoded_tokens": [decoded_tokens(log, setting) for log in logs],
        "leaf_tokens": [leaf_tokens(log, setting) for log in logs],
        "step_s": [log.get("step_time") for log in logs],
        "phases": profile.steps,
        "logs": logs,  # the trainer's own per-step metrics: entropy, clip ratios, KL, sampling mismatch, ...
    }
