"""The SFT warm-up that turns a random-init tiny model into a policy that answers (and stops) like a real one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .models import _SENTINEL, make_tiny_model
from .tasks import make_math_dataset
from .tools import tool_sft_dataset

def make_warm_model(
    output_dir: str | os.PathLike,
    task: str = "gsm_symbolic",
    *,
    base_model: str | None = None,
    examples: int = 1600,
    steps: int = 200,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    task_config: dict | None = None,
    warm: str = "worked-steps",
    sft_dataset=None,
) -> str:
    """A tiny model SFT-warmed on reasoning-gym worked answers, so that it writes `\\boxed{}` answers and stops.

    A random-init model never samples EOS, so its trees never stop early; after this warm-up, completions end
    with an answer and EOS at varied lengths, like a real policy's. With `warm="tool-calls"`, it learns instead to
    solve `make_tool_dataset` problems through `calculate` tool calls (`tool_transcript`), for multi-turn rollouts
    (`task` is then unused). `sft_dataset` (prompt/completion rows) replaces the task's worked answers, for example
    problems chosen to leave a held-out set out. Built offline from `make_tiny_model` (or `base_model`); a directory
    already built with the same arguments is reused.
    """
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    # The base model by its resolved path: the same cache named relatively or absolutely is the same warm model.
    base_path = str(Path(base_model).resolve()) if base_model and Path(base_model).exists() else base_model
    spec = {"task": task, "base_model": base_path, "examples": examples, "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "seed": seed, "warm": warm}  # `warm` names the answer format
    if task_config:
        spec["task_config"] = task_config
    if sft_dataset is not None:
        spec["sft_dataset"] = hashlib.sha256(json.dumps(sft_dataset.to_list(), sort_keys=True).encode()).hexdigest()
    spec = json.loads(json.dumps(spec))  # as the sentinel reads back: a tuple in `task_config` becomes a list
    sentinel = output_dir / _SENTINEL
    if sentinel.exists() and json.loads(sentinel.read_text()) == spec:
        return str(output_dir)
    base = base_model or make_tiny_model(output_dir.parent / f"{output_dir.name}-base", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if sft_dataset is not None:
        dataset = sft_dataset
    elif warm == "tool-calls":
        dataset = tool_sft_dataset(tokenizer, examples, seed + 123, task_config)
    elif warm == "worked-steps":
        dataset = make_math_dataset(task, size=examples, seed=seed + 123, with_solution=True, **(task_config or {}))
    else:
        raise ValueError(f"Unknown warm-up {warm!r}: choose 'worked-steps' or 'tool-calls'.")
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=min(10, steps // 10),
            logging_steps=max(steps // 5, 1),
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
            max_length=512,
            seed=seed,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        output_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    sentinel.write_text(json.dumps(spec))
    return str(output_dir)
