"""A short TreePO run that dumps what each process saw; launched by test_multiprocess.py under `accelerate launch`.

    accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml tests/multiprocess_job.py MODEL OUT
"""

import json
import sys

import torch
from accelerate import PartialState

from trl_treepo import TreePOConfig, TreePOTrainer
from trl_treepo.testing import make_math_dataset


def reward_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]


def main(model: str, output_dir: str) -> None:
    args = TreePOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        tree_segment_length=6,
        tree_max_depth=3,
        max_steps=2,
        learning_rate=0.05,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = TreePOTrainer(model=model, reward_funcs=reward_length, args=args, train_dataset=make_math_dataset(size=32))
    steps = []
    original = trainer._replace_advantages

    def record(output, batch, paths):
        original(output, batch, paths)
        steps.append(
            dict(
                paths=[repr(path) for path in paths],
                local_paths=[repr(path) for path in batch.paths],
                rewards=trainer._rewards_per_func[:, 0].tolist(),
                prompt_ids=[ids.tolist() for ids in output["prompt_ids"]],
                prompt_mask=[mask.tolist() for mask in output["prompt_mask"]],
                token_counts=(output["completion_mask"] * output.get("tool_mask", 1)).sum(dim=1).tolist(),
                advantages=output["advantages"].tolist(),
            )
        )

    trainer._replace_advantages = record
    trainer.train()
    state = PartialState()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(f"{output_dir}/rank{state.process_index}.json", "w") as handle:
        json.dump(dict(world_size=state.num_processes, steps=steps, checksum=checksum, logs=logs), handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
