"""Learning from feedback: ``%%finetune --method dpo`` on chosen/rejected answers and
``--method kto`` on answers rated good or bad, in the project's own training loop (packing,
the frozen head's chunked log-probabilities, checkpoints, early stopping, torchrun workers).

The reference model is the model a run starts from: the previous version's adapter, or the
base model (a new LoRA adapter starts as the identity). Its log-likelihood of every training
and holdout answer is computed once before training, so a step runs the tuned model only
(TRL's ``precompute_ref_log_probs``). A run from the base model adds a likelihood term on the
preferred answers (RPO; TRL's ``rpo_alpha``): the preference loss alone only ranks answers,
and a model that never saw the preferred ones would not learn to write them.

DPO loss per pair: ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` with ``c``, ``r`` the
summed log-probabilities of the chosen and rejected answer (Rafailov et al. 2023, TRL's
``sigmoid`` loss). KTO (Ethayarajh et al. 2024, TRL's ``kto`` loss): a good answer's loss is
``1 - sigmoid(beta * (logratio - z))``, a bad one's ``1 - sigmoid(beta * (z - logratio))``,
with ``z`` the tuned model's KL from the reference estimated on the step's mismatched
prompt/answer pairs (across torchrun workers), clamped at 0 and not differentiated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...errors import NbCustomError
from . import data as llm_data, pack as llm_pack
from .data import Example

LIKELIHOOD = 1.0  # weight of the likelihood term on preferred answers in a run from the base model
EVAL_ITEMS = 8  # items per pass when scoring without gradients
MARK = ("«", "»")  # around the tokens that carry the loss, in the summary's training example


def choose(spec, columns) -> tuple[str, str]:
    """(method, why) for ``--method``; auto: dpo with both answer columns, kto with ``--feedback``, else sft."""
    if spec.method != "auto":
        return spec.method, f"--method {spec.method}"
    if spec.feedback:
        return "kto", f"--feedback {spec.feedback} rates the responses"
    if spec.chosen in columns and spec.rejected in columns:
        return "dpo", f"the rows have {spec.chosen!r} and {spec.rejected!r} columns"
    return "sft", f"no {spec.chosen!r} and {spec.rejected!r} columns and no --feedback"


@dataclass
class Item:
    """One row of feedback: DPO ``sequences`` = [chosen, rejected]; KTO = [response, another
    row's response to this prompt (for the KL estimate)], with ``good`` its rating."""

    row: int
    sequences: list
    good: bool | None = None
    reference: list = field(default_factory=list)  # the reference model's log-likelihood of each sequence
    counts: list = field(default_factory=list)  # and the number of tokens it sums

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def longest(self) -> int:
        return max(len(s) for s in self.sequences)

    @classmethod
    def from_dict(cls, fields: dict) -> "Item":
        return cls(**{**fields, "sequences": [Example(**s) for s in fields["sequences"]]})


def check_rows(rows, spec, method: str) -> None:
    """One line for each kind of bad row, with its count, before anything loads."""
    if method == "dpo":
        llm_data.check_rows(rows, spec.prompt, spec.chosen)
        llm_data.check_rows(rows, spec.prompt, spec.rejected)
        same = int((rows[spec.chosen].astype(str).str.strip() == rows[spec.rejected].astype(str).str.strip()).sum())
        if same:
            raise NbCustomError(f"{same} row(s) have the same {spec.chosen!r} and {spec.rejected!r} answer: DPO learns nothing from them; filter them out (WHERE {spec.chosen} <> {spec.rejected})")
        return
    if not spec.feedback:
        raise NbCustomError("--method kto needs --feedback COL: a boolean column, true where the response is good")
    llm_data.check_rows(rows, spec.prompt, spec.response)
    ratings(rows, spec.feedback)


def ratings(rows, column: str) -> list[bool]:
    """The ``--feedback`` column as booleans (true/false, or 1/0)."""
    if column not in rows.columns:
        raise NbCustomError(f"no column {column!r} in the query's result (columns: {', '.join(map(str, rows.columns))}); select it or pass --feedback COL")
    values = rows[column]
    missing = int(values.isna().sum())
    if missing:
        raise NbCustomError(f"{missing} row(s) have a NULL {column!r}: rate them or filter them out (WHERE {column} IS NOT NULL)")
    if values.dtype != bool and not set(values.unique().tolist()) <= {0, 1}:
        odd = next(v for v in values if v not in (0, 1))
        raise NbCustomError(f"--feedback {column} must be a boolean column (true = good), not values like {odd!r}: cast it in the query")
    good = [bool(v) for v in values]
    if len(set(good)) < 2:
        raise NbCustomError(f"all {len(good)} rows have {column} = {str(good[0]).lower()}: KTO needs good and bad answers (for good answers alone use --method sft)")
    return good


def items(rows, tokenizer, spec, method: str, system: str | None) -> list[Item]:
    """Every row as a tokenized ``Item``; a prompt longer than ``--max-length`` is an error."""
    prompts = rows[spec.prompt].astype(str).tolist()
    systems = llm_data.systems(rows, system)

    def example(i, answer):
        return llm_data.encode(tokenizer, Example(i, prompts[i], str(answer), systems[i]))

    if method == "dpo":
        found = [Item(i, [example(i, c), example(i, r)]) for i, (c, r) in enumerate(zip(rows[spec.chosen], rows[spec.rejected]))]
    else:
        answers, good = rows[spec.response].astype(str).tolist(), ratings(rows, spec.feedback)
        found = [Item(i, [example(i, answers[i])], good[i]) for i in range(len(rows))]  # + a KL pair: ``mismatched``
    long = sum(item.sequences[0].prompt_length >= spec.max_length for item in found)
    if long:
        raise NbCustomError(f"{long} row(s) have a prompt of --max-length {spec.max_length} tokens or more, leaving no room for an answer: raise --max-length or filter them out")
    return found


def mismatched(found: list[Item]) -> list[Item]:
    """KTO: each item's second sequence is the next item's answer to this item's prompt
    (within one split, so the KL estimate of the holdout uses holdout rows only)."""
    if not found or found[0].good is None:
        return found
    out = []
    for i, item in enumerate(found):
        own, other = item.sequences[0], found[(i + 1) % len(found)].sequences[0]
        head, answer = own.ids[: own.prompt_length], other.ids[other.prompt_length:]
        kl = Example(item.row, own.prompt, other.response, own.system, head + answer, [llm_pack.IGNORE] * len(head) + answer, len(head))
        out.append(dataclasses.replace(item, sequences=[own, kl]))
    return out


def shown(tokenizer, item: Item) -> list[str]:
    """The summary's lines showing a training item as the model reads it, the tokens that
    carry the loss between ``MARK``s."""
    kinds = ["preferred", "rejected"] if item.good is None else ["good" if item.good else "bad"]
    lines = []
    for kind, example in zip(kinds, item.sequences):
        head, tail = (tokenizer.decode(part) for part in (example.ids[: example.prompt_length], example.ids[example.prompt_length:]))
        text = f"{head}{MARK[0]}{tail}{MARK[1]}".replace("\n", "\\n")
        lines.append(f"training example, {kind} answer (the loss is on the {MARK[0]}marked{MARK[1]} tokens): {text}")
    return lines


class Objective:
    """The preference loss for ``train._train_loop``: batches of items, their gradient, the
    holdout's preference loss and metrics, and the before/after scores."""

    def __init__(self, method: str, beta: float, likelihood: bool, pad_id: int):
        self.method, self.beta, self.likelihood, self.pad_id = method, beta, likelihood, pad_id

    def batch(self, found: list[Item]) -> dict:
        return {"items": found, "tokens": sum(len(i) for i in found)}

    def share(self, batch: dict, rank: int, world: int) -> tuple[dict, float]:
        """A torchrun worker's items of the step, and their share of the step's mean loss."""
        mine = batch["items"][rank::world]  # maybe none: a KTO worker still joins the KL estimate
        return self.batch(mine), len(mine) / len(batch["items"])

    def backward(self, model, batch: dict, max_tokens: int, streams: int = 1):
        """Backpropagate the batch's mean loss, a group of items of at most ``max_tokens``
        tokens (at least one item) at a time; the mean loss."""
        import torch

        found, total = batch["items"], torch.zeros(())
        z = self.kl(model, found) if self.method == "kto" else None
        for group in _groups(found, max_tokens):
            loss = self.losses(model, group, z)["loss"].sum() / len(found)
            loss.backward()
            total = total + loss.detach()
        return total

    def reference(self, model, found: list[Item], progress=None) -> None:
        """The reference model (``model`` as it starts) scores every item's sequences."""
        import torch

        model.eval()
        with torch.no_grad():
            for start in range(0, len(found), EVAL_ITEMS):
                group = found[start:start + EVAL_ITEMS]
                sums, counts = self._logps(model, group, (0, 1))
                for i, item in enumerate(group):
                    item.reference, item.counts = sums[2 * i: 2 * i + 2].tolist(), counts[2 * i: 2 * i + 2].tolist()
                if progress:
                    progress(start + len(group), len(found))

    def kl(self, model, found: list[Item]):
        """KTO's ``z``: the tuned model's KL from the reference, estimated on the items'
        mismatched pairs, clamped at 0, no gradient. In torchrun workers, over every worker's
        items (each calls this, with its share of the step or the whole holdout)."""
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            parts = [self._logps(model, found[s:s + EVAL_ITEMS], (1,))[0].cpu() for s in range(0, len(found), EVAL_ITEMS)]
        ref = torch.tensor([item.reference[1] for item in found], dtype=torch.float32)
        gap = torch.cat(parts) - ref if parts else ref
        total = torch.stack([gap.sum(), torch.tensor(float(len(gap)))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).clamp(min=0)

    def losses(self, model, group: list[Item], z=None) -> dict:
        """Per item (KTO: ``z`` from ``kl``, over the step or the holdout, not the group):
        ``loss`` (the one trained, with the likelihood term), ``preference``
        (without it), ``reward`` (DPO: chosen minus rejected; KTO: the answer's), and for
        DPO ``likelier`` (the chosen answer has the higher mean token log-probability)."""
        import torch
        import torch.nn.functional as F

        ref = torch.tensor([item.reference for item in group], dtype=torch.float32)
        if self.method == "dpo":
            sums, counts = self._logps(model, group, (0, 1))
            sums, counts, ref = sums.view(-1, 2), counts.view(-1, 2), ref.to(sums.device)
            reward = self.beta * ((sums[:, 0] - ref[:, 0]) - (sums[:, 1] - ref[:, 1]))
            preference = -F.logsigmoid(reward)
            nll = -sums[:, 0] / counts[:, 0].clamp(min=1)
            mean = sums.detach() / counts.clamp(min=1)
            out = {"likelier": mean[:, 0] > mean[:, 1]}
        else:
            sums, counts = self._logps(model, group, (0,))
            ref = ref.to(sums.device)
            z = z.to(sums.device)
            ratio = sums - ref[:, 0]
            good = torch.tensor([item.good for item in group], device=sums.device)
            preference = torch.where(good, 1 - torch.sigmoid(self.beta * (ratio - z)), 1 - torch.sigmoid(self.beta * (z - ratio)))
            nll = torch.where(good, -sums / counts.clamp(min=1), torch.zeros_like(sums))
            reward, out = self.beta * ratio, {"good": good}
        loss = preference + LIKELIHOOD * nll if self.likelihood else preference
        return {**out, "loss": loss, "preference": preference.detach(), "reward": reward.detach()}

    def evaluate(self, model, held: list[Item]) -> tuple[float, dict]:
        """(the holdout's preference loss, its preference metrics), without gradients; model
        None: of the reference itself, from its scores (``reference``), with no forward pass."""
        import torch

        if model is not None:
            model.eval()
        z = self.kl(model, held) if self.method == "kto" else None
        with torch.no_grad():
            parts = [self.losses(model, held[s:s + EVAL_ITEMS], z) for s in range(0, len(held), EVAL_ITEMS)]
        joined = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0] if k != "loss"}
        reward, loss = joined["reward"], float(joined["preference"].mean())
        if self.method == "dpo":
            metrics = {"preference_accuracy": float((reward > 0).float().mean()), "reward_margin": float(reward.mean()),
                       "likelihood_accuracy": float(joined["likelier"].float().mean())}
        else:
            # every (good, bad) pair of held-out answers: the good one's reward is higher
            good, bad = reward[joined["good"]], reward[~joined["good"]]
            both = len(good) and len(bad)
            metrics = {"preference_accuracy": float((good[:, None] > bad[None, :]).float().mean()) if both else float("nan"),
                       "reward_margin": float(good.mean() - bad.mean()) if both else float("nan")}
        return loss, {"preference_loss": loss, **metrics}

    def score(self, model, tokenizer, held: list[Item], max_new_tokens: int, display, label: str, start: bool = False) -> tuple[dict, list[str]]:
        """Before/after: the preference metrics and greedy answers, scored against the
        preferred answers (DPO: chosen; KTO: the good ones). ``start``: the model as the run
        starts is the reference, whose scores of the holdout are known already."""
        from ...evaluate import generation_scores
        from .generate import generate

        display.phase(f"evaluating {label}")
        _, metrics = self.evaluate(None if start else model, held)
        prompts = [item.sequences[0].ids[: item.sequences[0].prompt_length] for item in held]
        texts = generate(model, tokenizer, prompts, max_new_tokens, lambda i, n: display.step(i, n))
        preferred = [(t, item.sequences[0].response) for t, item in zip(texts, held) if item.good is not False]
        if preferred:
            metrics.update(generation_scores(*map(list, zip(*preferred))))
        return metrics, texts

    def _logps(self, model, group: list[Item], which: tuple):
        """(summed log-probabilities, token counts) of the items' sequences ``which``, item by
        item; model None: the reference's, scored once. DPO's chosen and rejected answer
        share their common prefix (``pack_pairs``: a third fewer tokens on feedback_task's pairs).
        KTO's reference could share the prompt too, but its policy scores one sequence at a
        time: scored in other rows, the reference differs from the starting policy by more
        bf16 rounding (measured: held-out answers that follow the rules 0.85 -> 0.45)."""
        import torch

        if model is None:
            return tuple(torch.tensor([getattr(item, kind)[k] for item in group for k in which]) for kind in ("reference", "counts"))
        if self.method == "dpo" and which == (0, 1):
            return llm_pack.sequence_logps(model, llm_pack.pack_pairs([item.sequences for item in group], self.pad_id), 2 * len(group))
        sequences = [item.sequences[k] for item in group for k in which]
        return llm_pack.sequence_logps(model, llm_pack.pack(sequences, 0, self.pad_id), len(sequences))


def _groups(found: list[Item], max_tokens: int):
    """Consecutive items of at most ``max_tokens`` tokens together (at least one item)."""
    group, size = [], 0
    for item in found:
        if group and size + len(item) > max_tokens:
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item)
    if group:
        yield group
