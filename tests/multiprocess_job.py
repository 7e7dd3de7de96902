"""A short TreePO run that dumps what each process saw; launched by test_multiprocess.py under `accelerate launch`.

    accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml tests/multiprocess_job.py MODEL OUT

The script's own directory (tests/) is on `sys.path`, so it shares the test helpers.
"""

import json
import sys

import torch
from accelerate import PartialState
from test_trainer import record_batches, reward_length, tiny_args

from trl_treepo import TreePOTrainer
from trl_treepo.testing import make_math_dataset


def main(model: str, output_dir: str) -> None:
    trainer = TreePOTrainer(
        model=model, reward_funcs=reward_length, args=tiny_args(output_dir), train_dataset=make_math_dataset(size=32)
    )
    batches = record_batches(trainer)
    trainer.train()
    steps = [
        dict(
            paths=[repr(path) for path in batch["paths"]],
            local_paths=[repr(path) for path in batch["local_paths"]],
            rewards=batch["rewards_per_func"][:, 0].tolist(),
            prompt_ids=batch["prompt_ids"].tolist(),
            prompt_mask=batch["prompt_mask"].tolist(),
            token_counts=batch["mask"].sum(dim=1).tolist(),
            advantages=batch["advantages"].tolist(),
        )
        for batch in batches
    ]
    state = PartialState()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(f"{output_dir}/rank{state.process_index}.json", "w") as handle:
        json.dump(dict(world_size=state.num_processes, steps=steps, checksum=checksum, logs=logs), handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
