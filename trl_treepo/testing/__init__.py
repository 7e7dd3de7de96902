"""Offline helpers for tests, examples, benchmarks and the learning study; nothing here touches the Hugging Face Hub.

- `models.py`: the offline Qwen tokenizer and tiny random-init models of the families users train;
- `tasks.py`: reasoning-gym problems with `\\boxed{}` answers, and worked answers for the warm-up;
- `warmup.py`: the SFT warm-up that makes a tiny model answer and stop like a real policy;
- `tools.py`: an offline tool task (a calculator) for agentic trees;
- `engines.py`: a scripted segment engine that drives the sampler without a model;
- `servers.py`: a real `vllm serve` on loopback.
"""

from .engines import ContinuingEngine, OutOfOrderEngine, ScriptedEngine
from .models import QWEN2_5_SPECIAL_TOKENS, TINY_FAMILIES, build_qwen_tokenizer, make_tiny_model, tiny_config
from .servers import free_port, start_vllm_server, vllm_server_command
from .tasks import (
    SYSTEM_PROMPT,
    ReasoningTask,
    left_to_right,
    make_math_dataset,
    make_synthetic_dataset,
    reduction_steps,
    worked_steps,
)
from .tools import (
    TOOL_SYSTEM_PROMPT,
    TOOL_TASK_CONFIG,
    calculate,
    counting_calculator,
    final_answer_reward,
    make_tool_dataset,
    tool_transcript,
)
from .warmup import make_warm_model

__all__ = [
    "QWEN2_5_SPECIAL_TOKENS",
    "ReasoningTask",
    "SYSTEM_PROMPT",
    "TINY_FAMILIES",
    "TOOL_SYSTEM_PROMPT",
    "TOOL_TASK_CONFIG",
    "ContinuingEngine",
    "OutOfOrderEngine",
    "ScriptedEngine",
    "build_qwen_tokenizer",
    "calculate",
    "counting_calculator",
    "final_answer_reward",
    "free_port",
    "left_to_right",
    "make_math_dataset",
    "make_synthetic_dataset",
    "make_tiny_model",
    "make_tool_dataset",
    "make_warm_model",
    "reduction_steps",
    "start_vllm_server",
    "tiny_config",
    "tool_transcript",
    "vllm_server_command",
    "worked_steps",
]
