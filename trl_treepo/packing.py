"""Tree-packed training: each shared prefix is forwarded (and back-propagated) once, in memory linear in its tokens.

Beyond the paper. The leaves of a tree repeat their ancestors' tokens; training them as separate rows recomputes
those tokens once per descendant leaf. Here the rows that share a prompt are merged into a token trie, laid out in
depth-first order: the prompt, then every distinct completion prefix once. One forward over the packed sequence,
with tree attention (each token sees its ancestors and itself) and position ids that follow each token's depth,
gives the same per-token log-probabilities as the unpacked rows: rotary embeddings depend only on relative positions,
so the left padding of the unpacked rows changes nothing. Each leaf's log-probabilities are then gathered back into
TRL's [B, T] layout. A token shared by k leaves is one entry of the graph that k rows read, so autograd sums its k
gradient contributions, each with that leaf's advantage and clipping: the loss and its gradients equal the unpacked
ones.

**Layout.** The rows of a prompt are sorted lexicographically. Each row then adds the suffix it does not share with
the previous row, as one *run* of consecutive positions: a chain whose queries see a *context* (the ancestors of its
first token, a list of earlier positions) and the run itself, causally. A branch point predicts one next token per
child, but a position holds one label; each extra child therefore gets a one-token run with a copy of the branch
token (same token, depth and context, hence the same hidden state), labelled with that child's first token. Nothing
attends to a copy but the copy itself. The metadata is O(rows + tokens): no L × L tensor is ever built.

**Attention** (`TreeAttention.attend`) gathers each run's keys and values (context, then the run) and calls PyTorch's
`scaled_dot_product_attention` on chunks of at most `chunk` queries with a lower-right causal mask. The masks are
views of one additive buffer of `chunk × (longest path + chunk)`, which the attention kernels keep by reference, so
what autograd saves is the gathered keys and values (Σ over runs of path length × KV heads × head size), never an
attention matrix or a mask per call. It runs with autograd on every device, CPU included (where FlexAttention has
no backward). It plugs into transformers through its `AttentionInterface`: the `sdpa`, flash and flex entries are
wrapped once, and dispatch to tree attention only when a forward carries `tree_attention=`.

Pure torch; knows nothing of TRL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# First-use self-check of the trainer: a position's |packed − unpacked| log-prob may be at most
# `absolute + relative × |log p|` in the precision the forward runs in. Measured on the same rows (trees of 8 leaves,
# random-init Qwen2 of hidden 128 / 2 layers and hidden 512 / 4 layers, CPU), exact packing differs by at most
# 2e-6 (float32), 1e-3 (float16) and 1e-2 (bfloat16) at any position; attention that misses the tree (bidirectional
# over the packed sequence) differs by 0.25 and more. TF32 matmuls (fp32 on CUDA with TF32 allowed) round to a
# 10-bit mantissa, so they get the float16 bound.
PACKING_TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    "tf32": (2e-2, 5e-3),
    torch.float16: (2e-2, 5e-3),
    torch.bfloat16: (0.1, 1e-2),
}


def packing_tolerance(dtype: torch.dtype, tf32: bool = False) -> tuple[float, float]:
    """(absolute, relative) per-position tolerance of the packing self-check for `dtype` (see `PACKING_TOLERANCE`)."""
    if tf32:
        return PACKING_TOLERANCE["tf32"]
    return PACKING_TOLERANCE.get(dtype, PACKING_TOLERANCE[torch.bfloat16])


def tf32_matmuls() -> bool:
    """Whether float32 matmuls on CUDA may run in TF32."""
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


# What the packed forward passes as `attention_mask`: a 4D tensor makes transformers' mask creation return it as is,
# so no L × L mask is built; the tree attention reads its `TreeAttention` instead.
_PLACEHOLDER_SHAPE = (1, 1, 1, 1)


@dataclass
class Run:
    """Queries at positions `[start, end)` attend to `keys`: their context, then `[start, end)` causally."""

    start: int
    end: int
    keys: torch.Tensor  # [context + (end - start)] positions

    @property
    def context(self) -> int:
        return self.keys.numel() - (self.end - self.start)


@dataclass
class TreeAttention:
    """Tree attention over one packed sequence of `length` positions, tiled by `runs` in order."""

    runs: list[Run]
    length: int
    chunk: int = 512
    calls: int = 0  # attention layers that attended with this tree: every attention layer must, in every forward
    _mask_buffers: dict = field(default_factory=dict, repr=False)

    @property
    def longest_path(self) -> int:
        return max(run.keys.numel() for run in self.runs)

    def _causal_buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`[chunk, W]` additive mask, 0 where key j ≤ (W − chunk) + query i: every lower-right causal mask of at most
        `chunk` queries over at most `W − chunk` keys is a view of it."""
        key = (dtype, device)
        if key not in self._mask_buffers:
            width = self.longest_path + self.chunk
            allowed = torch.ones(self.chunk, width, dtype=torch.bool, device=device).tril(width - self.chunk)
            blocked = torch.finfo(dtype).min
            self._mask_buffers[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, blocked)
        return self._mask_buffers[key]

    def attend(self, query, key, value, scaling=None, dropout=0.0) -> torch.Tensor:
        """`query` [1, H, L, D], `key`/`value` [1, H_kv, L, D] → the attention output as [1, L, H, D]."""
        if query.size(0) != 1 or query.size(2) != self.length:
            raise ValueError(
                f"Tree attention runs on one packed sequence of {self.length} positions; got queries of shape "
                f"{tuple(query.shape)}."
            )
        self.calls += 1
        buffer = self._causal_buffer(query.dtype, query.device)
        width = buffer.size(1)
        outputs = []
        for run in self.runs:
            run_key, run_value = key.index_select(2, run.keys), value.index_select(2, run.keys)
            for first in range(run.start, run.end, self.chunk):
                last = min(first + self.chunk, run.end)
                queries, seen = last - first, run.context + last - run.start
                # query i sees key j iff j <= seen - queries + i: the buffer's diagonal, shifted
                mask = buffer[:queries, width - self.chunk - seen + queries : width - self.chunk + queries]
                outputs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        query[:, :, first:last],
                        run_key[:, :, :seen],
                        run_value[:, :, :seen],
                        attn_mask=mask,
                        dropout_p=dropout,
                        scale=scaling,
                        enable_gqa=query.size(1) != key.size(1),
                    )
                )
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()

    def dense_mask(self) -> torch.Tensor:
        """The `[1, 1, L, L]` boolean mask this attention is equivalent to (for tests and the dense baseline)."""
        allowed = torch.zeros(1, 1, self.length, self.length, dtype=torch.bool)
        for run in self.runs:
            context = run.keys[: run.context].cpu()
            for position in range(run.start, run.end):
                allowed[0, 0, position, context] = True
                allowed[0, 0, position, run.start : position + 1] = True
        return allowed


@dataclass
class PackedSequence:
    """One packed forward: `[1, L]` ids, depth position ids, the label each position predicts, and its attention."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor  # -100 where a position predicts nothing
    tree: TreeAttention

    @property
    def attention_mask(self) -> torch.Tensor:
        """A placeholder that keeps transformers from building a mask; the tree attention does the masking."""
        return torch.ones(_PLACEHOLDER_SHAPE, dtype=torch.bool, device=self.input_ids.device)


@dataclass
class PackedRows:
    """Rows `[B, P + T]` (prompt left-padded, completion right-padded) packed into tree sequences."""

    sequences: list[PackedSequence]
    predictor: torch.Tensor  # [B, T] index into the concatenated positions of `sequences` predicting token (b, t)
    completion_mask: torch.Tensor  # [B, T] bool
    row_tokens: int  # prompt + completion tokens of the unpacked rows
    packed_tokens: int  # tokens of the packed sequences

    def unpack(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-position values of each sequence (`[1, L_i]`, aligned with `shift_labels`) → the rows' `[B, T]`."""
        flat = torch.cat([v.reshape(-1) for v in values])
        gathered = flat[self.predictor]
        return torch.where(self.completion_mask, gathered, torch.zeros_like(gathered))


@dataclass
class _Trie:
    """One prompt's rows in depth-first order, before placement in a packed sequence (positions from 0)."""

    tokens: list[int]
    depths: list[int]
    labels: list[int]
    runs: list[tuple[int, int, list[int]]]  # (start, end, context positions)
    predictors: dict[int, list[int]]  # row -> position predicting each completion token


def _common_prefix_lengths(completions: list[list[int]]) -> list[int]:
    """Length of the common prefix of each completion with the previous one (0 for the first)."""
    if len(completions) < 2:
        return [0] * len(completions)
    width = max(len(c) for c in completions) + 1
    padded = torch.full((len(completions), width), -1, dtype=torch.long)
    for row, completion in enumerate(completions):
        padded[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
    differs = padded[1:] != padded[:-1]  # the -1 padding differs from any token, so a shorter row ends the prefix
    lengths = differs.int().argmax(dim=1)
    lengths[~differs.any(dim=1)] = width - 1  # identical rows
    return [0] + lengths.tolist()


def _build_trie(prompt: list[int], rows: list[int], completions: dict[int, list[int]]) -> _Trie:
    """Lay out one prompt's rows as a depth-first trie (see the module docstring)."""
    order = sorted(rows, key=lambda row: completions[row])
    shared = _common_prefix_lengths([completions[row] for row in order])
    prompt_length = len(prompt)
    tokens, depths, labels = list(prompt), list(range(prompt_length)), [-100] * prompt_length
    longest = prompt_length + max(len(completions[row]) for row in rows)
    path = list(range(prompt_length)) + [0] * (longest - prompt_length)  # position of the current path's token by depth
    predicted_by = [0] * longest  # position predicting the current path's token at each depth
    runs = [[0, prompt_length, []]]  # the prompt, extended by the first row's completion
    predictors = {}
    for rank, (row, common) in enumerate(zip(order, shared)):
        completion = completions[row]
        new = completion[common:]
        if new:
            branch = prompt_length + common - 1  # depth of the last shared token
            first_predictor = path[branch]
            if labels[first_predictor] != -100:  # it already predicts another child: a copy scores this one
                first_predictor = len(tokens)
                tokens.append(tokens[path[branch]])
                depths.append(branch)
                labels.append(-100)
                runs.append([first_predictor, first_predictor + 1, path[:branch]])
            labels[first_predictor] = new[0]
            start = len(tokens)
            tokens += new
            depths += range(branch + 1, branch + 1 + len(new))
            labels += new[1:] + [-100]
            if rank == 0:
                runs[0][1] = start + len(new)
            else:
                runs.append([start, start + len(new), path[: branch + 1]])
            end_depth = branch + 1 + len(new)
            path[branch + 1 : end_depth] = range(start, start + len(new))
            predicted_by[branch + 1] = first_predictor
            predicted_by[branch + 2 : end_depth] = range(start, start + len(new) - 1)
        predictors[row] = predicted_by[prompt_length : prompt_length + len(completion)]
    return _Trie(tokens, depths, labels, [tuple(run) for run in runs], predictors)


def _split_rows(prompt: list[int], rows: list[int], completions: dict[int, list[int]], max_tokens: int) -> list[_Trie]:
    """One trie, or several over consecutive rows in sorted order when one would exceed `max_tokens`."""
    trie = _build_trie(prompt, rows, completions)
    if len(trie.tokens) <= max_tokens or len(rows) == 1:
        return [trie]
    order = sorted(rows, key=lambda row: completions[row])
    tries, group = [], []
    for row in order:
        if group and len(_build_trie(prompt, group + [row], completions).tokens) > max_tokens:
            tries.append(_build_trie(prompt, group, completions))
            group = []
        group.append(row)
    tries.append(_build_trie(prompt, group, completions))
    return tries


def _next_fit(tries: list[_Trie], budget: float) -> list[list[_Trie]]:
    """Tries placed in sequences of at most `budget` tokens, next fit: a prompt's tries stay together, in order."""
    placed: list[list[_Trie]] = [[]]
    used = 0
    for trie in tries:
        if placed[-1] and used + len(trie.tokens) > budget:
            placed.append([])
            used = 0
        placed[-1].append(trie)
        used += len(trie.tokens)
    return placed


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    max_tokens: int | None = None,
    chunk: int = 512,
) -> PackedRows:
    """Pack rows that share a prompt into depth-first tries (see the module docstring).

    Args:
        input_ids: `[B, P + T]`: left-padded prompts followed by right-padded completions, TRL's layout.
        attention_mask: `[B, P + T]`, 1 on real tokens.
        logits_to_keep: `T`, the completion width.
        max_tokens: token budget of one packed sequence. Tries are placed in sequences of at most this many tokens;
            a trie larger than the budget is split into tries over fewer rows (their shared prefixes are then
            repeated). A single row longer than the budget gets a sequence of its own. `None`: one sequence.
        chunk: queries per attention call (`TreeAttention.chunk`).
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be [B, P + T].")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}.")
    width = logits_to_keep
    prompt_width = input_ids.size(1) - width
    ids, mask = input_ids.tolist(), attention_mask.bool().tolist()

    groups: dict[tuple, list[int]] = {}
    completions: dict[int, list[int]] = {}
    for row in range(len(ids)):
        prompt = tuple(t for t, m in zip(ids[row][:prompt_width], mask[row][:prompt_width]) if m)
        if not prompt:
            raise ValueError(f"Row {row} has no prompt token; a packed row needs one to predict its first token.")
        completion = ids[row][prompt_width:]
        completions[row] = completion[: sum(mask[row][prompt_width:])]
        groups.setdefault(prompt, []).append(row)

    budget = max_tokens or float("inf")
    tries = [trie for prompt, rows in groups.items() for trie in _split_rows(list(prompt), rows, completions, budget)]
    placed = _next_fit(tries, budget)

    device = input_ids.device
    sequences = []
    predictor = torch.zeros(len(ids), width, dtype=torch.long)
    completion_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    base = 0  # offset of the current sequence in the concatenated positions
    for members in placed:
        tokens, depths, labels, runs = [], [], [], []
        for trie in members:
            offset = len(tokens)
            tokens += trie.tokens
            depths += trie.depths
            labels += trie.labels
            for start, end, context in trie.runs:
                keys = torch.tensor(context + list(range(start, end)), dtype=torch.long) + offset
                runs.append(Run(start + offset, end + offset, keys.to(device)))
            for row, positions in trie.predictors.items():
                predictor[row, : len(positions)] = torch.tensor(positions, dtype=torch.long) + base + offset
                completion_mask[row, : len(positions)] = True
        sequences.append(
            PackedSequence(
                input_ids=torch.tensor([tokens], device=device),
                position_ids=torch.tensor([depths], device=device),
                shift_labels=torch.tensor([labels], device=device),
                tree=TreeAttention(runs, len(tokens), chunk),
            )
        )
        base += len(tokens)
    return PackedRows(
        sequences=sequences,
        predictor=predictor.to(device),
        completion_mask=completion_mask.to(device),
        row_tokens=int(attention_mask.sum()),
        packed_tokens=base,
    )


def stand_in_sequence(row_ids: torch.Tensor) -> PackedSequence:
    """A one-token packed sequence (the first token of `row_ids`, a [1, L] row) that predicts nothing: the forward a
    rank runs to stay in step with ranks that pack a micro-batch into more sequences (sharded training)."""
    token = row_ids[:, :1]
    keys = torch.zeros(1, dtype=torch.long, device=token.device)
    return PackedSequence(
        input_ids=token,
        position_ids=torch.zeros_like(token),
        shift_labels=torch.full_like(token, -100),
        tree=TreeAttention([Run(0, 1, keys)], 1),
    )


def shuffle_whole_trees(batch: dict) -> dict:
    """Permute a generation batch by whole prompt groups (consecutive rows with the same prompt), not by rows.

    A drop-in for TRL's `shuffle_sequence_dict`, drawing the same `torch.randperm(rows)`, so that the random state
    after it is the one TRL's shuffle would leave. Groups are ordered by where their first row lands in that draw;
    rows keep their order within a group. Cut into micro-batches, the batch then holds whole trees, as far as the
    micro-batch size allows.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    rows = prompt_ids.size(0)
    draw = torch.randperm(rows)
    starts = torch.ones(rows, dtype=torch.bool)
    starts[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(dim=1) | (prompt_mask[1:] != prompt_mask[:-1]).any(dim=1)
    group_of_row = starts.long().cumsum(0) - 1
    group_order = list(dict.fromkeys(group_of_row[draw].tolist()))
    members = [[] for _ in group_order]
    for row, group in enumerate(group_of_row.tolist()):
        members[group].append(row)
    permutation = torch.tensor([row for group in group_order for row in members[group]])

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation]

    return {key: permute(value) for key, value in batch.items()}


# ------------------------------------------------------------------------------------------ transformers plug-in

# The registry entries of transformers' `AttentionInterface` that tree attention extends. `eager` is not one: each
# model passes its own eager function, which no registry entry can extend.
WRAPPED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")


def install_tree_attention() -> None:
    """Extend transformers' attention functions once (`WRAPPED_ATTENTION`): a forward that carries `tree_attention=`
    (a `TreeAttention`) gets tree attention; every other call goes to the original function, untouched."""
    from transformers import AttentionInterface

    for name, base in list(AttentionInterface._global_mapping.items()):
        if name not in WRAPPED_ATTENTION or getattr(base, "tree_attention_base", None) is not None:
            continue

        def attention(module, query, key, value, attention_mask, *args, tree_attention=None, _base=base, **kwargs):
            if tree_attention is None:
                return _base(module, query, key, value, attention_mask, *args, **kwargs)
            if kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None:
                raise ValueError("Tree attention supports full causal attention only (no sliding window or sinks).")
            output = tree_attention.attend(query, key, value, scaling=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0))
            return output, None

        attention.tree_attention_base = base
        AttentionInterface.register(name, attention)
