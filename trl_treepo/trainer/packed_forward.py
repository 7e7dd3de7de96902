"""The packed forward (`tree_packed_training`, beyond the paper): the packing room of `TreePOTrainer`.

TRL hooks served: `_prepare_inputs` (micro-batches of whole trees) and `_get_per_token_logps_and_entropies` (one
forward over each prompt's token trie instead of one per row, with the same per-token log-probabilities). This room
decides whether a forward can be packed exactly (`architecture.packing_obstacle`, the MoE loss, multimodal inputs),
checks the first packed batch against TRL's unpacked forward, and runs the packed forward (`trl_treepo.packing`).
Whatever cannot be packed exactly goes to TRL's own method, with a one-time warning that says why.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from trl.trainer import grpo_trainer

from ..architecture import packing_obstacle
from ..packing import PACKING_TOLERANCE, WRAPPED_ATTENTION, install_tree_attention, pack_rows, shuffle_whole_trees

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def shuffling_whole_trees():
    """Within the block, GRPOTrainer's generation-batch shuffle permutes whole trees instead of rows."""
    if not hasattr(grpo_trainer, "shuffle_sequence_dict"):  # a TRL release that moved it: fail loudly, not silently
        raise RuntimeError("trl.trainer.grpo_trainer.shuffle_sequence_dict is gone; tree-aware micro-batches need it.")
    original, grpo_trainer.shuffle_sequence_dict = grpo_trainer.shuffle_sequence_dict, shuffle_whole_trees
    try:
        yield
    finally:
        grpo_trainer.shuffle_sequence_dict = original


class PackedForward:
    """Packed log-probabilities for `trainer`, exact or not at all.

    `verified` is the first packed forward's self-check: None (not yet run), True (passed) or False (failed: packing
    is off for the run).
    """

    # The attention implementations whose attention function takes a tree layout.
    PACKABLE_ATTENTION = WRAPPED_ATTENTION

    def __init__(self, trainer):
        self.trainer = trainer
        self.verified: bool | None = None
        self._warnings: set[str] = set()
        self._obstacles: dict[int, str | None] = {}  # per model (policy, reference)
        if trainer.args.tree_packed_training:
            install_tree_attention()

    def logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                            compute_aux_loss, multimodal_inputs, unpacked):  # fmt: skip
        """TRL's `(logps, entropies, aux_loss)` from packed forwards, or None where packing cannot be exact.

        `unpacked` is TRL's own method, which the first-use self-check compares against.
        """
        if not self.trainer.args.tree_packed_training or self.verified is False:
            return None
        if not self._packable(model, compute_aux_loss, multimodal_inputs):
            return None
        batch_size = batch_size or input_ids.size(0)  # TRL's memory chunking, kept; sharing is found within a chunk
        logps, entropies, packed_tokens, row_tokens = [], [], 0, 0
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            packed = pack_rows(input_ids[rows], attention_mask[rows], logits_to_keep,
                               max_tokens=self.trainer.args.tree_packed_max_tokens)  # fmt: skip
            outputs = [self._forward(model, sequence) for sequence in packed.sequences]
            logps.append(packed.unpack([output.log_probs for output in outputs]))
            if compute_entropy:
                entropies.append(packed.unpack([output.entropy for output in outputs]))
            packed_tokens += packed.packed_tokens
            row_tokens += packed.row_tokens
        logps = torch.cat(logps)
        if self.verified is None:
            self.verified = self._matches_unpacked(model, input_ids, attention_mask, logits_to_keep, batch_size, logps,
                                                   unpacked)  # fmt: skip
            if not self.verified:
                return None
        if torch.is_grad_enabled():  # the loss's forward (old and reference log-probs run without grad)
            self.trainer._metrics["train"]["tree/packed_token_ratio"].append(packed_tokens / max(row_tokens, 1))
        return logps, torch.cat(entropies) if compute_entropy else None, None

    def _forward(self, model, sequence):
        with self.trainer.accelerator.autocast():
            return model(
                input_ids=sequence.input_ids,
                attention_mask=sequence.attention_mask,
                position_ids=sequence.position_ids,
                shift_labels=sequence.shift_labels,
                fused_lm_head=True,
                tree_attention=sequence.tree,
            )

    def _matches_unpacked(self, model, input_ids, attention_mask, logits_to_keep, batch_size, logps, unpacked) -> bool:
        """First-use self-check: the packed log-probs of this batch against TRL's unpacked forward.

        Within `PACKING_TOLERANCE` of the model's precision, packing is on for the run; beyond it, it is off for the
        run, with a warning that gives the gap, since the architecture checks cannot foresee every model.
        """
        accelerator = self.trainer.accelerator
        with torch.no_grad():
            reference = unpacked(model, input_ids, attention_mask, logits_to_keep, batch_size)[0]
        valid = attention_mask[:, -logits_to_keep:].bool()
        gaps = (logps.detach() - reference)[valid].abs().float()
        if gaps.numel() == 0:
            return True
        precision = accelerator.unwrap_model(model).dtype
        if accelerator.mixed_precision in ("bf16", "fp16"):
            precision = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        max_gap, mean_gap = PACKING_TOLERANCE.get(precision, PACKING_TOLERANCE[torch.bfloat16])
        if gaps.max() <= max_gap and gaps.mean() <= mean_gap:
            return True
        logger.warning(
            f"tree_packed_training is off for this run: on the first batch, packed log-probs differ from the unpacked "
            f"ones by up to {gaps.max().item():.3g} (mean {gaps.mean().item():.3g}; tolerance {max_gap} / {mean_gap} "
            f"in {precision}). This model's attention or positions do not allow exact packing; training continues "
            "unpacked. Please report the model at the trl-treepo issue tracker."
        )
        return False

    def _packable(self, model, compute_aux_loss: bool, multimodal_inputs: dict) -> bool:
        """Whether this forward can be packed exactly; if not, a one-time warning says why (spec: exact or refused)."""
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._obstacles:  # the architecture does not change during a run
            self._obstacles[id(unwrapped)] = packing_obstacle(unwrapped, self.PACKABLE_ATTENTION)
        reason = self._obstacles[id(unwrapped)]
        if reason is None and compute_aux_loss:
            reason = "the MoE load-balancing loss is computed per row"
        if reason is None and any(value is not None for value in multimodal_inputs.values()):
            reason = "multimodal inputs are not packed"
        if reason is not None and reason not in self._warnings:
            self._warnings.add(reason)
            logger.warning(f"tree_packed_training falls back to the unpacked forward for this model: {reason}.")
        return reason is None
