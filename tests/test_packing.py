"""Tree-packed training: the packed forward gives the unpacked per-token log-probs, losses and gradients."""

import pytest
import torch
from test_trainer import reward_length, tiny_args, train
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_treepo import TreePOTrainer
from trl_treepo.packing import pack_rows
from trl_treepo.testing import make_math_dataset


def layout(rows):
    """TRL's row layout: prompts left-padded, completions right-padded."""
    prompt_width = max(len(p) for p, _ in rows)
    width = max(max(len(c) for _, c in rows), 1)
    ids = torch.zeros(len(rows), prompt_width + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(rows):
        ids[row, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
        mask[row, prompt_width - len(prompt) : prompt_width] = 1
        if completion:
            ids[row, prompt_width : prompt_width + len(completion)] = torch.tensor(completion)
            mask[row, prompt_width : prompt_width + len(completion)] = 1
    return ids, mask, width


def test_packing_stores_each_shared_prefix_once_and_copies_branch_points():
    prompt = [11, 12, 13]
    rows = [(prompt, [1, 2, 3]), (prompt, [1, 2, 4]), (prompt, [1, 5]), (prompt, [6]), ([7, 8], [9])]
    ids, mask, width = layout(rows)
    packed = pack_rows(ids, mask, width)
    assert packed.input_ids.size(0) == 2  # one sequence per prompt
    # first prompt: 3 tokens + the unique completion tokens {1, 2, 3, 4, 5, 6}, plus one copy per extra child of
    # the branch points 13 (children 1 and 6), 1 (children 2 and 5) and 2 (children 3 and 4): 12; second: 3
    assert packed.packed_tokens == 12 + 3 and packed.row_tokens == 6 + 6 + 5 + 4 + 3
    first = packed.input_ids[0].tolist()
    labels = packed.shift_labels[0].tolist()
    # every completion token is predicted by exactly one labelled position
    assert sorted(label for label in labels if label != -100) == [1, 2, 3, 4, 5, 6]
    # a row's predictors carry its tokens as labels, in order
    for row, (_, completion) in enumerate(rows[:4]):
        positions = packed.predictor[row, : len(completion)].tolist()
        assert [labels[p] for p in positions] == completion
        assert [first[p] for p in positions[1:]] == completion[:-1]  # each is (a copy of) the previous token
    # a copy sees exactly what the node it copies sees, except itself
    seen = packed.attention_mask[0, 0]
    copies = [p for p in range(len(first)) if first.count(first[p]) > 1 and p > first.index(first[p])]
    for copy in copies:
        original = first.index(first[copy])
        assert packed.position_ids[0, copy] == packed.position_ids[0, original]
        assert torch.equal(seen[copy].nonzero().flatten()[:-1], seen[original].nonzero().flatten()[:-1])
        assert not seen[:, copy].sum() > 1  # nothing attends to a copy but itself


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_log_probs_and_entropies_equal_the_unpacked_ones(tiny_model, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, 8000, (n,), generator=generator).tolist()

    rows = []
    for prompt in (tokens(5), tokens(9)):
        left, right = tokens(4), tokens(4)
        rows += [(prompt, left + tokens(3)), (prompt, left + tokens(2)), (prompt, right + tokens(4)), (prompt, right),
                 (prompt, right), (prompt, tokens(1))]  # fmt: skip
    ids, mask, width = layout(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-width] = -100
    unpacked = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    packed = pack_rows(ids, mask, width)
    output = model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask if attention == "sdpa" else packed.additive_mask(torch.float32),
        position_ids=packed.position_ids,
        shift_labels=packed.shift_labels,
        fused_lm_head=True,
    )
    valid = mask[:, -width:].bool()
    torch.testing.assert_close(packed.unpack(output.log_probs)[valid], unpacked.log_probs[:, -width:][valid],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(packed.unpack(output.entropy)[valid], unpacked.entropy[:, -width:][valid],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert (packed.unpack(output.log_probs)[~valid] == 0).all()
    assert packed.packed_tokens < packed.row_tokens


def loss_and_gradients(trainer, inputs, packed):
    trainer.args.tree_packed_training = packed
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


LOSS_CASES = [(loss, "sdpa") for loss in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")]


@pytest.mark.parametrize("loss_type, attention", LOSS_CASES + [("dapo", "eager")])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tiny_model, tmp_path, loss_type, attention):
    dataset = make_math_dataset(size=4)
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_length,
        args=tiny_args(tmp_path, loss_type=loss_type, beta=0.05, top_entropy_quantile=0.8, num_iterations=2,
                       model_init_kwargs={"attn_implementation": attention}),
        train_dataset=dataset,
    )
    assert trainer.model.config._attn_implementation == attention
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which this test bypasses
    inputs = trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    assert inputs["advantages"].abs().sum() > 0
    with torch.no_grad():  # a second iteration over the batch, so that ratios and clipping are not all trivial
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unpacked_loss, unpacked = loss_and_gradients(trainer, inputs, packed=False)
    packed_loss, packed = loss_and_gradients(trainer, inputs, packed=True)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-4, atol=1e-6)
    assert packed.keys() == unpacked.keys() and len(packed) > 0
    for name, gradient in unpacked.items():
        torch.testing.assert_close(packed[name], gradient, rtol=1e-3, atol=1e-6, msg=name)
    assert trainer._metrics["train"]["tree/packed_token_ratio"][-1] < 1.0


def lora():
    from peft import LoraConfig

    return {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")}


@pytest.mark.parametrize(
    "overrides, trainer_kwargs",
    [({}, None), ({"gradient_checkpointing": True}, None), ({}, "lora")],
    ids=["plain", "gradient_checkpointing", "lora"],
)
def test_packed_training_trains_and_logs_its_sharing(tiny_model, tmp_path, overrides, trainer_kwargs):
    _, logs, changed, _ = train(tiny_model, tmp_path, max_steps=2, tree_packed_training=True,
                                trainer_kwargs=lora() if trainer_kwargs == "lora" else None, **overrides)  # fmt: skip
    assert changed
    assert all(0 < entry["tree/packed_token_ratio"] < 1 for entry in logs)


def test_attention_that_cannot_take_a_tree_mask_falls_back_with_a_warning(tiny_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(TreePOTrainer, "_PACKABLE_ATTENTION", ("eager",))  # the tiny model runs sdpa
    with caplog.at_level("WARNING", logger="trl_treepo.trainer"):
        _, logs, changed, _ = train(tiny_model, tmp_path, max_steps=1, tree_packed_training=True)
    assert changed and "tree/packed_token_ratio" not in logs[0]
    assert any("falls back to the unpacked forward" in r.getMessage() and "'sdpa'" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_packed_log_probs_respect_trls_memory_chunks(tiny_model, tmp_path):
    dataset = make_math_dataset(size=4)
    trainer = TreePOTrainer(model=tiny_model, reward_funcs=reward_length, args=tiny_args(tmp_path), train_dataset=dataset)
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    results = {}
    for packed, batch_size in [(False, None), (True, None), (True, 3)]:
        trainer.args.tree_packed_training = packed
        with torch.no_grad():
            results[(packed, batch_size)] = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, width, batch_size=batch_size, compute_entropy=True
            )
    valid = inputs["completion_mask"].bool()
    for key in [(True, None), (True, 3)]:
        for got, want in zip(results[key][:2], results[(False, None)][:2]):
            torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
