"""What a TreePO run reports: `tree/*` metrics, pictures of rollout trees, and the model card's TreePO section.

TRL hooks served: the end of `_generate_and_score_completions` (metrics beside TRL's own, in `_metrics["train"]`; a
tree picture where TRL logs completions) and `create_model_card`.
"""

from __future__ import annotations

import os
import re

import torch

from ..config import configuration_card
from ..tree import FinishReason
from ..visualize import render_tree_html


class TreeTelemetry:
    """Reports each tree batch of `trainer`: its metrics every step, its first tree where TRL logs completions."""

    def __init__(self, trainer):
        self.trainer = trainer

    def draws_tree_this_step(self) -> bool:
        """A tree picture goes with TRL's completion logging: `log_completions`, main process, logging steps."""
        trainer = self.trainer
        # `state.logging_steps` is the Trainer's own resolution of `logging_steps` (a ratio becomes a step count).
        logs_this_step = trainer.state.global_step % trainer.state.logging_steps == 0
        return trainer.args.log_completions and trainer.accelerator.is_main_process and logs_this_step

    def log_tree_metrics(self, batch, paths: list[tuple]) -> None:
        """`tree/*` metrics over the whole batch: the engine's work, and the shape of the trees."""
        trainer = self.trainer
        stats = batch.stats
        leaves = [leaf for leaf in batch.leaves if leaf is not None]
        reasons = [sum(leaf.finish_reason is reason for leaf in leaves) for reason in FinishReason]
        local = torch.tensor(
            [
                stats.decoded_tokens,
                stats.leaf_tokens,
                stats.engine_calls,
                stats.engine_steps,
                stats.fallback_events,
                sum(leaf.from_fallback for leaf in leaves),
                len(leaves),
                sum(leaf.depth for leaf in leaves),
                max((leaf.depth for leaf in leaves), default=0),
                *reasons,
                stats.tool_calls,
                stats.sequential_tool_calls,
                stats.tool_failures,
                stats.tool_replays,
            ],
            dtype=torch.float64,
            device=trainer.accelerator.device,
        )
        per_process = trainer.accelerator.gather(local.unsqueeze(0))
        totals = per_process.sum(dim=0).tolist()
        decoded, leaf_tokens, _, _, fallbacks, fallback_leaves, num_leaves, depth_sum = totals[:8]
        metrics = trainer._metrics["train"]
        metrics["tree/decoded_tokens"].append(decoded)
        metrics["tree/leaf_tokens"].append(leaf_tokens)
        metrics["tree/decoded_token_ratio"].append(decoded / max(leaf_tokens, 1))
        metrics["tree/engine_calls"].append(per_process[:, 2].max().item())
        engine_steps = per_process[:, 3].max().item()
        if engine_steps:  # the engine counts its decoding steps (vLLM colocate, transformers; not a server)
            # With the decoded tokens, what the engine's time goes by: steps (a fixed cost each) and tokens.
            metrics["tree/engine_steps"].append(engine_steps)
        metrics["tree/fallback_events"].append(fallbacks)
        metrics["tree/fallback_leaf_ratio"].append(fallback_leaves / max(num_leaves, 1))
        metrics["tree/mean_depth"].append(depth_sum / max(num_leaves, 1))
        metrics["tree/max_depth"].append(per_process[:, 8].max().item())
        metrics["tree/mean_branching"].append(_mean_branching(paths))
        for reason, count in zip(FinishReason, totals[9:]):
            if reason is not FinishReason.TOOL_LIMIT or trainer.tools:
                metrics[f"tree/finish_reason/{reason.value}"].append(count / max(num_leaves, 1))
        if trainer.tools:
            # The saving: tool calls run once per tree node, against once per leaf in sequential rollouts of the same
            # trajectories.
            tool_calls, sequential_calls, tool_failures, replays = totals[9 + len(FinishReason) :]
            metrics["tree/tool_calls"].append(tool_calls)
            metrics["tree/sequential_tool_calls"].append(sequential_calls)
            metrics["tree/tool_call_ratio"].append(tool_calls / sequential_calls if sequential_calls else 1.0)
            metrics["tree/tool_failures"].append(tool_failures)
            if trainer.args.tree_environment_branching == "replay":
                metrics["tree/tool_replays"].append(replays)

    def write_tree_picture(self, batch, output: dict, rewards: torch.Tensor) -> None:
        """The main process's first tree of this step, with rewards (every process's summed row rewards) and
        advantages, as `trees/step-<N>.html`.

        Alongside TRL's completion logging (`log_completions=True`), for looking at what the rollout did.
        """
        trainer = self.trainer
        width = trainer.num_generations
        rows = [row for row in range(min(width, len(batch.leaves))) if not batch.padded[row]]
        leaves = [batch.leaves[row] for row in rows]
        if not leaves or any(leaf is None for leaf in leaves):
            return
        row_rewards = rewards[rows].cpu()
        advantages = output["advantages"][rows].float().cpu()
        if advantages.dim() == 2:  # per token: show each leaf's mean over its tokens
            mask = output["completion_mask"][rows].float().cpu()
            advantages = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        prompt_ids = output["prompt_ids"][rows[0]][output["prompt_mask"][rows[0]].bool()].tolist()
        step = trainer.state.global_step + 1
        page = render_tree_html(
            leaves,
            trainer.args.tree_segment_length,
            trainer._tokenizer.decode,
            row_rewards.tolist(),
            advantages.tolist(),
            title=f"Step {step}: one TreePO rollout tree",
            prompt_text=trainer._tokenizer.decode(prompt_ids),
        )
        folder = os.path.join(trainer.args.output_dir, "trees")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step-{step:06d}.html"), "w") as handle:
            handle.write(page)


def _mean_branching(paths: list[tuple]) -> float:
    """Children per internal node, over every tree of the batch (padding rows excluded)."""
    children: dict[tuple, set] = {}
    for path in paths:
        if path[0][0] != "pad":
            for depth in range(1, len(path)):
                children.setdefault(path[:depth], set()).add(path[depth])
    return sum(len(kids) for kids in children.values()) / max(len(children), 1)


def add_treepo_section(card_path: str, args, model_id: str) -> None:
    """TRL's model card at `card_path`, with the run's TreePO configuration and without TRL's links to a "None" base
    model (TRL names the base model only when it comes from the Hub)."""
    with open(card_path, encoding="utf-8") as card:
        text = card.read()
    text = re.sub(
        r"This model is a fine-tuned version of \[None\]\(https://huggingface\.co/None\)( on the .*? dataset)?\.\n",
        lambda match: f"This model was trained{match.group(1)}.\n" if match.group(1) else "",
        text,
    )
    text = text.replace('model="None"', f'model="{model_id}"')
    section = (
        "### TreePO configuration\n\nEach prompt grew a tree of segments whose leaves are its completions "
        "([TreePO](https://huggingface.co/papers/2508.17445), trained with the `trl-treepo` package):\n\n"
        f"{configuration_card(args)}\n\n"
    )
    marker = "### Framework versions"
    text = text.replace(marker, section + marker) if marker in text else text + "\n" + section
    with open(card_path, "w", encoding="utf-8") as card:
        card.write(text)
