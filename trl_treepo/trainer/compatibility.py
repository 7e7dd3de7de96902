"""The GRPOTrainer methods `TreePOTrainer` overrides, checked at import against the signatures they were written for.

`TreePOTrainer` extends five private methods of `trl.GRPOTrainer` (and its model card) through `super()`. A TRL
release that renames one, or changes its arguments, would otherwise leave an override that is never called or that
passes its arguments to the wrong parameters: training would go on, silently without trees or with misplaced data.
Importing `trl_treepo` therefore fails at once, naming the method, what changed and the TRL versions this package
was tested with.
"""

from __future__ import annotations

import inspect

# TRL releases this package was written and tested against (pyproject.toml pins the same range;
# tests/test_trl_versions.py runs the parity test and a TreePO step on each).
SUPPORTED_TRL = ">=1.14.2,!=1.15.*,<1.17"

# Each overridden method's leading parameters, as TRL 1.15 and 1.16 define them; the override passes them on
# positionally. `_get_per_token_logps_and_entropies` then takes TRL's multimodal inputs as keywords, whatever their
# names; in TRL 1.14 it is a dispatcher, `(self, model, *args, batch_size, compute_aux_loss, **kwargs)`, whose
# unpacked path is `_full_logits_logps` with these same parameters, so that is the method checked there.
OVERRIDDEN = {
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"),
    "_tool_call_loop": ("self", "prompts", "prompt_ids", "completion_ids", "completions", "logprobs", "images",
                        "multimodal_fields"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_prepare_inputs": ("self", "generation_batch"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"),
    "create_model_card": ("self", "model_name", "dataset_name", "tags"),
}  # fmt: skip
WHOLE_SIGNATURE = set(OVERRIDDEN) - {"_get_per_token_logps_and_entropies"}


def signature_mismatches(trainer_class) -> list[str]:
    """What differs between `trainer_class`'s methods and the signatures `TreePOTrainer` overrides (empty: none)."""
    problems = []
    for name, expected in OVERRIDDEN.items():
        method = getattr(trainer_class, name, None)
        if method is None:
            problems.append(f"`{name}` no longer exists")
            continue
        actual = tuple(inspect.signature(method).parameters)
        if name == "_get_per_token_logps_and_entropies" and _forwards_positional_arguments(method):
            name, method = "_full_logits_logps", getattr(trainer_class, "_full_logits_logps", None)
            if method is None:
                problems.append("`_get_per_token_logps_and_entropies` forwards to `_full_logits_logps`, which is gone")
                continue
            actual = tuple(inspect.signature(method).parameters)
        compared = actual if name in WHOLE_SIGNATURE else actual[: len(expected)]
        if compared != expected:
            problems.append(f"`{name}{_signature(actual)}` was `{name}{_signature(expected)}`")
    return problems


def check_grpo_trainer(trainer_class, trl_version: str) -> None:
    """Raise `ImportError` when `trainer_class` (TRL's `GRPOTrainer`) is not the one `TreePOTrainer` was written for."""
    problems = signature_mismatches(trainer_class)
    if problems:
        raise ImportError(
            f"trl_treepo's TreePOTrainer overrides GRPOTrainer methods that TRL {trl_version} changed: "
            f"{'; '.join(problems)}. It supports TRL {SUPPORTED_TRL}; install a supported release "
            f"(`pip install 'trl{SUPPORTED_TRL}'`) or a trl_treepo release made for TRL {trl_version}."
        )


def _forwards_positional_arguments(method) -> bool:
    return any(parameter.kind is inspect.Parameter.VAR_POSITIONAL
               for parameter in inspect.signature(method).parameters.values())  # fmt: skip


def _signature(parameters) -> str:
    return "(" + ", ".join(parameters) + ")"
