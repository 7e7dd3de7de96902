"""Tree vs sequential rollouts on one engine: `python -m trl_treepo.benchmark`.

For one model and one set of prompts, the same engine samples (a) GRPO's sequential rollouts: `width` independent
completions per prompt of up to `segment_length × depth` tokens, and (b) TreePO's tree rollout with the same number
of leaves, the same length limit and the same sampling parameters. Runs alternate after a warm-up; medians are
reported per mode with the paper's throughput measures (§4.1): trajectories per second (TrajPS) and leaf tokens per
second (TokenPS), plus the tokens the engine actually decoded.

    speedup              = tree TokenPS / sequential TokenPS
    decoded_token_ratio  = tree decoded tokens / sequential decoded tokens
    efficiency           = speedup × decoded_token_ratio
    decode_rate_ratio    = tree decoded tokens per second / sequential decoded tokens per second

A tree can at best save what it does not decode, so `efficiency` near 1 means the per-level overhead is paid for.
Tree leaves run longer than independent samples (budget transfer hands a stopped path's branches to its surviving,
longer siblings), which lifts TokenPS; `decode_rate_ratio` is the engine-side measure free of that effect.
`--json` prints one JSON object on the last line. `--sweep-depths` varies depth at a fixed token budget (the paper's
depth × segment study) and `--plot` draws TokenPS against it. `--train` compares a full TreePOTrainer step with a
GRPOTrainer step at equal leaves, and a TreePOTrainer step with `tree_packed_training` (each shared prefix forwarded
once) against one without: step time, loss forward + backward time, and peak memory (CUDA allocations on a GPU, the
process's peak RSS on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .sampling import SegmentRequest, TreeSamplingParams
from .tree import grow_trees

DEFAULT_MODEL_DIR = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo")) / "bench-model"


@dataclass
class RunResult:
    wall_s: float
    trajectories: int
    leaf_tokens: int
    decoded_tokens: int
    engine_calls: int
    requests: int
    early_stop_ratio: float  # leaves that ended before the length limit

    @property
    def trajectories_per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def leaf_tokens_per_s(self) -> float:
        return self.leaf_tokens / self.wall_s


def _trim(ids: Sequence[int], eos_token_ids: frozenset[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return list(ids[: position + 1])
    return list(ids)


def run_sequential(engine, prompts, params: TreeSamplingParams) -> RunResult:
    """GRPO's sampling: `width` independent completions per prompt, one engine call."""
    eos = frozenset(params.eos_token_ids)
    started = time.perf_counter()
    outputs = engine.generate(
        [SegmentRequest(list(prompt), params.width, params.max_response_length) for prompt in prompts]
    )
    wall = time.perf_counter() - started
    completions = [_trim(o.token_ids, eos) for branches in outputs for o in branches]
    return RunResult(
        wall_s=wall,
        trajectories=len(completions),
        leaf_tokens=sum(len(c) for c in completions),
        decoded_tokens=sum(len(o.token_ids) for branches in outputs for o in branches),
        engine_calls=1,
        requests=len(prompts),
        early_stop_ratio=sum(len(c) < params.max_response_length for c in completions) / len(completions),
    )


def run_tree(engine, prompts, params: TreeSamplingParams, decode) -> RunResult:
    started = time.perf_counter()
    rollout = grow_trees(engine, prompts, params, decode)
    wall = time.perf_counter() - started
    leaves = rollout.flat_leaves()
    return RunResult(
        wall_s=wall,
        trajectories=len(leaves),
        leaf_tokens=rollout.stats.leaf_tokens,
        decoded_tokens=rollout.stats.decoded_tokens,
        engine_calls=rollout.stats.engine_calls,
        requests=rollout.stats.requests,
        early_stop_ratio=sum(len(leaf.token_ids) < params.max_response_length for leaf in leaves) / len(leaves),
    )


def _median_result(runs: list[RunResult]) -> dict:
    median = {field: statistics.median(getattr(r, field) for r in runs) for field in asdict(runs[0])}
    median["trajectories_per_s"] = statistics.median(r.trajectories_per_s for r in runs)
    median["leaf_tokens_per_s"] = statistics.median(r.leaf_tokens_per_s for r in runs)
    median["runs"] = len(runs)
    return median


# ------------------------------------------------------------------------------------------------------ engines


class _Backend:
    """Builds a fresh engine per run, so no run inherits another's cache."""

    def __init__(self, args, eos_token_ids, pad_token_id):
        self.args = args
        if args.backend == "vllm":
            from vllm import LLM
            from vllm.platforms import current_platform

            block_size = args.block_size
            if block_size is None and current_platform.is_cpu():
                block_size = 32  # vLLM-CPU's default 128-token blocks share little of a short tree
            self.llm = LLM(
                model=args.model,
                dtype=args.dtype,
                enable_prefix_caching=True,
                block_size=block_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_model_len,
                enforce_eager=args.enforce_eager,
                seed=args.seed,
            )
            self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        else:
            import torch
            from transformers import AutoModelForCausalLM, GenerationConfig

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
            self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
            self.generation_config = GenerationConfig(
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=list(eos_token_ids),
                pad_token_id=pad_token_id,
            )
            self.pad_token_id = pad_token_id
            self.block_size = None

    def engine(self, reuse_kv_cache: bool = True):
        if self.args.backend == "vllm":
            from .backends.vllm import VLLMColocateEngine

            self.llm.reset_prefix_cache()  # runs start cold: no run reuses another's prefixes
            return VLLMColocateEngine(self.llm, {"temperature": self.args.temperature})
        from .backends.transformers import TransformersSegmentEngine

        return TransformersSegmentEngine(
            self.model, self.generation_config, self.pad_token_id, reuse_kv_cache=reuse_kv_cache
        )

    def seed(self, value: int):
        import torch

        torch.manual_seed(value)


def load_prompts(args, tokenizer) -> list[list[int]]:
    if args.dataset:
        from datasets import load_dataset, load_from_disk

        dataset = load_from_disk(args.dataset) if Path(args.dataset).is_dir() else load_dataset(args.dataset, split="train")
        rows = dataset.select(range(min(args.prompts, len(dataset))))
    else:
        from .testing import make_math_dataset

        rows = make_math_dataset(args.task, size=args.prompts, seed=args.seed + 1000)
    prompts = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompts.append(tokenizer(prompt)["input_ids"])
        else:
            prompts.append(
                tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
    return prompts


def sampling_params(args, eos_token_ids, depth: int, segment_length: int) -> TreeSamplingParams:
    return TreeSamplingParams(
        width=args.width,
        segment_length=segment_length,
        max_depth=depth,
        branching_factor=args.branching,
        initial_divergence=args.initial_divergence,
        eos_token_ids=tuple(eos_token_ids),
        seed=args.seed,
    )


def compare(backend: _Backend, prompts, params, decode, args) -> dict:
    """Warm up both modes, then alternate sequential and tree runs; medians per mode and their ratios."""
    results = {"sequential": [], "tree": []}
    for repeat in range(args.warmup + args.repeats):
        for mode in ("sequential", "tree"):
            backend.seed(args.seed + repeat)
            engine = backend.engine(reuse_kv_cache=not args.no_kv_reuse)
            run = run_sequential(engine, prompts, params) if mode == "sequential" else run_tree(engine, prompts, params, decode)
            if repeat >= args.warmup:
                results[mode].append(run)
    sequential, tree = _median_result(results["sequential"]), _median_result(results["tree"])
    speedup = tree["leaf_tokens_per_s"] / sequential["leaf_tokens_per_s"]
    decoded_ratio = tree["decoded_tokens"] / sequential["decoded_tokens"]
    decode_rate = [statistics.median(r.decoded_tokens / r.wall_s for r in results[m]) for m in ("sequential", "tree")]
    return {
        "sequential": sequential,
        "tree": tree,
        "speedup": speedup,
        "trajectory_speedup": tree["trajectories_per_s"] / sequential["trajectories_per_s"],
        "decoded_token_ratio": decoded_ratio,
        "efficiency": speedup * decoded_ratio,
        "decode_rate_ratio": decode_rate[1] / decode_rate[0],
    }


# ------------------------------------------------------------------------------------------------ training step


def _train_worker(args) -> dict:
    """One trainer's step times, in its own process (each trainer builds its own vLLM engine)."""
    import tempfile

    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from . import TreePOConfig, TreePOTrainer
    from .testing import make_math_dataset

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started, self.loss_times = [], None, []

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()
            self.loss_times.append(0.0)

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    def timed(function, timer):
        """Adds the time of each call to the current step's loss time (forward + backward of the loss)."""

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                timer.loss_times[-1] += time.perf_counter() - started

        return wrapper

    def length_reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 13) for c in completions]

    steps = args.warmup + args.repeats
    dataset = make_math_dataset(args.task, size=args.prompts * steps, seed=args.seed)
    common = dict(
        use_cpu=args.device_is_cpu,
        bf16=not args.device_is_cpu,
        per_device_train_batch_size=args.prompts * args.width,
        num_generations=args.width,
        max_steps=steps,
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
    with tempfile.TemporaryDirectory() as out:
        if args.train_worker == "grpo":
            config = GRPOConfig(out, max_completion_length=args.segment_length * args.depth, **common)
            trainer = GRPOTrainer(args.model, length_reward, args=config, train_dataset=dataset)
            if config.use_vllm:
                from .backends.vllm import engine_runs_on_cpu, sync_weights_by_reload

                if engine_runs_on_cpu():  # TRL's own sync cannot load into vLLM-CPU (see docs/vllm.md)
                    trainer.vllm_generation.sync_weights = lambda: sync_weights_by_reload(trainer.vllm_generation)
        else:
            config = TreePOConfig(
                out,
                tree_segment_length=args.segment_length,
                tree_max_depth=args.depth,
                tree_branching_factor=args.branching,
                tree_initial_divergence=args.initial_divergence,
                tree_packed_training=args.train_worker == "treepo-packed",
                **common,
            )
            trainer = TreePOTrainer(args.model, length_reward, args=config, train_dataset=dataset)
        timer = StepTimes()
        trainer.add_callback(timer)
        trainer.compute_loss = timed(trainer.compute_loss, timer)
        trainer.accelerator.backward = timed(trainer.accelerator.backward, timer)
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
    import subprocess

    results = {}
    for name in ("grpo", "treepo", "treepo-packed"):
        command = [sys.executable, "-m", "trl_treepo.benchmark", *argv, "--train-worker", name, "--json"]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"The {name} training run failed:\n{finished.stderr[-3000:]}")
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])
    results["step_speedup"] = results["grpo"]["step_s"] / results["treepo"]["step_s"]
    results["packed_loss_speedup"] = results["treepo"]["loss_s"] / results["treepo-packed"]["loss_s"]
    results["packed_step_speedup"] = results["treepo"]["step_s"] / results["treepo-packed"]["step_s"]
    return results


# ---------------------------------------------------------------------------------------------------------- cli


def _table(report: dict) -> str:
    rows = [
        ("wall time (s)", "wall_s", "{:.2f}"),
        ("trajectories", "trajectories", "{:.0f}"),
        ("leaf tokens", "leaf_tokens", "{:.0f}"),
        ("decoded tokens", "decoded_tokens", "{:.0f}"),
        ("engine calls", "engine_calls", "{:.0f}"),
        ("requests", "requests", "{:.0f}"),
        ("early-stopped leaves", "early_stop_ratio", "{:.0%}"),
        ("TrajPS", "trajectories_per_s", "{:.2f}"),
        ("TokenPS", "leaf_tokens_per_s", "{:.1f}"),
    ]
    lines = [f"{'':24}{'sequential':>14}{'tree':>14}"]
    for label, key, fmt in rows:
        lines.append(f"{label:24}{fmt.format(report['sequential'][key]):>14}{fmt.format(report['tree'][key]):>14}")
    lines.append(
        f"speedup (TokenPS) {report['speedup']:.2f}x   TrajPS {report['trajectory_speedup']:.2f}x   "
        f"decoded-token ratio {report['decoded_token_ratio']:.3f}   efficiency {report['efficiency']:.2f}   "
        f"decode-rate ratio {report['decode_rate_ratio']:.2f}"
    )
    return "\n".join(lines)


def _plot(sweep: list[dict], sequential_tokens_per_s: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['depth']}×{p['segment_length']}" for p in sweep]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(labels, [p["tree"]["leaf_tokens_per_s"] for p in sweep], marker="o", label="tree (TreePO)")
    axis.axhline(sequential_tokens_per_s, color="grey", linestyle="--", label="sequential (GRPO)")
    axis.set_xlabel("depth × segment length (fixed token budget)")
    axis.set_ylabel("TokenPS (leaf tokens / s)")
    axis.set_ylim(bottom=0)
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_treepo.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help=f"model path or id (default: the warmed-up tiny model in {DEFAULT_MODEL_DIR})")
    parser.add_argument("--task", default="gsm_symbolic", help="reasoning-gym task for prompts")
    parser.add_argument("--dataset", help="a dataset name or saved directory with a `prompt` column, instead of --task")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="leaves per prompt (num_generations); paper: 16")
    parser.add_argument("--segment-length", type=int, default=32, help="paper: 512")
    parser.add_argument("--depth", type=int, default=8, help="paper: 14")
    parser.add_argument("--branching", type=int, default=2, help="paper: 2")
    parser.add_argument("--initial-divergence", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--no-kv-reuse", action="store_true", help="transformers: re-read prefixes at every level")
    parser.add_argument("--block-size", type=int, help="vLLM KV block size (default: 32 on CPU, engine default else)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sweep-depths", help="comma-separated depths at a fixed budget of segment-length × depth")
    parser.add_argument("--plot", help="PNG path for the TokenPS-vs-depth plot of --sweep-depths")
    parser.add_argument("--train", action="store_true", help="also compare a TreePOTrainer step with a GRPOTrainer step")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--train-worker", choices=["grpo", "treepo", "treepo-packed"], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from transformers import AutoTokenizer

    if args.model is None:
        from .testing import make_warm_model

        args.model = make_warm_model(DEFAULT_MODEL_DIR)
        argv += ["--model", args.model]
    args.device_is_cpu = not torch.cuda.is_available()
    if args.train_worker:
        result = _train_worker(args)
        print(json.dumps(result))
        return result
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eos_token_ids = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        eos_token_ids.append(tokenizer.pad_token_id)
    prompts = load_prompts(args, tokenizer)
    backend = _Backend(args, eos_token_ids, tokenizer.pad_token_id)
    params = sampling_params(args, eos_token_ids, args.depth, args.segment_length)

    report = compare(backend, prompts, params, tokenizer.decode, args)
    report["setup"] = {
        "backend": args.backend,
        "model": str(args.model),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "prompts": len(prompts),
        "width": args.width,
        "segment_length": args.segment_length,
        "depth": args.depth,
        "branching": args.branching,
        "temperature": args.temperature,
        "kv_reuse": args.backend == "vllm" or not args.no_kv_reuse,
        "block_size": backend.block_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    print(_table(report), flush=True)

    if args.sweep_depths:
        budget = args.segment_length * args.depth
        sweep = []
        for depth in (int(d) for d in args.sweep_depths.split(",")):
            if budget % depth:
                raise SystemExit(f"--sweep-depths: {depth} does not divide the token budget {budget}.")
            point = compare(backend, prompts, sampling_params(args, eos_token_ids, depth, budget // depth), tokenizer.decode, args)
            sweep.append({"depth": depth, "segment_length": budget // depth, **point})
            print(f"depth {depth:3d} × {budget // depth:4d}: speedup {point['speedup']:.2f}x, "
                  f"decoded-token ratio {point['decoded_token_ratio']:.3f}", flush=True)
        report["sweep"] = sweep
        if args.plot:
            sequential = statistics.median(p["sequential"]["leaf_tokens_per_s"] for p in sweep)
            _plot(sweep, sequential, args.plot, f"{args.backend}, {report['setup']['device']}, width {args.width}")

    if args.train:
        del backend  # free the rollout engine before the trainers build theirs
        report["train"] = compare_training_steps([a for a in argv if a not in ("--train", "--json")])
        train = report["train"]
        print(f"training step: GRPO {train['grpo']['step_s']:.2f} s, "
              f"TreePO {train['treepo']['step_s']:.2f} s ({train['step_speedup']:.2f}x), "
              f"TreePO packed {train['treepo-packed']['step_s']:.2f} s", flush=True)
        print(f"loss forward+backward: TreePO {train['treepo']['loss_s']:.2f} s, packed "
              f"{train['treepo-packed']['loss_s']:.2f} s ({train['packed_loss_speedup']:.2f}x; packed/leaf tokens "
              f"{train['treepo-packed']['packed_token_ratio']:.2f}); peak memory "
              f"{train['treepo']['peak_memory_mb']:.0f} → {train['treepo-packed']['peak_memory_mb']:.0f} MB",
              flush=True)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
