"""Packing and the chunked LM-head loss give what the plain padded computation gives.

The speed of ``%%finetune`` comes from these two mechanisms (tests/benchmarks/
bench_finetune_cpu.py measures it); here they are checked for correctness on the real
SmolLM2 with a LoRA adapter, in float32 on CPU.
"""

from __future__ import annotations

import pytest

from nbcustom import models
from nbcustom.engines.llm import data as llm_data, pack as llm_pack, precision
from nbcustom.engines.llm.generate import adapted, lora_config


def _examples(lengths=(3, 40, 9, 25, 1)):
    _, tokenizer = models.load_llm(models.resolve_llm(None))
    found = []
    for i, n in enumerate(lengths):
        prompt = " ".join(["word"] * n) + f" number {i}?"
        response = " ".join(["answer"] * (n % 7 + 1))
        found.append(llm_data.encode(tokenizer, llm_data.Example(i, prompt, response, "Be brief.")))
    return found


def _padded(items, pad_id):
    """The batch a plain transformers script trains on: right-padded ids, mask and labels."""
    import torch

    width = max(len(e) for e in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, : len(e)], labels[row, : len(e)], mask[row, : len(e)] = torch.tensor(e.ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_linear_cross_entropy_matches_full_logits_in_loss_and_gradients():
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 100, (50,))
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    chunked = llm_pack.linear_cross_entropy(hidden, weight, targets, chunk=7)  # 8 chunks, the last short
    grads = torch.autograd.grad(chunked * 3.0, (hidden, weight))
    assert torch.allclose(chunked, full, rtol=1e-10)
    assert torch.allclose(grads[0], 3.0 * full_grads[0], atol=1e-10)
    assert torch.allclose(grads[1], 3.0 * full_grads[1], atol=1e-10)
    with torch.no_grad():  # evaluation computes no gradients
        assert torch.allclose(llm_pack.linear_cross_entropy(hidden, weight, targets, chunk=64), full)


def test_pack_places_every_example_once_with_restarting_positions_and_shifted_targets():
    items = [llm_data.Example(i, "", "", None, list(range(10 * i, 10 * i + n)), [-100] * 2 + list(range(10 * i + 2, 10 * i + n))) for i, n in enumerate([6, 3, 5, 2, 4])]
    batch = llm_pack.pack(items, capacity=8, pad_id=-1)
    ids, positions, targets = (batch[k].tolist() for k in ("input_ids", "position_ids", "targets"))
    assert batch["tokens"] == 20 and len(ids) == 3 and max(len(r) for r in ids) <= 8  # 20 tokens need 3 rows of 8
    placed = sorted(tuple(r[s:s + len(e.ids)]) for r in ids for e in items for s in range(len(r)) if r[s:s + len(e.ids)] == e.ids)
    assert placed == sorted(tuple(e.ids) for e in items)
    for row_ids, row_pos, row_targets in zip(ids, positions, targets):
        for s, token in enumerate(row_ids):
            if token == -1:  # padding carries no loss
                assert row_targets[s] == -100
                continue
            e = next(e for e in items if token in e.ids)
            k = e.ids.index(token)
            assert row_pos[s] == k  # positions restart at 0 in each example
            assert row_targets[s] == (e.labels[k + 1] if k + 1 < len(e.ids) else -100)  # never the neighbour's token


def test_packed_examples_do_not_attend_across_each_other():
    import torch

    model, tokenizer = models.load_llm(models.resolve_llm(None))
    first, second = _examples((12, 30))
    changed = llm_data.Example(0, "", "", None, [t + 1 for t in first.ids], first.labels)

    def hidden_of(items, capacity):
        batch = llm_pack.pack(items, capacity, tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return batch, out

    batch, together = hidden_of([first, second], capacity=200)
    assert batch["input_ids"].shape[0] == 1  # both in one row: the longer first
    _, alone = hidden_of([second], capacity=200)
    _, neighbour_changed = hidden_of([changed, second], capacity=200)
    n = len(second.ids)
    assert torch.allclose(together[0, :n], alone[0, :n], atol=1e-4)
    assert torch.allclose(neighbour_changed[0, :n], together[0, :n], atol=1e-5)
    # and the first example, placed after the second, sees only itself
    _, first_alone = hidden_of([first], capacity=200)
    assert torch.allclose(together[0, n:n + len(first.ids)], first_alone[0, : len(first.ids)], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [64, 512])  # several rows / one row
def test_packed_loss_and_gradients_equal_the_padded_batch(capacity):
    import torch

    model, tokenizer = models.load_llm(models.resolve_llm(None))
    items = _examples()
    torch.manual_seed(0)
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        peft_model.eval()  # no dropout: both computations see the same weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter, so its gradients are not trivial
                torch.nn.init.normal_(p, std=0.02)
        params = [p for p in peft_model.parameters() if p.requires_grad]

        padded = _padded(items, tokenizer.pad_token_id)
        reference = peft_model(**padded).loss  # transformers' own loss on a padded batch
        reference_grads = torch.autograd.grad(reference, params)

        batch = llm_pack.pack(items, capacity, tokenizer.pad_token_id)
        loss, count = llm_pack.causal_lm_loss(peft_model, batch, chunk=16)
        grads = torch.autograd.grad(loss, params)
        # the training step: one micro-batch per row, gradients accumulated
        step_loss = llm_pack.backward(peft_model, batch, max_tokens=1).item()
        accumulated = [p.grad.clone() for p in params]
        peft_model.zero_grad(set_to_none=True)
        # the rows dealt to two threads side by side (a CPU step of short rows)
        threads, seen = torch.get_num_threads(), set()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(llm_pack, "causal_lm_loss", _noting_thread(llm_pack.causal_lm_loss, seen))
            streamed_loss = llm_pack.backward(peft_model, batch, max_tokens=512, streams=2).item()
        streamed = [p.grad.clone() for p in params]
        assert torch.get_num_threads() == threads  # the threads' share is given back

    assert len(seen) == (2 if len(batch["used"]) > 1 else 1)

    assert count == int((padded["labels"][:, 1:] != -100).sum())
    assert batch["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    assert abs(loss.item() - reference.item()) < 1e-4 * reference.item()
    assert abs(step_loss - reference.item()) < 1e-4 * reference.item()
    assert abs(streamed_loss - reference.item()) < 1e-4 * reference.item()
    for got, summed, side_by_side, want in zip(grads, accumulated, streamed, reference_grads):  # float32 sums in another order: ~1e-4
        assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-3
        assert (summed - want).norm() / want.norm() < 1e-3
        assert (side_by_side - want).norm() / want.norm() < 1e-3


def _sequence(prompt: list[int], answer: list[int]) -> llm_data.Example:
    """A training sequence of token ids: the loss on the answer only."""
    return llm_data.Example(0, "", "", None, prompt + answer, [-100] * len(prompt) + answer, len(prompt))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask, and one added to the scores
def test_pairs_sharing_their_prefix_score_what_they_score_apart(tiny, attention):
    """DPO's chosen and rejected answer packed with their common prefix once (``pack_pairs``)
    give each sequence's summed log-probability, token count and LoRA gradients of packing
    them apart: the rejected answer's tokens see the prefix but not the chosen answer, and
    the prefix's targets (the last one predicting each answer's own next token) count for both."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)

    def tokens(n):
        return [rng.randrange(1, 1000) for _ in range(n)]

    prompt, short, common = tokens(40), tokens(6), tokens(3)
    pairs = [
        [_sequence(prompt, common + tokens(20)), _sequence(prompt, common + tokens(15))],  # a row of its own
        [_sequence(short, tokens(4)), _sequence(short, tokens(5))],  # no answer token in common
        [_sequence(short, common + tokens(2)), _sequence(short, common)],  # the rejected answer is a prefix of the chosen
        [_sequence(short, common), _sequence(short, common + tokens(2))],  # and the other way round
        [_sequence(tokens(5), tokens(3)), _sequence(tokens(4), tokens(4))],  # not even the first token
    ]
    assert [llm_pack._common(first.ids, second.ids) for first, second in pairs] == [43, 6, 9, 9, 0]
    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation=attention)
    torch.manual_seed(0)
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        peft_model.eval()
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter, so its gradients are not trivial
                torch.nn.init.normal_(p, std=0.5)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        weights = torch.randn(2 * len(pairs))  # a loss in which every sequence counts differently
        shared = llm_pack.pack_pairs(pairs, pad_id=0)
        apart = llm_pack.pack([s for pair in pairs for s in pair], 0, pad_id=0)
        results = []
        for batch in (shared, apart):
            sums, counts = llm_pack.sequence_logps(peft_model, batch, 2 * len(pairs))
            results.append((sums.detach(), counts, torch.autograd.grad((sums * weights).sum(), params)))
    (sums, counts, grads), (want_sums, want_counts, want_grads) = results
    assert shared["input_ids"].shape[0] == 2 and shared["input_ids"].numel() < apart["input_ids"].numel()  # the short pairs share a row
    assert counts.tolist() == want_counts.tolist() == [len(s.ids) - s.prompt_length for pair in pairs for s in pair]
    assert torch.allclose(sums, want_sums, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-4


def test_rows_side_by_side_are_split_where_the_widest_share_is_smallest():
    """Rows of similar width go to the same thread: each thread's pass is as wide as its widest
    row, so dealing rows in turn would give both threads the widest rows."""
    used = [78, 50, 48, 46, 44, 42]
    assert llm_pack._balanced(used, 2) == [[0, 1], [2, 3, 4, 5]]  # widest passes 2 x 78 and 4 x 48 tokens
    assert max(len(used[i::2]) * used[i] for i in (0, 1)) == 3 * 78  # rows dealt in turn: 3 x 78
    for used, count in (([5, 5, 5, 5], 3), ([9, 2, 7], 2), ([10], 2), (list(range(40, 0, -1)), 4)):
        groups = llm_pack._balanced(used, count)
        assert sorted(i for g in groups for i in g) == list(range(len(used))) and len(groups) <= count
    assert llm_pack._balanced([9, 2, 7], 2) == [[0], [2, 1]]  # widest first, whatever the packing order: 9 | 7 + 2


def _noting_thread(loss, seen: set):
    """``causal_lm_loss`` that notes which thread called it."""
    import threading

    def noted(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return loss(*args, **kwargs)
    return noted


def test_accelerated_layers_give_the_same_loss_and_are_undone_on_exit():
    """``%%finetune --compile``: compiled decoder layers (here with torch.compile's
    ``aot_eager`` backend, which traces like inductor but skips code generation, to stay fast
    on CPU) give the same loss, and the shared base model is plain again afterwards."""
    import torch

    model, tokenizer = models.load_llm(models.resolve_llm(None))
    items = _examples((5, 17))
    batch = llm_pack.pack(items, 512, tokenizer.pad_token_id)
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        peft_model.eval()
        with torch.no_grad():
            plain, _ = llm_pack.causal_lm_loss(peft_model, batch)
            with llm_pack.accelerated(peft_model, None, backend="aot_eager"):
                assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
                fast, _ = llm_pack.causal_lm_loss(peft_model, batch)
    assert abs(fast.item() - plain.item()) < 1e-5 * plain.item()
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not precision.cpu_features().native_bf16, reason="this CPU has no native bf16 (amx_bf16 or avx512_bf16)")
def test_bf16_step_gives_the_fp32_loss_and_lora_gradients_within_bf16_rounding():
    """``--precision bf16`` on CPU: the training step under bf16 autocast (float32 base and
    LoRA weights) against the float32 step on the same packed batch."""
    import torch

    model, tokenizer = models.load_llm(models.resolve_llm(None))
    batch = llm_pack.pack(_examples(), 64, tokenizer.pad_token_id)
    torch.manual_seed(0)
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        peft_model.eval()
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        fp32 = llm_pack.backward(peft_model, batch, max_tokens=512).item()
        fp32_grads = [p.grad.clone() for p in params]
        peft_model.zero_grad(set_to_none=True)
        with precision.choose("cpu", "bf16").computing(peft_model):
            bf16 = llm_pack.backward(peft_model, batch, max_tokens=512).item()
            bf16_grads = [p.grad.clone() for p in params]
            peft_model.zero_grad(set_to_none=True)
            side_by_side = llm_pack.backward(peft_model, batch, max_tokens=512, streams=2).item()  # the training loop's
        side_by_side_grads = [p.grad.clone() for p in params]
    assert all(p.dtype == torch.float32 for p in params)  # adapters (and their gradients) stay float32
    assert abs(bf16 - fp32) < 0.02 * fp32  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    total = torch.cat([g.flatten() for g in fp32_grads]).norm()
    assert (torch.cat([g.flatten() for g in bf16_grads]) - torch.cat([g.flatten() for g in fp32_grads])).norm() < 0.1 * total
    cosines = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(bf16_grads, fp32_grads) if b.norm() > 0]
    assert min(cosines) > 0.9 and bf16 != fp32  # close, and really computed in another precision
    assert abs(side_by_side - fp32) < 0.02 * fp32  # two threads, each with its own bf16 input copies
    cosines = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(side_by_side_grads, fp32_grads) if b.norm() > 0]
    assert min(cosines) > 0.9
