"""nbcustom's DPO loss (engines/llm/preference.py: packed sequences, the frozen head's chunked
log-probabilities, reference log-probabilities computed once) equals TRL's ``DPOTrainer``
loss (padded batch, its fused LM head, the reference by disabling the adapter each step) on
the same token ids, with the same policy and reference, in float32 on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import feedback_task
from nbcustom import models
from nbcustom.engines.llm import pack as llm_pack
from nbcustom.engines.llm.data import Example
from nbcustom.engines.llm.generate import adapted, lora_config
from nbcustom.engines.llm.preference import Item, Objective

BETA = 0.1
ROWS = 4


def _conversational(frame) -> list[dict]:
    """TRL's conversational preference format."""
    return [
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])
    ]


def _sequence(row: int, prompt: list[int], completion: list[int]) -> Example:
    """An nbcustom training sequence of exactly TRL's token ids."""
    return Example(row, "", "", None, ids=prompt + completion, labels=[llm_pack.IGNORE] * len(prompt) + completion, prompt_length=len(prompt))


def test_dpo_loss_equals_trls_dpo_trainer_on_a_fixed_batch(tiny, tmp_path):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # a copy of its own: TRL patches the model's forward (its fused LM head) and config,
    # which the kernel's shared copy must not keep for later tests
    model, tokenizer = models.load_llm(Path(tiny), "cpu", "float32", shared=False)
    data = Dataset.from_list(_conversational(feedback_task.pairs(ROWS)))
    args = DPOConfig(
        output_dir=str(tmp_path), beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
        per_device_train_batch_size=ROWS, max_length=2048, bf16=False, use_cpu=True, gradient_checkpointing=False,
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )
    torch.manual_seed(0)  # peft draws lora_A at random
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        trainer = DPOTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer)
        assert trainer.model is peft_model and trainer.ref_model is None
        # TRL copies a PeftModel's adapter as its reference ("ref"); without it, the reference
        # is the model with its adapter disabled, as the brief of this test (and nbcustom's
        # run from the base model) has it
        if "ref" in peft_model.peft_config:
            peft_model.delete_adapter("ref")
        assert list(peft_model.peft_config) == ["default"]
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # a non-zero adapter: the policy is not the reference
                    p.normal_(std=0.05)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

        tokenized = [trainer.train_dataset[i] for i in range(ROWS)]
        batch = trainer._prepare_inputs(trainer.data_collator(tokenized))
        longest = max(len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) for t in tokenized)
        assert batch["input_ids"].shape == (2 * ROWS, longest)  # nothing truncated
        peft_model.train()
        trl_loss = trainer.compute_loss(peft_model, batch)
        trl_grads = torch.autograd.grad(trl_loss, params)
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

        items = [
            Item(i, [_sequence(i, t["prompt_ids"], t["chosen_ids"]), _sequence(i, t["prompt_ids"], t["rejected_ids"])])
            for i, t in enumerate(tokenized)
        ]
        objective = Objective("dpo", BETA, likelihood=False, pad_id=tokenizer.pad_token_id)
        # ``reference`` scores with the model as given: in a run, the new adapter is still the
        # identity then; here the adapter is not, so it is disabled for the reference
        with peft_model.disable_adapter():
            objective.reference(peft_model, items)
        policy = []  # the policy's summed log-probabilities, seen on the way (no extra pass)
        logps = objective._logps

        def seen(model, group, which):
            sums, counts = logps(model, group, which)
            policy.append(sums.detach().view(-1, 2))  # per item: chosen, rejected
            return sums, counts

        objective._logps = seen
        peft_model.train()
        out = objective.losses(peft_model, items)
        ours = out["loss"].mean()
        our_grads = torch.autograd.grad(ours, params)
    (sums,) = policy
    chosen, rejected = sums[:, 0], sums[:, 1]
    ref = torch.tensor([item.reference for item in items])

    print(f"loss: TRL {trl_loss.item():.6f}, nbcustom {ours.item():.6f} (log 2 = {math.log(2):.6f}); reward margin: TRL {logged['rewards/margins']:.5f}, nbcustom {float(out['reward'].mean()):.5f}")
    # the policy differs from the reference, so the loss is not the untrained log 2
    assert abs(trl_loss.item() - math.log(2)) > 1e-3
    # where a difference would come from: the policy's and the reference's log-likelihoods
    assert float(chosen.mean()) == pytest.approx(logged["logps/chosen"], rel=1e-5, abs=1e-3)
    assert float(rejected.mean()) == pytest.approx(logged["logps/rejected"], rel=1e-5, abs=1e-3)
    assert float(BETA * (chosen - ref[:, 0]).mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-4)
    assert float(BETA * (rejected - ref[:, 1]).mean()) == pytest.approx(logged["rewards/rejected"], abs=1e-4)
    assert float(out["reward"].mean()) == pytest.approx(logged["rewards/margins"], abs=1e-4)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    # and the gradient each side trains on
    flat_trl, flat_ours = torch.cat([g.flatten() for g in trl_grads]), torch.cat([g.flatten() for g in our_grads])
    apart = float((flat_ours - flat_trl).norm() / flat_trl.norm())
    print(f"LoRA gradient: |nbcustom - TRL| / |TRL| = {apart:.2e}")
    assert flat_trl.norm() > 0 and apart < 1e-3
