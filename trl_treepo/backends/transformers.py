"""Segment engine on `transformers` `generate`, for users without vLLM.

A tree level is one `generate` call over every branch of every live node. Between levels the engine keeps the KV
cache: a continuing path's row holds exactly its prompt and response so far, so its children are served by
selecting (and repeating) that row instead of re-reading the shared prefix (TreePO's KV reuse, paper §2.1). A
node that was not decoded at the last level (the first level, a fallback branch) has its prefix read once and
repeated for its branches; such rows are merged with the cached ones into one batch.

Under sharded training (FSDP, ZeRO-3) every forward is a collective, so the ranks that share the model must run the
same sequence of forwards and `generate` calls. Given `agree` (an all-reduce of small integers, max over the ranks),
each level first agrees whether any rank is still decoding and whether any prefills; a rank with nothing of its own
to do runs a one-token stand-in, and `finish()` keeps a rank whose trees are done joining levels until every rank's
are. `generate` then runs with `synced_gpus`, so that its decoding steps line up too.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..architecture import non_full_attention_layers
from ..sampling import SegmentOutput, SegmentRequest

logger = logging.getLogger(__name__)
_warned_models: set[str] = set()


class _SampledTokenLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the final (warped) sampling distribution, one step behind.

    Keeps only the previous step's log-softmax, so memory stays at one [rows, vocab] tensor instead of the full
    score history that `output_scores` would hold.
    """

    def __init__(self):
        self.previous = None
        self.steps = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def collect(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.steps, dim=1)


def _warpers_of(config: GenerationConfig) -> list[LogitsProcessor]:
    """The sampling warpers `generate` would add for `config`, in its order, so a recorder can run after them."""
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return warpers


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class TransformersSegmentEngine:
    """`SegmentEngine` over a `transformers` causal LM.

    Args:
        model: the (unwrapped) model, already in generation mode; calls run under `torch.no_grad()`.
        generation_config: sampling settings (temperature, top-k/p, EOS ids, ...); `max_new_tokens` is set per call.
        pad_token_id: padding id for left-padded inputs.
        reuse_kv_cache: keep the KV cache between levels and serve children from their parent's row.
        return_logprobs: also return each sampled token's logprob under the sampling distribution.
        agree: with several processes sharing the model, `agree(values) -> values` gives each value's maximum over
            them (see the module docstring); call `finish()` after the rollout. None: one process.
    """

    def __init__(
        self,
        model,
        generation_config: GenerationConfig,
        pad_token_id: int,
        *,
        reuse_kv_cache: bool = True,
        return_logprobs: bool = False,
        agree=None,
    ):
        self.model = model
        self.agree = agree
        self.pad_token_id = pad_token_id
        self.return_logprobs = return_logprobs
        eos = generation_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.generation_config = copy.deepcopy(generation_config)
        self.generation_config.return_dict_in_generate = True
        self.generation_config.stop_strings = None  # the tree sampler applies them, across segment boundaries
        self.warpers = []
        if return_logprobs:
            # Run the warpers ourselves, so that the recorder sees the distribution tokens are sampled from.
            self.warpers = _warpers_of(self.generation_config)
            self.generation_config.temperature = 1.0
            self.generation_config.top_k = None
            self.generation_config.top_p = None
            self.generation_config.min_p = None
        # A MoE router's load-balancing loss reads the whole attention mask but only the new tokens' router logits,
        # which disagree once a level continues from a cache; decoding never needs that loss.
        text_config = model.config.get_text_config()
        routes = getattr(text_config, "output_router_logits", False)
        self._no_router_loss = {"output_router_logits": False} if routes else {}
        self.reuse_kv_cache = reuse_kv_cache
        if reuse_kv_cache:
            # Reuse selects, repeats and left-pads cached rows along the sequence axis, which only a plain
            # full-attention KV layer supports: a sliding window keeps only the last keys, and the recurrent or
            # convolutional states of Mamba, linear-attention and conv layers have no sequence axis.
            obstacle = non_full_attention_layers(model)
            if generation_config.cache_implementation is not None:
                obstacle = f"cache_implementation={generation_config.cache_implementation!r} cannot be sliced by row"
            if obstacle is not None:
                self.reuse_kv_cache = False
                name = model.config.model_type
                if name not in _warned_models:
                    _warned_models.add(name)
                    logger.warning(
                        f"tree_reuse_kv_cache is off for this {name} model: {obstacle}. Each tree level re-reads its "
                        "paths' prefixes instead, which is exact but slower."
                    )
        self._kept = None  # (sequences, attention_mask, cache, row of each continuable full sequence)
        self.prefilled_tokens = 0  # prefix tokens read again because no cached row held them
        self.steps = 0  # decoding steps (`generate`'s forwards that sample a token), over every call

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _prefill(self, sequences) -> tuple[torch.Tensor, torch.Tensor, DynamicCache | None]:
        """Left-padded ids and mask of `sequences`, and the KV cache of all but their last token."""
        input_ids, attention_mask = left_pad(sequences, self.pad_token_id, self.device)
        if not self.reuse_kv_cache:
            return input_ids, attention_mask, None
        # `generate` feeds the last token itself, so the cache stops one short.
        cache = DynamicCache(config=self.model.config)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, :-1],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.prefilled_tokens += int(attention_mask[:, :-1].sum())
        return input_ids, attention_mask, cache

    def _kept_rows(self, requests) -> dict[int, int] | None:
        """Request index → its row in the kept cache, for the requests whose node was decoded at the last level;
        None when no cache can be used (a one-token node has nothing to prefill)."""
        if any(len(r.token_ids) < 2 for r in requests):
            return None
        if self._kept is None:
            return {}
        row_of = self._kept[3]
        return {i: row_of[key] for i, r in enumerate(requests) if (key := tuple(r.token_ids)) in row_of}

    def _prepare_rows(self, requests, row_source, kept_rows):
        """Ids, mask and cache for every branch row: kept cache rows where a node was decoded at the last level
        (its children), a fresh prefill of each other distinct node (first level, fallback branches)."""
        if kept_rows is None:
            self._kept = None
            ids, mask = left_pad([r.token_ids for r in requests], self.pad_token_id, self.device)
            index = torch.tensor(row_source, device=ids.device)
            return list(range(len(row_source))), ids[index], mask[index], None
        fresh = [i for i in range(len(requests)) if i not in kept_rows]
        parts = []  # (rows of this part in branch order, ids, mask, cache)
        if kept_rows:
            sequences, attention_mask, cache, _ = self._kept
            rows = [row for row, source in enumerate(row_source) if source in kept_rows]
            index = torch.tensor([kept_rows[row_source[row]] for row in rows], device=sequences.device)
            cache.batch_select_indices(index)
            parts.append((rows, sequences[index], attention_mask[index], cache))
        self._kept = None  # the selected rows hold what is needed; free the rest before prefilling
        if fresh:
            ids, mask, cache = self._prefill([requests[i].token_ids for i in fresh])
            slot = {request: k for k, request in enumerate(fresh)}
            rows = [row for row, source in enumerate(row_source) if source in slot]
            index = torch.tensor([slot[row_source[row]] for row in rows], device=ids.device)
            if cache is not None:
                cache.batch_select_indices(index)
            parts.append((rows, ids[index], mask[index], cache))
        if len(parts) == 1:
            return parts[0]
        return self._merge(parts)

    def _merge(self, parts):
        """Stack parts of different widths into one batch: left-pad ids with pad, the mask with 0, KV with zeros."""
        width = max(ids.size(1) for _, ids, _, _ in parts)
        rows, ids_list, mask_list, keys, values = [], [], [], None, None
        for part_rows, ids, mask, cache in parts:
            extra = width - ids.size(1)
            rows += part_rows
            ids_list.append(torch.nn.functional.pad(ids, (extra, 0), value=self.pad_token_id))
            mask_list.append(torch.nn.functional.pad(mask, (extra, 0), value=0))
            layer_keys = [torch.nn.functional.pad(layer.keys, (0, 0, extra, 0)) for layer in cache.layers]
            layer_values = [torch.nn.functional.pad(layer.values, (0, 0, extra, 0)) for layer in cache.layers]
            keys = layer_keys if keys is None else [torch.cat(p, 0) for p in zip(keys, layer_keys)]
            values = layer_values if values is None else [torch.cat(p, 0) for p in zip(values, layer_values)]
        merged = DynamicCache()
        for layer, (layer_keys, layer_values) in enumerate(zip(keys, values)):
            merged.update(layer_keys, layer_values, layer)
        return rows, torch.cat(ids_list), torch.cat(mask_list), merged

    def generate(self, requests: Sequence[SegmentRequest]) -> list[list[SegmentOutput]]:
        if not requests:
            return []
        branch_source = [i for i, request in enumerate(requests) for _ in range(request.num_branches)]
        kept_rows = self._kept_rows(requests)
        prefills = self.reuse_kv_cache and kept_rows is not None and len(kept_rows) < len(requests)
        if self.agree is not None:
            _, any_prefill = self.agree([1, int(prefills)])
            if any_prefill and not prefills:
                self._stand_in_forward()
        rows, input_ids, attention_mask, cache = self._prepare_rows(requests, branch_source, kept_rows)
        row_source = [branch_source[row] for row in rows]

        max_new_tokens = max(request.max_tokens for request in requests)
        config = copy.copy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        recorder = _SampledTokenLogprobs() if self.return_logprobs else None
        processors = LogitsProcessorList(self.warpers + ([recorder] if recorder else []))
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            generation_config=config,
            logits_processor=processors,
            **({"synced_gpus": True} if self.agree is not None else {}),
            **self._no_router_loss,
        )
        # A bare tensor is what `generate` returns when something (a test's stand-in, a wrapper) ignores
        # `return_dict_in_generate`: the sequences, without a cache to keep.
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        past_key_values = None if isinstance(output, torch.Tensor) else output.past_key_values
        prompt_width = input_ids.size(1)
        new_tokens = sequences[:, prompt_width:]
        self.steps += new_tokens.size(1)
        logprobs = recorder.collect(sequences[:, -1]).cpu() if recorder else None
        new_tokens_cpu = new_tokens.cpu().tolist()

        results: list[list[SegmentOutput]] = [[] for _ in requests]
        continuable = {}
        for row, source in enumerate(row_source):
            ids = new_tokens_cpu[row][: requests[source].max_tokens]
            stop = next((i for i, token in enumerate(ids) if token in self.eos_token_ids), None)
            if stop is not None:
                ids = ids[: stop + 1]
            row_logprobs = logprobs[row, : len(ids)].tolist() if logprobs is not None else None
            results[source].append(SegmentOutput(ids, row_logprobs, "stop" if stop is not None else "length"))
            if stop is None and len(ids) == max_new_tokens:
                continuable[tuple(requests[source].token_ids) + tuple(ids)] = row

        if self.reuse_kv_cache and continuable and past_key_values is not None:
            full_mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)
            self._kept = (sequences, full_mask, past_key_values, continuable)
        return results

    # ------------------------------------------------------------------------------------ ranks in step (`agree`)

    def finish(self) -> None:
        """After this rank's rollout: join the levels other ranks still decode, until no rank has any left."""
        self._kept = None
        while self.agree is not None:
            active, any_prefill = self.agree([0, 0])
            if not active:
                return
            if any_prefill:
                self._stand_in_forward()
            config = copy.copy(self.generation_config)
            config.max_new_tokens = 1
            self.model.generate(**self._one_pad_token(), generation_config=config, synced_gpus=True)

    def _stand_in_forward(self) -> None:
        """The forward another rank's prefill runs, on one token, so that this rank joins its collectives."""
        self.model(**self._one_pad_token(), use_cache=False, logits_to_keep=1)

    def _one_pad_token(self) -> dict:
        ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
