"""Tree-packed training: each shared prefix is forwarded (and back-propagated) once.

Beyond the paper. The leaves of a tree repeat their ancestors' tokens; training them as separate rows recomputes
those tokens once per descendant leaf. Here the rows of a batch that share a prompt are merged into a token trie:
the prompt, then every distinct completion prefix once. One forward over the packed sequence, with a tree attention
mask (each token sees the prompt, its ancestors and itself) and position ids that follow each token's depth, gives
the same per-token log-probabilities as the unpacked rows. RoPE depends only on relative positions, so left padding
in the unpacked rows does not change them. Each leaf's log-probabilities are then gathered back into TRL's [B, T]
layout. A token shared by k leaves is one entry of the graph that k rows read, so autograd sums its k gradient
contributions, each with that leaf's advantage and clipping: the loss and its gradients equal the unpacked ones.

The trie merges identical token prefixes, whatever the tree's node ids say. Identical prefixes have identical
log-probabilities, so merging any of them is exact, and rows that the trainer's shuffling separated from their
siblings still pack correctly.

Pure torch; knows nothing of TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Rows `[B, P + T]` (prompt left-padded, completion right-padded) packed into `[N, L]` tree sequences."""

    input_ids: torch.Tensor  # [N, L]
    position_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, 1, L, L] bool, True where a query may attend to a key
    shift_labels: torch.Tensor  # [N, L] the token each position predicts, -100 where none
    predictor: torch.Tensor  # [B, T] flat index into N·L of the position that predicts completion token (b, t)
    completion_mask: torch.Tensor  # [B, T] bool
    row_tokens: int  # prompt + completion tokens of the unpacked rows
    packed_tokens: int  # tokens of the packed sequences, without padding

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention mask as 0 / most-negative values, for attention implementations that add it to the scores."""
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.attention_mask.device)
        return torch.where(self.attention_mask, torch.zeros((), dtype=dtype, device=blocked.device), blocked)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """`[N, L]` per-position values (aligned with `shift_labels`) → the rows' `[B, T]`, 0 past each row's end."""
        gathered = values.reshape(-1)[self.predictor]
        return torch.where(self.completion_mask, gathered, torch.zeros_like(gathered))


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> PackedRows:
    """Pack rows that share a prompt into one trie each (see the module docstring).

    A position predicts one next token, but a branch point has several. Each extra child gets a copy of the branch
    token: same token, same depth, same ancestors, hence the same hidden state, labelled with that child's token.
    So one forward scores every leaf token, through TRL's fused LM head and its `shift_labels`.

    Args:
        input_ids: `[B, P + T]`: left-padded prompts followed by right-padded completions, TRL's layout.
        attention_mask: `[B, P + T]`, 1 on real tokens.
        logits_to_keep: `T`, the completion width.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be [B, P + T].")
    width = logits_to_keep
    prompt_width = input_ids.size(1) - width
    ids, mask = input_ids.tolist(), attention_mask.bool().tolist()

    groups: dict[tuple, list[int]] = {}
    for row in range(len(ids)):
        prompt = tuple(t for t, m in zip(ids[row][:prompt_width], mask[row][:prompt_width]) if m)
        if not prompt:
            raise ValueError(f"Row {row} has no prompt token; a packed row needs one to predict its first token.")
        groups.setdefault(prompt, []).append(row)

    sequences, row_positions = [], {}
    for prompt, rows in groups.items():
        tokens, parent, label = list(prompt), list(range(-1, len(prompt) - 1)), [-100] * len(prompt)
        child_of: dict[tuple[int, int], int] = {}  # (node, token) -> child node
        predictor_of: dict[tuple[int, int], int] = {}  # (node, token) -> position labelled with that token
        for row in rows:
            node, predictors = len(prompt) - 1, []
            for t, m in zip(ids[row][prompt_width:], mask[row][prompt_width:]):
                if not m:
                    break
                if (node, t) not in child_of:
                    if label[node] == -100:
                        scorer = node
                    else:  # a branch point: a copy of `node` scores this child
                        scorer = len(tokens)
                        tokens.append(tokens[node])
                        parent.append(parent[node])
                        label.append(-100)
                    label[scorer] = t
                    predictor_of[(node, t)] = scorer
                    child_of[(node, t)] = len(tokens)
                    tokens.append(t)
                    parent.append(node)
                    label.append(-100)
                predictors.append(predictor_of[(node, t)])
                node = child_of[(node, t)]
            row_positions[row] = (len(sequences), predictors)
        sequences.append((tokens, parent, label))

    length = max(len(tokens) for tokens, _, _ in sequences)
    count = len(sequences)
    packed_ids = torch.zeros(count, length, dtype=torch.long)
    positions = torch.zeros(count, length, dtype=torch.long)
    labels = torch.full((count, length), -100, dtype=torch.long)
    allowed = torch.zeros(count, 1, length, length, dtype=torch.bool)
    for index, (tokens, parent, label) in enumerate(sequences):
        packed_ids[index, : len(tokens)] = torch.tensor(tokens)
        labels[index, : len(tokens)] = torch.tensor(label)
        depth = [0] * len(tokens)
        sees = allowed[index, 0]
        for node, up in enumerate(parent):  # parents come before their children and copies
            if up >= 0:
                depth[node] = depth[up] + 1
                sees[node] = sees[up]
            sees[node, node] = True
        positions[index, : len(tokens)] = torch.tensor(depth)
        for pad in range(len(tokens), length):  # padding sees itself only, so no softmax row is empty
            allowed[index, 0, pad, pad] = True

    predictor = torch.zeros(len(ids), width, dtype=torch.long)
    completion_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, (index, predictors) in row_positions.items():
        predictor[row, : len(predictors)] = torch.tensor(predictors, dtype=torch.long) + index * length
        completion_mask[row, : len(predictors)] = True
    device = input_ids.device
    return PackedRows(
        input_ids=packed_ids.to(device),
        position_ids=positions.to(device),
        attention_mask=allowed.to(device),
        shift_labels=labels.to(device),
        predictor=predictor.to(device),
        completion_mask=completion_mask.to(device),
        row_tokens=int(attention_mask.sum()),
        packed_tokens=sum(len(tokens) for tokens, _, _ in sequences),
    )
