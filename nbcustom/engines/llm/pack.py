"""Packed training batches and a cross-entropy that never holds the whole logits tensor.

Packing: a step's examples are placed first-fit-decreasing into rows of at most
``capacity`` tokens, so almost no compute goes to padding. Position ids restart at 0 for
each example; with no attention mask, transformers reads them as packed sequences and masks
attention block-diagonally (an example never sees its row neighbours). Targets are shifted
within each example, so no example predicts its neighbour's first token. Pairs of sequences
with a common prefix (DPO's chosen and rejected answer to one prompt) can share it instead
(``pack_pairs``): one row segment per pair, under an explicit attention mask.

Loss: only positions that carry a target go through the LM head, in chunks, and the
gradient with respect to the hidden states is computed chunk by chunk during the forward
pass (the head is frozen under LoRA); a (tokens x vocabulary) tensor is never stored.

Only torch and numpy are imported, so GPU benchmarks can load this file on its own.
"""

from __future__ import annotations

import contextlib
import functools

IGNORE = -100  # label of tokens that carry no loss (torch's CrossEntropyLoss default)
AUTOCAST = True  # on a GPU with half-precision weights (benchmarks turn it off to compare)


def pack(items, capacity: int, pad_id: int, width: int | None = None) -> dict:
    """A training batch of ``items`` (each with ``ids`` and ``labels`` lists) packed into rows,
    as CPU tensors: ``input_ids``, ``position_ids``, ``targets`` (next-token labels, IGNORE
    where none), ``owners`` (the position in ``items`` of each target's item), ``used``
    (real tokens per row) and ``tokens`` (their sum). Rows are as wide
    as the fullest row (at most ``capacity``, or the longest item if longer), or ``width``
    if given (fixed shapes for compiled models)."""
    import numpy as np
    import torch

    capacity = max(capacity, max(len(e.ids) for e in items))
    rows = _first_fit([len(e.ids) for e in items], capacity)
    trim, width = width is None, max(used for used, _ in rows) if width is None else max(width, capacity)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    owners = np.full((len(rows), width), -1, dtype=np.int64)
    for row, (used, members) in enumerate(rows):
        start = 0
        for index in members:
            e, n = items[index], len(items[index].ids)
            ids[row, start:start + n] = e.ids
            positions[row, start:start + n] = np.arange(n)
            targets[row, start:start + n - 1] = e.labels[1:]
            owners[row, start:start + n - 1] = index
            start += n
        # padding continues the last example's positions: nothing attends to it (it comes
        # last), and a row holding one example needs no mask at all (the fast causal path)
        positions[row, start:] = np.arange(n, n + width - start)
    return {
        "input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions), "targets": torch.from_numpy(targets),
        "owners": torch.from_numpy(owners), "used": [used for used, _ in rows], "trim": trim, "tokens": sum(len(e.ids) for e in items),
    }


def pack_pairs(pairs, pad_id: int) -> dict:
    """A batch of ``pairs`` of sequences (each ``ids`` and ``labels``) that computes each
    pair's common prefix once: the pair's part of its row holds the first sequence, then the
    second's tokens after the prefix, at the positions that follow the prefix and seeing
    only the prefix and themselves. CPU tensors: ``input_ids``, ``position_ids``,
    ``attention_mask`` (rows x 1 x width x width, True where a token may attend), and the
    targets listed rather than laid out, as a prefix token predicts for both sequences:
    ``at`` (flat positions, repeated for both), ``labels`` and ``owners`` (2 x the pair's
    index, plus 1 for its second sequence). Rows as in ``pack``, as wide as the longest pair."""
    import numpy as np
    import torch

    shared = [_common(first.ids, second.ids) for first, second in pairs]
    sizes = [len(first.ids) + len(second.ids) - n for (first, second), n in zip(pairs, shared)]
    rows = _first_fit(sizes, max(sizes))
    width = max(used for used, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), 1, width, width), dtype=bool)
    at, labels, owners = [], [], []
    for row, (_, members) in enumerate(rows):
        start = 0
        for index in members:
            (first, second), n, size = pairs[index], shared[index], sizes[index]
            ids[row, start:start + size] = first.ids + second.ids[n:]
            positions[row, start:start + size] = np.r_[0:len(first.ids), n:len(second.ids)]
            block = np.tril(np.ones((size, size), dtype=bool))
            block[len(first.ids):, n:len(first.ids)] = False  # the second sequence never sees the first's own tokens
            mask[row, 0, start:start + size, start:start + size] = block
            places = (np.arange(len(first.ids)), np.r_[0:n, len(first.ids):size])  # of each sequence's tokens
            for owner, e, place in ((2 * index, first, places[0]), (2 * index + 1, second, places[1])):
                targets = np.asarray(e.labels[1:], dtype=np.int64)  # token k predicts label k + 1
                kept = targets != IGNORE
                at.append(row * width + start + place[:-1][kept])
                labels.append(targets[kept])
                owners.append(np.full(int(kept.sum()), owner))
            start += size
        mask[row, 0, range(start, width), range(start, width)] = True  # padding sees itself (torch < 2.5's sdpa gives NaN where a token sees nothing)
    return {
        "input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions), "attention_mask": torch.from_numpy(mask),
        **{k: torch.from_numpy(np.concatenate(v).astype(np.int64)) for k, v in (("at", at), ("labels", labels), ("owners", owners))},
    }


def _common(a: list, b: list) -> int:
    """The length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _first_fit(lengths: list[int], capacity: int) -> list[list]:
    """First-fit decreasing: rows of [tokens used, indices of the lengths placed], each
    holding at most ``capacity`` tokens (at least the longest length)."""
    rows: list[list] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        free = next((r for r in rows if r[0] + lengths[index] <= capacity), None)
        if free is None:
            free = [0, []]
            rows.append(free)
        free[0] += lengths[index]
        free[1].append(index)
    return rows


def backward(model, batch: dict, max_tokens: int, streams: int = 1):
    """Backpropagate the batch's mean loss and return it (a tensor: reading it waits for
    the device). Rows go through the model in micro-batches of at most ``max_tokens``
    tokens (at least one row), each loss weighted by its share of the targets: the same
    gradient as one pass, with the activation memory of one micro-batch.

    ``streams`` > 1 (a CPU), when the rows fit one micro-batch (short rows, where a step is
    mostly per-operation overhead): the rows are split among that many threads (rows of
    similar width together, ``_balanced``), which share torch's threads and run side by
    side, and their gradients are added in a fixed order.
    One thread's Python and small operations then overlap the other's products instead of
    every operation waiting for all cores (tests/benchmarks/RESULTS.md). Longer rows keep
    one pass at a time: two would hold twice the activations."""
    total = int((batch["targets"] != IGNORE).sum())
    parts = list(_micro_batches(batch, max_tokens))
    groups = _balanced(batch["used"], streams) if streams > 1 and len(parts) == 1 else []
    if len(groups) > 1:
        return _side_by_side(model, [_rows(batch, rows) for rows in groups], max_tokens, total)
    loss_sum = 0.0
    for part in parts:
        loss, n = causal_lm_loss(model, part)
        if n:
            (loss * (n / total)).backward()
            loss_sum = loss_sum + loss.detach() * n
    return loss_sum / max(total, 1)


def shard(batch: dict, index: int, count: int) -> dict | None:
    """Every ``count``-th packed row of ``batch`` from row ``index`` (rows come fullest
    first, so the shares are even), or None if the batch has fewer rows."""
    rows = list(range(index, len(batch["used"]), count))
    return _rows(batch, rows) if rows else None


def _rows(batch: dict, rows: list[int]) -> dict:
    """The given packed rows of ``batch``."""
    return {
        **{k: batch[k][rows] for k in ("input_ids", "position_ids", "targets")},
        "used": [batch["used"][i] for i in rows], "trim": batch["trim"],
    }


def _balanced(used: list[int], count: int) -> list[list[int]]:
    """Row indices in at most ``count`` groups of consecutive widths (widest first), cut so
    that the largest group (rows x its widest row: what its pass computes) is smallest."""
    order = sorted(range(len(used)), key=lambda i: -used[i])
    widths = [used[i] for i in order]

    def groups(limit):  # each group takes rows while rows x its first width <= limit
        out, start = [], 0
        while start < len(order):
            size = max(1, limit // widths[start])
            out.append(order[start:start + size])
            start += size
        return out

    costs = sorted({widths[start] * size for start in range(len(order)) for size in range(1, len(order) - start + 1)})
    return groups(next(cost for cost in costs if len(groups(cost)) <= count))


def _micro_batches(batch: dict, max_tokens: int):
    """The batch's rows in consecutive groups of at most ``max_tokens`` tokens (at least one row)."""
    used, start = batch["used"], 0
    while start < len(used):
        stop = start + 1
        while stop < len(used) and (stop + 1 - start) * max(used[start:stop + 1]) <= max_tokens:
            stop += 1
        width = max(used[start:stop]) if batch["trim"] else batch["input_ids"].shape[1]
        yield {k: batch[k][start:stop, :width] for k in ("input_ids", "position_ids", "targets")}
        start = stop


def _side_by_side(model, shards: list[dict], max_tokens: int, total: int):
    """``backward`` over ``shards``, one thread each (the caller's runs the first), each with
    its share of torch's threads and the caller's autocast; the LoRA gradients are summed
    in shard order, so a run is repeatable."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    threads = torch.get_num_threads()
    autocast = {"device_type": "cpu", "dtype": torch.get_autocast_dtype("cpu"), "enabled": torch.is_autocast_enabled("cpu"), "cache_enabled": False}

    def gradient(rows):
        torch.set_num_threads(max(1, threads // len(shards)))  # this thread's share
        grads = [None] * len(params)
        with torch.autocast(**autocast):
            loss, n = causal_lm_loss(model, next(_micro_batches(rows, max_tokens)))  # a share of one pass fits one
            if n:
                grads = torch.autograd.grad(loss * (n / total), params, allow_unused=True)
        return grads, loss.detach() * n if n else 0.0

    try:
        with ThreadPoolExecutor(len(shards) - 1, thread_name_prefix="nbcustom-backward") as pool:
            others = [pool.submit(gradient, rows) for rows in shards[1:]]
            results = [gradient(shards[0])] + [f.result() for f in others]
    finally:
        torch.set_num_threads(threads)
    for i, p in enumerate(params):
        for grads, _ in results:
            if grads[i] is not None:
                p.grad = grads[i] if p.grad is None else p.grad.add_(grads[i])
    return sum(loss_sum for _, loss_sum in results) / max(total, 1)


def causal_lm_loss(model, batch: dict, chunk: int | None = None):
    """(mean cross-entropy over the batch's targets, number of targets) for a packed batch
    on the CPU; it is moved to the model's device here.

    ``model`` is a transformers causal LM, or a PEFT model around one. Models whose logits
    are more than ``lm_head(hidden)`` (soft-capping, scaling) go through their own forward."""
    import torch

    return _through_head(
        model, batch, lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, chunk),
        lambda logits, labels: torch.nn.functional.cross_entropy(logits.float(), labels),
    )


def sequence_logps(model, batch: dict, count: int):
    """(the summed log-probability of each packed item's targets, the number of its targets):
    the log-likelihood of each of ``count`` items' responses, differentiable with respect to
    the adapter."""
    import torch

    frozen = not _causal(model).get_output_embeddings().weight.requires_grad
    logps, _ = _through_head(model, batch, linear_logps if frozen else None, lambda logits, labels: logits.float().log_softmax(-1).gather(1, labels[:, None]).squeeze(1))
    owners = _targets(batch)[2].to(logps.device)
    sums = torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, owners, logps)
    return sums, torch.bincount(owners, minlength=count)


def _through_head(model, batch: dict, on_hidden, on_logits):
    """(``on_hidden(hidden, head weight, labels)``, or ``on_logits(logits, labels)`` for models
    whose logits are more than ``lm_head(hidden)`` and where ``on_hidden`` is None, at the
    positions that carry a target; the number of targets)."""
    import torch

    causal = _causal(model)
    body, head = getattr(causal, "model", None), causal.get_output_embeddings()
    device = head.weight.device
    keep, labels, _ = _targets(batch)
    keep, labels = keep.to(device), labels.to(device)
    # no cache: with one, transformers would not read the position ids as packed sequences
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device), "use_cache": False}
    if "attention_mask" in batch:  # shared prefixes (``pack_pairs``)
        inputs["attention_mask"] = _attention_mask(causal, batch["attention_mask"]).to(device)
    # half-precision base weights: compute in that precision, float32 adapter weights included
    # (otherwise peft casts every adapter's input and output to float32); float32 weights
    # under the caller's autocast (CPU bf16) take the same path
    half = AUTOCAST and head.weight.dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=head.weight.dtype) if half else contextlib.nullcontext()
    # on a CPU, Precision.computing turns peft's casts off once for the whole run
    with autocast, _adapter_casts_off(model, half and device.type != "cpu"):
        if on_hidden is None or body is None or not isinstance(head, torch.nn.Linear) or _scales_logits(causal.config):
            logits = model(**inputs).logits
            return on_logits(logits.flatten(0, 1)[keep], labels), len(labels)
        hidden = body(**inputs).last_hidden_state.flatten(0, 1).index_select(0, keep)
        return on_hidden(hidden, head.weight, labels), len(labels)


def _targets(batch: dict):
    """(flat positions, labels, owners or None) of the batch's targets, found on the CPU (no
    device sync): listed by ``pack_pairs``, else read from the ``targets`` grid."""
    if "at" in batch:
        return batch["at"], batch["labels"], batch["owners"]
    flat = batch["targets"].flatten()
    keep = (flat != IGNORE).nonzero().squeeze(1)
    return keep, flat[keep], batch["owners"].flatten()[keep] if "owners" in batch else None


def _attention_mask(causal, allowed):
    """The 4D boolean mask ``allowed`` as the model's attention takes it: as it is for sdpa,
    else (eager, flex attention) as a float mask added to the scores."""
    import torch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ALL_MASK_ATTENTION_FUNCTIONS[causal.config._attn_implementation] is sdpa_mask:
        return allowed
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)


@contextlib.contextmanager
def accelerated(model, attention: str | None = "flex_attention", backend: str = "inductor"):
    """The model with every decoder layer compiled and, if given, another attention
    implementation (flex attention skips the blocks that packing masks out; it needs a GPU
    for training). Undone on exit, so the shared base model generates as before."""
    import torch

    causal = _causal(model)
    body = causal.base_model  # the decoder stack, whatever the architecture calls it
    layers = list(getattr(body, "layers", None) or getattr(body, "h", None) or [body])
    was = causal.config._attn_implementation
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if attention:
        causal.set_attn_implementation(attention)
    for layer in layers:
        layer.compile(backend=backend)
    try:
        yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        if attention:
            causal.set_attn_implementation(was)


def _causal(model):
    """The transformers model inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _adapter_casts_off(model, active: bool):
    """Under autocast, peft need not cast each adapter's input to the adapter's dtype."""
    if not (active and hasattr(model, "peft_config")):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _scales_logits(config) -> bool:
    text = getattr(config, "text_config", None) or config
    return any(getattr(text, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def linear_cross_entropy(hidden, weight, targets, chunk: int | None = None):
    """``cross_entropy(hidden @ weight.T, targets)`` (mean) without storing the logits:
    at most ``chunk`` rows of logits exist at a time."""
    return _function().apply(hidden, weight, targets, chunk or _chunk(hidden, weight))


def _chunk(hidden, weight) -> int:
    """Rows of logits at a time: about 256 MB of float32 logits on CPU, 2 GB on a GPU."""
    return max(64, (2**31 if hidden.is_cuda else 2**28) // (4 * weight.shape[0]))


@functools.cache
def _function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            n = hidden.shape[0]
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden) if want_h else None
            exact = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in float32
            grad_w = torch.zeros(weight.shape, dtype=exact, device=weight.device) if want_w else None
            total = torch.zeros((), dtype=exact, device=hidden.device)
            for start in range(0, n, chunk):
                h, t = hidden[start:start + chunk], targets[start:start + chunk]
                logits = (h @ weight.T).to(exact)
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if want_h or want_w:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    probs = probs.to(hidden.dtype)
                    if want_h:
                        grad_h[start:start + chunk] = probs @ weight
                    if want_w:
                        grad_w += (probs.T @ h).to(exact)
            scale = 1.0 / max(n, 1)
            ctx.save_for_backward(
                grad_h * scale if want_h else None, (grad_w * scale).to(weight.dtype) if want_w else None
            )
            return total * scale

        @staticmethod
        def backward(ctx, grad):
            grad_h, grad_w = ctx.saved_tensors
            return (
                grad_h * grad.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad.to(grad_w.dtype) if grad_w is not None else None,
                None, None,
            )

    return LinearCrossEntropy


def linear_logps(hidden, weight, targets, chunk: int | None = None):
    """``log_softmax(hidden @ weight.T)`` at ``targets``, one value per row, without storing
    the logits; differentiable with respect to ``hidden`` only (a frozen head)."""
    return _logps_function().apply(hidden, weight, targets, chunk or _chunk(hidden, weight))


@functools.cache
def _logps_function():
    import torch

    class LinearLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            want_h = ctx.needs_input_grad[0]
            exact = torch.promote_types(hidden.dtype, torch.float32)
            out = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None  # d logp / d hidden = W[t] - softmax @ W
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk], targets[start:start + chunk]
                logits = (h @ weight.T).to(exact)
                lse = logits.logsumexp(-1)
                out[start:start + chunk] = logits.gather(1, t[:, None]).squeeze(1) - lse
                if want_h:
                    probs = logits.sub_(lse[:, None]).exp_().to(hidden.dtype)
                    grad_h[start:start + chunk] = weight[t] - probs @ weight
            ctx.save_for_backward(grad_h)
            return out

        @staticmethod
        def backward(ctx, grad):
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad[:, None].to(grad_h.dtype), None, None, None

    return LinearLogps
