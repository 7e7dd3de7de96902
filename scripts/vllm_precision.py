"""The same weights sampled by vLLM in bfloat16 and in float32: held-out sampled accuracy of a learning preset's warm
model (docs/learning.md, "vLLM sampled a bfloat16 copy of the policy").

vLLM's `dtype="auto"` downcasts a float32 checkpoint to bfloat16 on a CPU, which is what TRL's colocated engine gets.

    python scripts/vllm_precision.py WARM_MODEL_DIR bfloat16
    python scripts/vllm_precision.py WARM_MODEL_DIR float32 [--preset chains]
"""

import argparse
import json


def main() -> None:
    from vllm import LLM, SamplingParams

    from trl_treepo.learning import PRESETS, clustered_mean_and_se, held_out_problems, task_of

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("dtype", choices=["bfloat16", "float32"])
    parser.add_argument("--preset", default="chains", choices=sorted(PRESETS))
    args = parser.parse_args()
    setting = PRESETS[args.preset]
    task = task_of(setting)
    held_out = held_out_problems(setting, task)
    spec = setting.held_out
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512 + spec["max_new_tokens"], seed=0,
              gpu_memory_utilization=0.1, max_num_batched_tokens=4096)  # fmt: skip
    params = SamplingParams(n=spec["samples"], temperature=1.0, max_tokens=spec["max_new_tokens"], seed=0)
    prompts = [task.prompt(entry) for _, entry in held_out]
    if task.conversational:
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    per_problem = [[float(task.correct(sample.text, entry)) for sample in output.outputs]
                   for output, (_, entry) in zip(outputs, held_out)]  # fmt: skip
    mean, se = clustered_mean_and_se(per_problem)
    print(json.dumps({"dtype": args.dtype, "sampled": mean, "sampled_se": se, "problems": len(held_out)}))


if __name__ == "__main__":
    main()
