"""`python -m trl_treepo.learning`: run the study of a setting (a preset, or any reasoning-gym task) and report it.

    python -m trl_treepo.learning --preset chains --seeds 0,1,2,3,4 --arms treepo,grpo
    python -m trl_treepo.learning --task leg_counting --task_config '{"max_animals": 3}' --max_steps 20 \\
        --config '{"tree_branching_factor": 4}' --arm wide='{"tree_initial_divergence": 4}' --arms treepo,wide,grpo

Every run is its own process (one vLLM engine each); a run whose result is already in `--output_dir` is not run again,
so the same command resumes an interrupted study, and a later command adds arms or seeds to it. Writes `study.json`
(setting, every curve and per-step log), `summary.md`, `accuracy-vs-decoded-tokens.png` and
`accuracy-vs-wall-time.png`, over every finished run in `--output_dir`, not only the ones this command asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .runs import DEFAULT_CACHE, held_out_problems, run_arm, task_of, warm_model
from .settings import BUDGETS, PRESETS, SUITES, Setting
from .study import phase_table, plot_curves, summarize, summary_table, verdict

# Command-line flags that override one field of a setting's section: flag → (section, key, type).
FIELD_FLAGS = {
    "vocab_size": ("model", "vocab_size", int),
    "hidden_size": ("model", "hidden_size", int),
    "num_layers": ("model", "num_layers", int),
    "warmup_steps": ("warmup", "steps", int),
    "warmup_examples": ("warmup", "examples", int),
    "warmup_learning_rate": ("warmup", "learning_rate", float),
    "warmup_unfinished_share": ("warmup", "unfinished_share", float),
    "held_out_size": ("held_out", "size", int),
    "held_out_samples": ("held_out", "samples", int),
    "max_new_tokens": ("held_out", "max_new_tokens", int),
    "prompts_per_step": ("rl", "prompts_per_step", int),
    "num_generations": ("rl", "num_generations", int),
    "learning_rate": ("rl", "learning_rate", float),
    "max_steps": ("rl", "max_steps", int),
    "segment_length": ("rl", "segment_length", int),
    "max_depth": ("rl", "max_depth", int),
}


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{flag}: not valid JSON ({error}): {text!r}")
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: give a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_treepo.learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--preset", default="chains", choices=sorted(PRESETS), help="the setting to start from")
    parser.add_argument("--task", help="any reasoning-gym task, instead of the preset's")
    parser.add_argument("--task_config", help="the task's configuration, as a JSON object")
    for flag, (section, key, kind) in FIELD_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help=f"setting {section}.{key}")
    parser.add_argument("--config", help="further TreePOConfig fields for every arm, as a JSON object")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                        help="define an arm (TreePOConfig overrides), e.g. wide='{\"tree_initial_divergence\": 4}'")
    parser.add_argument("--arms", help="comma-separated arms to run (default: treepo,grpo, or the suite's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2,3,4, or the suite's)")
    parser.add_argument("--budget", choices=BUDGETS,
                        help="what every arm spends: 'steps' (max_steps each; the default), 'decoded_tokens' or "
                        "'wall_time' (training time, evaluation excluded): GRPO runs max_steps first on each seed and "
                        "every other arm runs until it has spent what GRPO spent on that seed")  # fmt: skip
    parser.add_argument("--budget_value", type=float,
                        help="the budget itself (decoded tokens or seconds), for every arm GRPO included, instead of "
                        "GRPO's spending")  # fmt: skip
    parser.add_argument("--eval_points", type=int,
                        help="under a budget other than steps: held-out measurements after the start, at even "
                        "shares of the budget (default 4, or the suite's)")  # fmt: skip
    parser.add_argument("--suite", choices=sorted(SUITES),
                        help="run every setting of a suite with its arms, seeds and budget, and write one table "
                        "(suite.md); field flags apply to every setting")  # fmt: skip
    parser.add_argument("--arm_seeds", action="append", default=[], metavar="ARM=SEEDS",
                        help="other seeds for one arm, e.g. random_initial_divergence=0,1,2; repeatable")
    parser.add_argument("--eval_every", type=int, default=5, help="held-out evaluation every this many steps")
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--output_dir", default="outputs/learning")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help="where warm models are built once")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # ARM:SEED, one run in this process
    parser.add_argument("--setting_file", help=argparse.SUPPRESS)  # the resolved setting, for --run
    parser.add_argument("--run_budget", type=float, help=argparse.SUPPRESS)  # the budget of the --run
    return parser


def resolve_setting(args) -> Setting:
    """The preset, with the command line's task, fields, configuration and arms on top; the task is checked."""
    setting = PRESETS[args.preset]
    changes: dict = {}
    # The task and its configuration replace the preset's whole (another task's fields would not fit it).
    task = {}
    if args.task:
        task.update(task=args.task, task_config={}, name=f"{args.task} (from {args.preset})",
                    description=f"reasoning-gym {args.task}")  # fmt: skip
    if args.task_config:
        task["task_config"] = _json_object(args.task_config, "--task_config")
    setting = dataclasses.replace(setting, **task)
    for flag, (section, key, _) in FIELD_FLAGS.items():
        if getattr(args, flag) is not None:
            changes.setdefault(section, {})[key] = getattr(args, flag)
    if args.config:
        changes["config"] = _json_object(args.config, "--config")
    arms = {}
    for definition in args.arm:
        name, _, overrides = definition.partition("=")
        if not name or not overrides:
            raise SystemExit(f"--arm {definition!r}: give NAME=JSON, e.g. wide='{{\"tree_initial_divergence\": 4}}'.")
        arms[name] = _json_object(overrides, f"--arm {name}")
    if arms:
        changes["arms"] = arms
    if args.budget:
        changes["budget"] = args.budget
    setting = setting.with_overrides(**changes)
    try:
        task_of(setting)  # an unknown task or a configuration reasoning-gym rejects: a clear error, before any run
    except ValueError as error:
        raise SystemExit(str(error))
    return setting


def _seeds(args, arms: list[str]) -> dict[str, list[int]]:
    seeds = {arm: [int(s) for s in (args.seeds or "0,1,2,3,4").split(",")] for arm in arms}
    for choice in args.arm_seeds:
        arm, _, arm_seeds = choice.partition("=")
        if arm not in seeds or not arm_seeds:
            raise SystemExit(f"--arm_seeds {choice!r}: give ARM=SEEDS for an arm among {', '.join(arms)}.")
        seeds[arm] = [int(s) for s in arm_seeds.split(",")]
    return seeds


def _run_in_process(args, setting: Setting, output: Path, arm: str, seed: int, budget: float | None = None,
                    every: int | None = None) -> dict:  # fmt: skip
    """The run of `arm` on `seed` (from `output` if it is there): `max_steps` steps, or until it spent `budget`."""
    result = output / f"{arm}-{seed}.json"
    if not result.exists():
        command = [sys.executable, "-m", "trl_treepo.learning", "--output_dir", str(output), "--run", f"{arm}:{seed}",
                   "--setting_file", str(output / "setting.json"), "--eval_every", str(every or args.eval_every),
                   "--eval_points", str(args.eval_points or 4), "--backend", args.backend, "--cache_dir", args.cache_dir,
                   *(["--run_budget", repr(budget)] if budget is not None else [])]  # fmt: skip
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"The {arm} run (seed {seed}) failed:\n{finished.stderr[-3000:]}")
    run = json.loads(result.read_text())
    recorded = run.get("budget", {}).get("value")
    if budget is None and run["curve"][-1]["step"] != setting.rl["max_steps"]:
        raise SystemExit(f"{result} holds a run of {run['curve'][-1]['step']} steps, not {setting.rl['max_steps']}: "
                         "remove it, or pass another --output_dir.")  # fmt: skip
    if budget is not None and (recorded is None or abs(recorded - budget) > 1e-6 * max(budget, 1.0)):
        raise SystemExit(f"{result} holds a run to a budget of {recorded}, not {budget}: remove it, or pass another "
                         "--output_dir.")  # fmt: skip
    if not run.get("budget", {}).get("reached", True):
        print(f"seed {seed} {arm}: did not spend its budget of {budget:,.0f} within its step ceiling "
              f"({run['curve'][-1]['step']} steps); its curve ends short", flush=True)  # fmt: skip
    return run


def _budget_of(grpo_run: dict, setting: Setting) -> float:
    """What GRPO's run spent, in the setting's budget kind: its decoded tokens, or its training wall time."""
    if setting.budget == "wall_time":
        return grpo_run["curve"][-1]["wall_s"]
    return float(sum(grpo_run["decoded_tokens"]))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.run:
        setting = Setting.from_json(Path(args.setting_file).read_text())
        arm, seed = args.run.split(":")
        result = run_arm(setting, arm, int(seed), output / f"{arm}-{seed}", args.cache_dir, args.eval_every,
                         args.backend, args.run_budget, args.eval_points or 4)  # fmt: skip
        (output / f"{arm}-{seed}.json").write_text(json.dumps(result))
        return result

    if args.suite:
        return run_suite(args)
    setting = resolve_setting(args)
    arms = [arm.strip() for arm in (args.arms or "treepo,grpo").split(",")]
    unknown = [arm for arm in arms if arm not in setting.arms]
    if unknown:
        raise SystemExit(f"Unknown arms {unknown}; define them with --arm NAME=JSON, or choose among "
                         f"{', '.join(setting.arms)}.")  # fmt: skip
    recorded = output / "setting.json"
    if recorded.exists() and recorded.read_text() != setting.to_json():
        raise SystemExit(f"{output} holds a study of another setting ({recorded}); pass another --output_dir.")
    seeds = _seeds(args, arms)
    budgets = _budgets(args, setting, arms, seeds, output)
    every = args.eval_every
    # Under a spending budget GRPO's run of a seed sets that seed's budget, so it runs first.
    if setting.budget != "steps":
        every = _grid_step(args, setting)
        arms = sorted(arms, key=lambda arm: arm != "grpo")
    recorded.write_text(setting.to_json())
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    for seed in sorted({seed for arm_seeds in seeds.values() for seed in arm_seeds}):
        warm_model(setting, seed, args.cache_dir, task, held_out)  # once per seed, before the arms share it
    runs = []
    # Arm by arm, so that an interrupted study already holds every seed of the first arms.
    for arm in arms:
        for seed in seeds[arm]:
            started = time.perf_counter()
            budget = budgets(arm, seed)
            run = _run_in_process(args, setting, output, arm, seed, budget, every)
            runs.append(run)
            first, last = run["curve"][0], run["curve"][-1]
            print(f"seed {seed} {arm}: sampled {first['sampled']:.1%} -> {last['sampled']:.1%}, greedy "
                  f"{first['greedy']:.1%} -> {last['greedy']:.1%}, decoded {sum(run['decoded_tokens']):,.0f} tokens "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    earlier = _earlier_runs(output, setting, {(run["arm"], run["seed"]) for run in runs})
    if earlier:
        print(f"The summary also counts the {len(earlier)} other finished runs in {output} (same setting): "
              + ", ".join(f"{run['arm']} seed {run['seed']}" for run in earlier), flush=True)  # fmt: skip
        runs += earlier
        for run in earlier:
            seeds.setdefault(run["arm"], []).append(run["seed"])
    return report(setting, seeds, runs, output, args.backend)


def _grid_step(args, setting: Setting) -> int:
    """GRPO's evaluation step when it sets the budget: `max_steps` split into `eval_points` even shares."""
    points = args.eval_points or 4
    if points < 1 or setting.rl["max_steps"] % points:
        raise SystemExit(f"--eval_points {points} must divide max_steps ({setting.rl['max_steps']}) under "
                         f"--budget {setting.budget}, so that GRPO's measurements split its budget evenly.")  # fmt: skip
    return setting.rl["max_steps"] // points


def _budgets(args, setting: Setting, arms: list[str], seeds: dict, output: Path):
    """`budget(arm, seed, output)`: what the run is to spend (None: `max_steps`), checked before any run."""
    if setting.budget == "steps":
        if args.budget_value is not None:
            raise SystemExit("--budget_value needs --budget decoded_tokens or wall_time.")
        return lambda arm, seed: None
    if args.budget_value is not None:
        if args.budget_value <= 0:
            raise SystemExit(f"--budget_value must be positive, got {args.budget_value}.")
        return lambda arm, seed: args.budget_value
    wanted = {seed for arm in arms for seed in seeds[arm]}
    missing = sorted(seed for seed in wanted - set(seeds.get("grpo", [])) if not (output / f"grpo-{seed}.json").exists())
    if missing:
        raise SystemExit(f"--budget {setting.budget} spends what GRPO spent on each seed, but GRPO does not run on "
                         f"seeds {missing}: add grpo to --arms (and its seeds), or give --budget_value.")  # fmt: skip

    def budget(arm: str, seed: int) -> float | None:
        if arm == "grpo":
            return None
        return _budget_of(json.loads((output / f"grpo-{seed}.json").read_text()), setting)

    return budget


def _earlier_runs(output: Path, setting: Setting, asked: set[tuple[str, int]]) -> list[dict]:
    """The finished runs in a study directory that this invocation did not ask for. The directory holds one setting
    (checked against setting.json), so they belong in its summary, which would otherwise drop them on a later call
    with fewer arms or seeds."""
    runs = []
    for path in sorted(output.glob("*-*.json")):
        arm, _, seed = path.stem.rpartition("-")
        if arm in setting.arms and seed.isdigit() and (arm, int(seed)) not in asked:
            runs.append(json.loads(path.read_text()))
    return runs


def report(setting: Setting, seeds: dict, runs: list[dict], output: Path, backend: str) -> dict:
    summary = summarize(runs)
    headline = verdict(summary) if "treepo" in summary and "grpo" in summary else None
    study = {"setting": json.loads(setting.to_json()), "seeds": seeds, "backend": backend, "summary": summary,
             "verdict": headline, "runs": runs}  # fmt: skip
    (output / "study.json").write_text(json.dumps(study, indent=1))
    arms = list(dict.fromkeys(run["arm"] for run in runs))
    plot_curves(runs, "decoded_tokens", "cumulative decoded tokens (thousands)", output / "accuracy-vs-decoded-tokens.png",
                arms)  # fmt: skip
    plot_curves(runs, "wall_s", "training wall time (minutes, evaluation excluded)", output / "accuracy-vs-wall-time.png",
                arms)  # fmt: skip
    table = summary_table(summary) + "\n\n" + phase_table(summary)
    (output / "summary.md").write_text(table + "\n" + (f"\nverdict: {json.dumps(headline)}\n" if headline else ""))
    print(table, flush=True)
    if headline:
        print(f"verdict (TreePO vs GRPO): {json.dumps(headline)}", flush=True)
    return study


def run_suite(args) -> dict:
    """Every setting of `args.suite`, with the suite's arms, seeds and budget unless the command line names its own;
    each setting's study in `output_dir/<setting>`, and one table over them all (`suite.md`, `suite.json`).

    Arms run in rounds across the settings: GRPO and TreePO on every setting first (the verdict), then each further
    arm, so that an interrupted suite holds the comparison that matters most."""
    from .study import suite_table

    suite = SUITES[args.suite]
    arms = args.arms.split(",") if args.arms else list(suite.arms)
    seeds = args.seeds or ",".join(str(seed) for seed in suite.seeds)
    rounds = [[arm for arm in arms if arm in ("grpo", "treepo")]] + [[arm] for arm in arms if arm not in ("grpo", "treepo")]
    output = Path(args.output_dir)
    passed = [f"--{flag}={getattr(args, flag)}" for flag in FIELD_FLAGS if getattr(args, flag) is not None]
    passed += [f"--config={args.config}"] if args.config else []
    passed += [f"--arm={definition}" for definition in args.arm]
    common = ["--seeds", seeds, "--budget", args.budget or suite.budget, "--eval_points",
              str(args.eval_points or suite.eval_points), "--eval_every", str(args.eval_every), "--backend", args.backend,
              "--cache_dir", args.cache_dir, *passed]  # fmt: skip
    if args.budget_value is not None:
        common += ["--budget_value", repr(args.budget_value)]
    studies = {}
    for round_arms in rounds:
        if not round_arms:
            continue
        for name in suite.settings:
            print(f"suite {args.suite}: {name}, arms {','.join(round_arms)}", flush=True)
            studies[name] = main(["--preset", name, "--arms", ",".join(round_arms), "--output_dir", str(output / name),
                                  *common])  # fmt: skip
    table = suite_table(args.suite, suite, {name: study["summary"] for name, study in studies.items()})
    (output / "suite.md").write_text(table + "\n")
    (output / "suite.json").write_text(json.dumps({
        "suite": args.suite, "fixed": suite.fixed, "budget": args.budget or suite.budget, "seeds": seeds,
        "settings": {name: {"setting": study["setting"], "summary": study["summary"], "verdict": study["verdict"]}
                     for name, study in studies.items()},
    }, indent=1))  # fmt: skip
    print(table, flush=True)
    return studies
