"""One base model in the server process, the LoRA adapters of the versions served on it, and
the thread that answers their chat requests by continuous batching.

The thread keeps one running batch and decodes it a token at a time. Between two steps,
requests that came in join it (their prompts read in one forward pass, their key/value cache
rows merged in, left-padded) and rows that finished leave it: each answer goes out as soon as
its row stops (the turn-end token, a stop string, its ``max_tokens``), and that client's next
request can join while the others still decode. Rows may ask for different versions
(``lora.MultiLoRA`` applies each row's adapter) and different sampling (each row samples
with its own temperature, top-p and seed). When nothing runs, the thread waits for the first
request and for those that come with it (``GAP``, ``WINDOW``), so that clients that send
together are read in one pass.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .. import models
from .lora import MultiLoRA

MAX_BATCH = 32
# From idle, reading starts when no request came for GAP seconds, or WINDOW seconds after the
# first one.
GAP, WINDOW = 0.05, 0.2


@dataclass
class Request:
    """A chat request's tokenized prompt and settings; ``future`` gets a ``Completion``."""

    ids: list[int]
    adapter: str
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # streamed text, piece by piece (called from the batch thread)
    future: Future = field(default_factory=Future)


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop or length
    prompt_tokens: int
    completion_tokens: int


class Base:
    """A base model with the adapters of its served versions, answering ``Request``s."""

    def __init__(self, path, run_on):
        # its own copy: the adapters stay on it, away from the RAG indexes' answering model;
        # ``run_on`` (a ``precision.Precision``): what %%predict computes its versions in
        self.model, self.tokenizer = models.load_llm(path, run_on.device, run_on.weights, shared=False)
        self.run_on = run_on
        self.lora = MultiLoRA(self.model)
        self.lock = threading.Lock()  # one forward pass at a time: decoding, label scoring, adapter loading
        self.queue: queue.Queue[Request] = queue.Queue()
        self.reads, self.largest = 0, 0  # passes that read prompts, the most rows decoded together (GET /health)
        threading.Thread(target=self._loop, name="nbcustom-batches", daemon=True).start()

    def adapter(self, version) -> str:
        """The adapter name of ``version`` (``NAME@V``), loaded on first use."""
        name = f"{version.name}@{version.version}"
        with self.lock:
            if name not in self.lora:
                self.lora.load(name, version.model_dir)
        return name

    def submit(self, request: Request) -> Future:
        self.queue.put(request)
        return request.future

    def classify(self, adapter: str, ids: list[int], labels: list[str]) -> tuple[str, float]:
        """A label model's label for one tokenized prompt, as ``%%predict`` scores it."""
        import torch

        from ..engines.llm import labels as llm_labels

        with self.lock, torch.inference_mode(), self.run_on.autocast():
            self.lora.use([adapter])
            found, confidence = llm_labels.classify(self.model, self.tokenizer, [ids], labels)
        return found[0], confidence[0]

    # --- the batch thread ---------------------------------------------------------------
    def _loop(self) -> None:
        batch = _Batch()
        while True:
            new = self._arrived(wait=not batch.rows, room=MAX_BATCH - len(batch.rows))
            if new:
                try:
                    self._read(batch, new)
                except BaseException as e:  # those clients get the error; the batch goes on
                    _fail(new, e)
            if batch.rows:
                try:
                    self._step(batch)
                except BaseException as e:
                    _fail([row.request for row in batch.rows], e)
                    batch = _Batch()

    def _arrived(self, wait: bool, room: int) -> list[Request]:
        """The requests in the queue (at most ``room``); with ``wait``, the first one and those
        that come with it."""
        out: list[Request] = [self.queue.get()] if wait else []
        deadline = time.monotonic() + WINDOW
        while len(out) < room:
            try:
                out.append(self.queue.get(timeout=max(0.0, min(GAP, deadline - time.monotonic()))) if wait else self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _read(self, batch: "_Batch", requests: list[Request]) -> None:
        """One forward pass over the new prompts; their rows join the batch with their first token."""
        import torch
        from transformers import DynamicCache

        from ..engines.llm import data as llm_data

        rows = [_Row(r, self.tokenizer) for r in requests]
        device = next(self.model.parameters()).device
        prompts = llm_data.left_padded([r.ids for r in requests], self.tokenizer.pad_token_id, device)
        mask, cache = prompts["attention_mask"], DynamicCache()
        with self.lock, torch.inference_mode(), self.run_on.autocast():
            self.lora.use([r.adapter for r in requests])
            logits = self.model(
                input_ids=prompts["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1]
            tokens = _choose(logits, rows)
        self.reads += 1
        batch.join(rows, cache, mask, tokens)
        self._advance(batch, tokens)

    def _step(self, batch: "_Batch") -> None:
        """One decoding step of every running row."""
        import torch

        mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        with self.lock, torch.inference_mode(), self.run_on.autocast():
            self.lora.use([row.request.adapter for row in batch.rows])
            logits = self.model(
                input_ids=batch.tokens[:, None], attention_mask=mask, position_ids=batch.mask.sum(1, keepdim=True),
                past_key_values=batch.cache, use_cache=True,
            ).logits[:, -1]
            tokens = _choose(logits, batch.rows)
        batch.mask, batch.tokens = mask, tokens
        self._advance(batch, tokens)

    def _advance(self, batch: "_Batch", tokens) -> None:
        """Each row takes its new token; rows that stopped answer and leave."""
        self.largest = max(self.largest, len(batch.rows))
        for row, token in zip(list(batch.rows[-len(tokens):]), tokens.tolist()):
            row.add(token)
        finished = [row for row in batch.rows if row.done]
        for row in finished:
            if not row.request.future.done():  # not failed while it was read
                row.request.future.set_result(row.completion())
        if finished:
            batch.keep([i for i, row in enumerate(batch.rows) if not row.done])


def _fail(requests: list[Request], error: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(error)


def _choose(logits, rows: list["_Row"]):
    """Each row's next token: the most likely one, or a sample at the row's temperature and top-p."""
    tokens = logits.argmax(-1)
    for i, row in enumerate(rows):
        if row.request.temperature > 0:
            tokens[i] = row.sample(logits[i])
    return tokens


class _Batch:
    """The running rows, their key/value cache (left-padded to one length), attention mask and
    last tokens."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = self.mask = self.tokens = None

    def join(self, rows: list["_Row"], cache, mask, tokens) -> None:
        import torch
        from torch.nn.functional import pad

        if not self.rows:
            self.rows, self.cache, self.mask, self.tokens = rows, cache, mask, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for ours, theirs in zip(self.cache.layers, cache.layers):
            for part in ("keys", "values"):
                a, b = getattr(ours, part), getattr(theirs, part)
                setattr(ours, part, torch.cat([pad(a, (0, 0, width - a.shape[2], 0)), pad(b, (0, 0, width - b.shape[2], 0))]))
        self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)), pad(mask, (width - mask.shape[1], 0))])
        self.rows, self.tokens = self.rows + rows, torch.cat([self.tokens, tokens])

    def keep(self, indices: list[int]) -> None:
        """Only the rows at ``indices``; cache columns no row needs any more are dropped."""
        import torch

        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = self.tokens = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.mask, self.tokens = self.mask[index], self.tokens[index]
        start = int(self.mask.any(0).int().argmax())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


class _Row:
    """One request's tokens as they are generated: its text, where it stops, what is streamed."""

    def __init__(self, request: Request, tokenizer):
        self.request, self.tokenizer = request, tokenizer
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.done, self.reason = False, "length"
        self.generator = None

    def add(self, token: int) -> None:
        if self.done:
            return
        if token == self.tokenizer.eos_token_id:
            self.done, self.reason = True, "stop"
        else:
            self.tokens.append(token)
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for stop in self.request.stop:
                if stop in self.text:
                    self.text, self.done, self.reason = self.text[: self.text.index(stop)], True, "stop"
            if len(self.tokens) >= self.request.max_tokens:
                self.done = True
        self._stream()

    def _stream(self) -> None:
        """Send the text not sent yet, holding back a possible start of a stop string or an
        unfinished character."""
        if self.request.on_text is None:
            return
        safe = len(self.text)
        if self.sent == 0:  # no leading white space, as in the whole answer
            self.sent = min(safe, len(self.text) - len(self.text.lstrip()))
        if not self.done:
            if self.text.endswith("\ufffd"):
                safe -= 1
            for stop in self.request.stop:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > self.sent:
            self.request.on_text(self.text[self.sent:safe])
            self.sent = safe

    def sample(self, logits) -> int:
        """A token drawn at the request's temperature from its top-p share (its own generator
        when it has a seed, so that its answer does not depend on the other rows)."""
        import torch

        if self.request.seed is not None and self.generator is None:
            self.generator = torch.Generator(logits.device).manual_seed(self.request.seed)
        probabilities = torch.softmax(logits.float() / self.request.temperature, -1)
        if self.request.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            ordered[ordered.cumsum(0) - ordered > self.request.top_p] = 0  # the most likely token always stays
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))

    def completion(self) -> Completion:
        self.done = True
        self._stream()
        return Completion(self.text.strip(), self.reason, len(self.request.ids), len(self.tokens))
