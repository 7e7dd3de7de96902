"""Pictures of one rollout tree: segments, branching, finish reasons, rewards and advantages, as self-contained SVG.

    from trl_treepo.visualize import render_tree_html
    html = render_tree_html(leaves, segment_length=512, decode=tokenizer.decode, rewards=r, advantages=a)

Nodes are drawn left to right by depth; each box is one segment, labelled with the start of its text (hover for
all of it). Leaves end in a tag with their finish reason, reward and advantage, coloured by the advantage's sign.
Leaves that came from a fallback are marked with ↺. `TreePOTrainer` writes one tree per generation step to
`<output_dir>/trees/` when `log_completions=True`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from .tree import Leaf

_BOX_W, _BOX_H, _GAP_X, _ROW_H, _TAG_W = 150, 30, 36, 40, 190


def _layout(leaves: Sequence[Leaf]):
    """Node → (depth, y, a leaf through it), with leaves in depth-first order and parents centred on children."""
    order = sorted(range(len(leaves)), key=lambda i: leaves[i].nodes)
    rows: dict[tuple, list[float]] = {}
    through: dict[tuple, int] = {}
    for row, index in enumerate(order):
        nodes = leaves[index].nodes
        for depth in range(1, len(nodes) + 1):
            rows.setdefault(nodes[:depth], []).append(row)
            through.setdefault(nodes[:depth], index)
    positions = {key: (len(key), sum(ys) / len(ys)) for key, ys in rows.items()}
    return order, positions, through


def _color(advantage: float | None) -> str:
    if advantage is None or advantage != advantage:
        return "#9e9e9e"
    return "#2e7d32" if advantage > 0 else "#c62828" if advantage < 0 else "#616161"


def render_tree_svg(
    leaves: Sequence[Leaf],
    segment_length: int,
    decode: Callable[[Sequence[int]], str] | None = None,
    rewards: Sequence[float] | None = None,
    advantages: Sequence[float] | None = None,
    title: str = "",
) -> str:
    """One prompt's leaves as an SVG tree. `rewards` and `advantages` are per leaf, in the order of `leaves`."""
    if not leaves:
        raise ValueError("render_tree_svg needs at least one leaf.")
    if len({leaf.prompt_index for leaf in leaves}) != 1:
        raise ValueError("render_tree_svg draws one prompt's tree; pass the leaves of a single prompt.")
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    order, positions, through = _layout(leaves)
    depth = max(leaf.depth for leaf in leaves)
    top = 44 if title else 16
    width = 60 + depth * (_BOX_W + _GAP_X) + _TAG_W
    height = top + len(leaves) * _ROW_H + 16

    def xy(key):
        level, row = positions[key]
        return 40 + (level - 1) * (_BOX_W + _GAP_X) + _GAP_X, top + row * _ROW_H

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="ui-monospace, Menlo, monospace" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        parts.append(f'<text x="12" y="24" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    root_y = top + (len(leaves) - 1) * _ROW_H / 2
    parts.append(f'<circle cx="24" cy="{root_y + _BOX_H / 2}" r="7" fill="#37474f"><title>prompt</title></circle>')
    for key in sorted(positions, key=len):
        x, y = xy(key)
        if len(key) == 1:
            px, py = 31, root_y + _BOX_H / 2
        else:
            parent_x, parent_y = xy(key[:-1])
            px, py = parent_x + _BOX_W, parent_y + _BOX_H / 2
        parts.append(
            f'<path d="M{px},{py} C{px + _GAP_X / 2},{py} {x - _GAP_X / 2},{y + _BOX_H / 2} {x},{y + _BOX_H / 2}" '
            'stroke="#90a4ae" fill="none"/>'
        )
        leaf = leaves[through[key]]
        level = len(key) - 1
        start, end = leaf.segment_bounds(segment_length)[level]
        text = decode(leaf.token_ids[start:end])
        label = " ".join(text.split())
        label = label[:21] + "…" if len(label) > 22 else label
        parts.append(
            f'<g><title>{html.escape(text)}</title><rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="5" '
            f'fill="#eceff1" stroke="#78909c"/><text x="{x + 6}" y="{y + 19}">{html.escape(label)}</text></g>'
        )
    for index in order:
        leaf = leaves[index]
        x, y = xy(leaf.nodes)
        advantage = None if advantages is None else float(advantages[index])
        reward = None if rewards is None else float(rewards[index])
        tag = leaf.finish_reason.value + (" ↺" if leaf.from_fallback else "")
        if reward is not None:
            tag += f"  R={reward:+.2f}"
        if advantage is not None:
            tag += f"  A={advantage:+.2f}"
        parts.append(
            f'<text x="{x + _BOX_W + 8}" y="{y + 19}" fill="{_color(advantage)}">{html.escape(tag)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def render_tree_html(leaves: Sequence[Leaf], segment_length: int, decode=None, rewards=None, advantages=None,
                     title: str = "", prompt_text: str | None = None) -> str:
    """`render_tree_svg` in a self-contained HTML page, with the prompt text above the tree."""
    svg = render_tree_svg(leaves, segment_length, decode, rewards, advantages, title)
    prompt = f"<pre>{html.escape(prompt_text)}</pre>" if prompt_text else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or 'TreePO rollout')}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:16px}pre{white-space:pre-wrap;background:#f5f5f5;"
        f"padding:8px}}</style></head><body>{prompt}{svg}</body></html>"
    )
