"""Learning you can see, and TreePO against TRL's GRPO on it: `python -m trl_treepo.learning` (docs/learning.md).

- `settings.py`: a setting (task, tiny model and warm-up, held-out set, RL run, arms) and the named presets;
- `evaluation.py`: a model's completions of problems, and held-out accuracy, greedy and sampled, with standard
  errors clustered by problem;
- `runs.py`: one arm on one seed, with its held-out curve against decoded tokens and wall time;
- `study.py`: gains over seeds, time-to-accuracy against GRPO, the verdict, tables and plots;
- `cli.py`: the command line, one process per run, resumable.

Long runs belong here, never to `make test`.
"""

from .cli import main
from .evaluation import clustered_mean_and_se, completions, difference_se, held_out_accuracy
from .runs import (
    held_out_problems,
    rl_config,
    rl_dataset,
    run_arm,
    task_of,
    vllm_in_policy_precision,
    warm_model,
)
from .settings import ARM_LABELS, ARMS, PRESETS, Setting
from .study import cost_to_reach, mean_curve, summarize, summary_table, verdict

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "PRESETS",
    "Setting",
    "clustered_mean_and_se",
    "completions",
    "cost_to_reach",
    "difference_se",
    "held_out_accuracy",
    "held_out_problems",
    "main",
    "mean_curve",
    "rl_config",
    "rl_dataset",
    "run_arm",
    "summarize",
    "summary_table",
    "task_of",
    "verdict",
    "vllm_in_policy_precision",
    "warm_model",
]
