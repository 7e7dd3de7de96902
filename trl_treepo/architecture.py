"""What a model's architecture allows: reusing a node's cache for its children, and packing a tree exactly.

Both need every layer to be full causal attention over a plain key/value cache. Packing also needs positions that
enter attention only through their differences (rotary embeddings), because a packed token's position is its depth,
while the same token in an unpacked, left-padded row sits further right. Each check returns why not, or None.
"""

from __future__ import annotations

# Rotary variants whose scores depend only on position differences. "dynamic" and "longrope" rescale with the
# sequence length, which differs between a packed sequence and an unpacked row.
RELATIVE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def non_full_attention_layers(model) -> str | None:
    """Why some layer is not full attention over a plain KV cache (sliding window, convolution, Mamba, linear
    attention), read from the cache layout transformers builds for the model's config; None if all are."""
    from transformers import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as error:  # a config the generic cache cannot describe
        return f"its cache layout is unknown ({type(error).__name__}: {error})"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    return f"it has {', '.join(kinds)} layers (not all full attention)" if kinds else None


def attention_layer_count(model) -> int:
    """How many attention layers a forward of `model` runs: one per layer of the KV cache transformers builds for it."""
    from transformers import DynamicCache

    try:
        return len(DynamicCache(config=model.config).layers)
    except Exception:  # a config the generic cache cannot describe: its declared layers
        return model.config.get_text_config().num_hidden_layers


def non_relative_positions(model) -> str | None:
    """Why positions may enter attention other than through their differences; None for plain rotary models."""
    import torch

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("position" in leaf or leaf in ("wpe", "embed_positions")):
            return f"it has absolute position embeddings ({name})"
    if not any(type(module).__name__.endswith("RotaryEmbedding") for module in model.modules()):
        return "it has no rotary position embedding"
    parameters = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    per_layer_type = parameters.values() if all(isinstance(v, dict) for v in parameters.values()) else [parameters]
    for rope in per_layer_type:
        rope_type = rope.get("rope_type", "default")
        if rope_type not in RELATIVE_ROPE_TYPES:
            return f"its rotary scaling {rope_type!r} depends on the sequence length"
    return None


def attention_extras(model) -> str | None:
    """Why attention scores are more than scaled dot products (logit soft-capping, attention sinks); None if not."""
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "its attention logits are soft-capped"
    for name, module in model.named_modules():
        if getattr(module, "sinks", None) is not None:
            return f"its attention has sinks ({name})"
    return None


def active_dropout(model) -> str | None:
    """Why a training forward of `model` draws dropout (a packed forward would share one draw between the leaves that
    share a prefix, where unpacked rows draw one each: not exact); None if it draws none."""
    import torch

    config = model.config.get_text_config()
    for name, value in vars(config).items():
        if name.startswith("summary_"):  # GPT-2's sequence-summary head, which a causal LM does not run
            continue
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value > 0:
            return f"its {name} is {value} (dropout in training is drawn per forward; set it to 0 to pack)"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{name} drops out with p={module.p} (dropout in training is drawn per forward; set it to 0 to pack)"
    return None


def packing_obstacle(model, attention_implementations) -> str | None:
    """Why a packed forward of `model` cannot be exact; None if it can (see `trl_treepo.packing`).

    `attention_implementations` are those whose attention function takes a tree layout.
    """
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in attention_implementations:
        return (
            f"attention implementation {attention!r} has no tree attention (load the model with "
            "attn_implementation='sdpa', which computes the same attention)"
        )
    return non_full_attention_layers(model) or non_relative_positions(model) or attention_extras(model)
