"""Rewards → the advantages that train (paper §3.3, Eq. 5–7; §3.1 dynamic sampling): the advantage room of
`TreePOTrainer`.

TRL hooks served: `_calculate_rewards` (padding rows become NaN, so no group statistic sees them) and the end of
`_generate_and_score_completions`, where GRPO's group advantages are replaced by the tree estimator's and the rows
that must not train are masked out of the loss. TRL's padding, rewards, old/reference log-probs, importance sampling,
loss and logging stay its own; the estimators themselves are the pure functions of `trl_treepo.advantages`.
"""

from __future__ import annotations

import functools

import torch
from accelerate.utils import gather_object
from trl.trainer.utils import is_async_callable, nanstd

from ..advantages import compute_node_value_advantages, compute_segment_advantages, compute_tree_advantages, whiten


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it."""


def name_failures(func, name: str):
    """`func`, sync or async as it was, re-raising any exception as a `RewardFunctionError` that names it."""

    def failure(error):
        return RewardFunctionError(f"The reward function '{name}' raised {type(error).__name__}: {error}")

    if is_async_callable(func):

        async def wrapped(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error

    else:

        def wrapped(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error

    functools.update_wrapper(wrapped, func if hasattr(func, "__name__") else func.__call__)
    return wrapped


class AdvantageStep:
    """Turns a tree batch's rewards into the advantages and loss mask that train, for `trainer`.

    Reads the trainer's accelerator, arguments, reward weights and metrics; writes into TRL's step output.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.rewards_per_func: torch.Tensor | None = None  # the gathered [rows, functions] matrix of the last batch

    def keep_rewards(self, rewards_per_func: torch.Tensor, padded: list[bool] | None) -> torch.Tensor:
        """Keep TRL's gathered reward matrix, with this process's padding rows (`padded`; None outside a tree batch)
        as NaN. A padding row repeats a leaf of a prompt short of w leaves (fallback "none"). As NaN it stays out of
        every group statistic, TRL's own ("grpo" estimator, logged rewards) included, as if never sampled."""
        if padded is not None:
            padded = self.trainer.accelerator.gather(torch.tensor(padded, device=rewards_per_func.device))
            rewards_per_func = rewards_per_func.masked_fill(padded.unsqueeze(1), torch.nan)
        self.rewards_per_func = rewards_per_func
        return rewards_per_func

    def summed_rewards(self) -> torch.Tensor:
        """One reward per row, combining the reward functions as `multi_objective_aggregation` says; NaN where no
        function scored the row.

        `sum_then_normalize`: the weighted sum, as TRL sums. `normalize_then_sum`: each function is first z-scored
        over the prompt's scored leaves, as TRL does, then weighted and summed; the tree estimator and its
        normalisation then play the part of TRL's final batch z-score.
        """
        trainer, rewards_per_func = self.trainer, self.rewards_per_func
        weights = trainer.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        if trainer.args.multi_objective_aggregation == "normalize_then_sum":
            grouped = rewards_per_func.view(-1, trainer.num_generations, rewards_per_func.size(1))
            standardized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
                nanstd(grouped, dim=1, keepdim=True) + 1e-4
            )
            rewards_per_func = standardized.view_as(rewards_per_func)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return rewards

    def log_truncation(self, output: dict, truncated: torch.Tensor) -> None:
        """TRL's truncation metrics, which `_generate` derived from "the last token is not EOS", from finish reasons."""
        accelerator = self.trainer.accelerator
        policy_mask = output["completion_mask"] * output.get("tool_mask", 1)  # TRL counts tool results out
        lengths = accelerator.gather(policy_mask.sum(dim=1)).float()
        terminated = lengths[~truncated] if not truncated.all() else torch.zeros(1, device=lengths.device)
        metrics = self.trainer._metrics["train"]
        metrics["completions/clipped_ratio"][-1] = truncated.float().mean().item()
        metrics["completions/mean_terminated_length"][-1] = terminated.mean().item()
        metrics["completions/min_terminated_length"][-1] = terminated.min().item()
        metrics["completions/max_terminated_length"][-1] = terminated.max().item()

    def replace_advantages(self, output: dict, batch, paths: list[tuple], truncated: torch.Tensor | None) -> None:
        """Tree advantages for every row, and the loss mask of the rows that do not train.

        `truncated` (every process's rows) is given when `mask_truncated_completions` is on.
        """
        trainer, args = self.trainer, self.trainer.args
        rank, num_local = trainer.accelerator.process_index, output["completion_ids"].size(0)
        process_slice = slice(rank * num_local, (rank + 1) * num_local)
        rewards, keep = self._rewards_that_train(batch, truncated)
        self._mask_rows_that_do_not_train(output, keep, process_slice)
        local_keep = keep[process_slice]
        if args.tree_advantage_estimator == "grpo":
            output["advantages"] = output["advantages"] * local_keep
            logged = list(trainer._logs["advantages"])[-keep.numel() :]
            self._replace_logged_advantages(torch.tensor(logged) * keep.cpu())
        elif args.tree_advantage_estimator == "tree":
            self._tree_advantages(output, rewards.double().cpu(), paths, process_slice)
        else:
            self._segment_advantages(output, batch, rewards.double().cpu(), paths, keep, process_slice)

    # ---------------------------------------------------------------------------------------------------- parts

    def _rewards_that_train(self, batch, truncated: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's row rewards (NaN where unscored or filtered) and which rows train."""
        trainer, args = self.trainer, self.trainer.args
        # Rewards of every row of every process; padding rows are NaN already (`keep_rewards`).
        rewards = self.summed_rewards()
        padded = trainer.accelerator.gather(torch.tensor(batch.padded, device=trainer.accelerator.device))
        # TRL's None means "not scored": such a row joins no group statistic and is masked out of the loss, so it adds
        # neither a KL term nor tokens to the normaliser (GRPOTrainer only zeroes its advantage).
        scored = ~torch.isnan(rewards)
        unscored = (~scored & ~padded).float().sum() / (~padded).float().sum()
        trainer._metrics["train"]["tree/unscored_leaf_ratio"].append(unscored.item())

        # Dynamic sampling (paper §3.1): a prompt whose scored leaves all share one reward teaches nothing.
        if args.tree_filter_zero_std_prompts:
            grouped = rewards.view(-1, trainer.num_generations)
            lowest = torch.nan_to_num(grouped, nan=torch.inf).min(dim=1).values
            highest = torch.nan_to_num(grouped, nan=-torch.inf).max(dim=1).values
            informative = highest > lowest
            trainer._metrics["train"]["tree/filtered_prompt_ratio"].append(1.0 - informative.float().mean().item())
            scored &= informative.repeat_interleave(trainer.num_generations)
        # Truncated leaves still count in their groups' statistics, as in GRPO; they only do not train.
        keep = scored if truncated is None else scored & ~truncated
        return torch.where(scored, rewards, torch.full_like(rewards, torch.nan)), keep

    def _mask_rows_that_do_not_train(self, output: dict, keep: torch.Tensor, process_slice: slice) -> None:
        if keep.all():  # global, so every process joins the gather below or none does
            return
        tool_mask = output.get("tool_mask", torch.ones_like(output["completion_mask"]))
        output["tool_mask"] = tool_mask * keep[process_slice].unsqueeze(1).to(tool_mask.dtype)
        loss_mask = output["completion_mask"] * output["tool_mask"]
        output["num_items_in_batch"] = self.trainer.accelerator.gather(loss_mask.sum()).sum()

    def _tree_advantages(self, output: dict, rewards: torch.Tensor, paths: list[tuple], process_slice: slice) -> None:
        """The paper's estimator (Eq. 5–7), one value per leaf, whitened over the batch's tokens."""
        trainer, args = self.trainer, self.trainer.args
        advantages = compute_tree_advantages(
            rewards,
            paths,
            weighting=args.tree_advantage_weighting,
            reject_zero_std_subgroups=args.tree_reject_zero_std_subgroups,
        )
        if args.tree_advantage_normalization == "batch_whiten":
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            token_counts = trainer.accelerator.gather(loss_mask.sum(dim=1)).double().cpu()
            advantages = whiten(advantages, token_counts)
        advantages = torch.nan_to_num(advantages, nan=0.0).float()
        output["advantages"] = advantages[process_slice].to(trainer.accelerator.device)
        self._replace_logged_advantages(advantages)

    def _segment_advantages(self, output, batch, rewards, paths, keep, process_slice) -> None:
        """A per-segment estimator (the released code's `tree_segment`, or `node_value`): one value per segment,
        handed to the loss as [B, T]."""
        trainer, args = self.trainer, self.trainer.args
        lengths = trainer.accelerator.gather(output["completion_mask"].sum(dim=1)).cpu()
        segment_ends = [ends for process_ends in gather_object([[leaf.segment_ends for leaf in batch.row_leaves]])
                        for ends in process_ends]  # fmt: skip
        if args.tree_advantage_estimator == "node_value":
            advantages = compute_node_value_advantages(
                rewards, paths, lengths.tolist(), args.tree_segment_length, segment_ends=segment_ends
            )
        else:
            advantages = compute_segment_advantages(
                rewards, paths, lengths.tolist(), args.tree_segment_length,
                discount=args.tree_segment_advantage_discount, segment_ends=segment_ends,
            )  # fmt: skip
        # The tokens that train: completion tokens of kept rows, tool results excluded (they carry no policy gradient).
        policy_mask = (output["completion_mask"] * output.get("tool_mask", 1)).tolist()
        policy_rows = [row for process_rows in gather_object([policy_mask]) for row in process_rows]
        token_weights = torch.zeros_like(advantages)
        for row, mask in enumerate(policy_rows):
            columns = min(len(mask), token_weights.size(1))
            token_weights[row, :columns] = torch.tensor(mask[:columns], dtype=token_weights.dtype)
        token_weights *= keep.cpu()[:, None].double()
        if args.tree_advantage_normalization == "batch_whiten":
            advantages = whiten(advantages, token_weights)
        advantages = (torch.nan_to_num(advantages, nan=0.0) * token_weights).float()
        width = output["completion_ids"].size(1)
        local = torch.zeros(output["completion_ids"].size(0), width)
        columns = min(width, advantages.size(1))
        local[:, :columns] = advantages[process_slice, :columns]
        output["advantages"] = local.to(trainer.accelerator.device)
        self._replace_logged_advantages(advantages.sum(dim=1) / token_weights.sum(dim=1).clamp(min=1).float())

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        """Swap the GRPO advantages TRL just logged for the ones that train (one value per row, all processes)."""
        logged = self.trainer._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
