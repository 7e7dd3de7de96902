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
import types

import torch
from trl.trainer import grpo_trainer
from trl.trainer import utils as trl_utils

from ..architecture import active_dropout, attention_layer_count, packing_obstacle
from ..packing import (
    WRAPPED_ATTENTION,
    install_tree_attention,
    pack_rows,
    packing_tolerance,
    shuffle_whole_trees,
    stand_in_sequence,
    tf32_matmuls,
)
from .lockstep import Lockstep

logger = logging.getLogger(__name__)

# TRL 1.15 and later patch the model's forward with a fused LM head that returns per-token log-probs and entropies
# (`fused_lm_head=True`); TRL 1.14 scores full logits instead, and so does the packed forward under it.
FUSED_LM_HEAD = hasattr(trl_utils, "add_fused_lm_head")


def scored_from_logits(logits: torch.Tensor, shift_labels: torch.Tensor, temperature: float):
    """What the fused LM head returns, from full logits: each position's log-probability of its (shifted) label at
    `temperature`, and its entropy; 0 where the label is -100."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = shift_labels != -100
    chosen = log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return types.SimpleNamespace(log_probs=chosen * valid, entropy=entropy * valid)


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
        self.lockstep = Lockstep(trainer.accelerator)
        self.verified: bool | None = None
        self._warnings: set[str] = set()
        self._obstacles: dict[int, tuple] = {}  # per model (policy, reference): (architecture, dropout) obstacles
        self._attention_layers: dict[int, int] = {}  # per model: attention layers a forward runs
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
        if self.verified is None:
            self.verified = self._self_check(model, input_ids, attention_mask, logits_to_keep, batch_size, unpacked)
            if not self.verified:
                return None
        packed = self._packed(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy)
        if packed is None:
            return None
        logps, entropies, packed_tokens, row_tokens = packed
        if torch.is_grad_enabled():  # the loss's forward (old and reference log-probs run without grad)
            # Over every rank, as TRL's own metrics are (each rank reaches this forward as often as the others).
            packed_tokens, row_tokens = self.lockstep.total([packed_tokens, row_tokens])
            self.trainer._metrics["train"]["tree/packed_token_ratio"].append(packed_tokens / max(row_tokens, 1))
        return logps, entropies, None

    def _packed(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy):
        """(log-probs, entropies or None, packed tokens, row tokens) of the rows, TRL's chunk at a time; None when the
        tree-attention guard fails."""
        logps, entropies, packed_tokens, row_tokens = [], [], 0, 0
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            packed = pack_rows(input_ids[rows], attention_mask[rows], logits_to_keep,
                               max_tokens=self.trainer.args.tree_packed_max_tokens)  # fmt: skip
            # How many sequences a chunk packs into depends on this rank's trees; every rank runs as many forwards,
            # agreed before the first one (under sharding each forward is a collective).
            (most,) = self.lockstep.agree_max([len(packed.sequences)])
            outputs = [self._forward(model, sequence) for sequence in packed.sequences]
            stand_ins = [self._forward(model, stand_in_sequence(input_ids[start : start + 1]))
                         for _ in range(most - len(outputs))]  # fmt: skip
            if not self._every_layer_attended(model, packed.sequences):
                return None
            chunk_logps = packed.unpack([output.log_probs for output in outputs])
            for stand_in in stand_ins:  # weight 0, but in the graph, so that its backward (and its collectives) runs
                chunk_logps = chunk_logps + 0.0 * torch.nan_to_num(stand_in.log_probs, 0.0, 0.0, 0.0).sum()
            logps.append(chunk_logps)
            if compute_entropy:
                entropies.append(packed.unpack([output.entropy for output in outputs]))
            packed_tokens += packed.packed_tokens
            row_tokens += packed.row_tokens
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, packed_tokens, row_tokens

    def _forward(self, model, sequence):
        # A MoE router's load-balancing loss reads the attention mask, which in a packed forward is a placeholder; the
        # loss's own forward, which needs that loss, is never packed (`_packable`), so packed forwards skip it.
        moe = {"output_router_logits": False} if self._routes(model) else {}
        inputs = dict(input_ids=sequence.input_ids, attention_mask=sequence.attention_mask,
                      position_ids=sequence.position_ids, tree_attention=sequence.tree, **moe)  # fmt: skip
        with self.trainer.accelerator.autocast():
            if FUSED_LM_HEAD:
                return model(**inputs, shift_labels=sequence.shift_labels, fused_lm_head=True)
            return scored_from_logits(model(**inputs, use_cache=False).logits, sequence.shift_labels,
                                      self.trainer.temperature)  # fmt: skip

    def _routes(self, model) -> bool:
        config = self.trainer.accelerator.unwrap_model(model).config
        return bool(getattr(config.get_text_config(), "output_router_logits", False))

    def _every_layer_attended(self, model, sequences) -> bool:
        """The guard by construction: every attention layer attended with the tree in every packed forward. A layer
        that drops the `tree_attention` argument, or calls its attention kernel itself, would attend over the packed
        sequence with no tree mask at all (bidirectional, across branches); such a forward is thrown away, and packing
        is off for the run, on every rank."""
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._attention_layers:
            self._attention_layers[id(unwrapped)] = attention_layer_count(unwrapped)
        expected = self._attention_layers[id(unwrapped)]
        missed = [sequence.tree.calls for sequence in sequences if sequence.tree.calls != expected]
        if self.lockstep.agree_all(not missed):
            return True
        self.verified = False
        if missed:
            logger.warning(
                f"tree_packed_training is off for this run: in a packed forward, only {missed[0]} of the model's "
                f"{expected} attention layers attended with the tree (the others would see every packed token, across "
                "branches). This model's layers do not pass attention keyword arguments through; training continues "
                "unpacked. Please report the model at the trl-treepo issue tracker."
            )
        else:
            logger.warning("tree_packed_training is off for this run: another rank's packed forward failed the "
                           "tree-attention guard; training continues unpacked.")  # fmt: skip
        return False

    def _self_check(self, model, input_ids, attention_mask, logits_to_keep, batch_size, unpacked) -> bool:
        """First use: the packed log-probs of this batch against TRL's unpacked forward, position by position, in eval
        mode (so that dropout draws no masks), within `packing_tolerance` of the precision the forward runs in
        (TF32 included). One verdict for all ranks: packing is on for the run, or off, loudly, since the
        architecture checks cannot foresee every model."""
        accelerator = self.trainer.accelerator
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                packed = self._packed(model, input_ids, attention_mask, logits_to_keep, batch_size, False)
                if packed is None:  # the guard already turned packing off, on every rank
                    return False
                reference = unpacked(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)[0]
        finally:
            model.train(was_training)
        valid = attention_mask[:, -logits_to_keep:].bool()
        gaps = (packed[0] - reference)[valid].abs().float()
        unwrapped = accelerator.unwrap_model(model)
        precision = unwrapped.dtype
        if accelerator.mixed_precision in ("bf16", "fp16"):
            precision = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        tf32 = precision == torch.float32 and unwrapped.device.type == "cuda" and tf32_matmuls()
        absolute, relative = packing_tolerance(precision, tf32)
        over = gaps > absolute + relative * reference[valid].abs().float()
        if self.lockstep.agree_all(not over.any()):
            return True
        worst = gaps.max().item() if gaps.numel() else 0.0
        logger.warning(
            f"tree_packed_training is off for this run: on the first batch, packed log-probs differ from the unpacked "
            f"ones beyond the {'TF32' if tf32 else precision} tolerance ({absolute} + {relative} × |log p|) at "
            f"{int(over.sum())} of {over.numel()} positions on this rank (largest gap {worst:.3g}). This model's "
            "attention or positions do not allow exact packing; training continues unpacked. Please report the model "
            "at the trl-treepo issue tracker."
        )
        return False

    def _packable(self, model, compute_aux_loss: bool, multimodal_inputs: dict) -> bool:
        """Whether this forward can be packed exactly; if not, a one-time warning says why (spec: exact or refused)."""
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._obstacles:  # the architecture does not change during a run
            self._obstacles[id(unwrapped)] = (
                packing_obstacle(unwrapped, self.PACKABLE_ATTENTION), active_dropout(unwrapped)
            )
        reason, dropout = self._obstacles[id(unwrapped)]
        if reason is None and compute_aux_loss:
            reason = "the MoE load-balancing loss is computed per row"
        if reason is None and any(value is not None for value in multimodal_inputs.values()):
            reason = "multimodal inputs are not packed"
        if reason is None and model.training:
            reason = dropout
        if reason is not None and reason not in self._warnings:
            self._warnings.add(reason)
            logger.warning(f"tree_packed_training falls back to the unpacked forward for this model: {reason}.")
        return reason is None
