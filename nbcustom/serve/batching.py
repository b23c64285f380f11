"""One base model in the server process, the LoRA adapters of the versions served on it, and
the thread that answers their chat requests in batches.

Requests that arrive while a batch runs wait in a queue; the next batch takes all of them
(up to ``MAX_BATCH``), whichever version each asks for: peft runs a batch whose rows use
different adapters (``adapter_names``), the base model itself included. Rows of one batch
share the sampling settings (greedy, or one temperature / top-p / seed); requests with other
settings go in the next batch. Each row stops on its own (the turn-end token, a stop string,
its ``max_tokens``), and the batch ends when every row has.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .. import models

MAX_BATCH = 32
# A batch starts when no request came for GAP seconds, or WINDOW seconds after its first one:
# clients that got their answers in the last batch send again within a few milliseconds.
GAP, WINDOW = 0.05, 0.2
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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

    @property
    def sampling(self) -> tuple:
        return (0.0, 1.0, None) if self.temperature <= 0 else (self.temperature, self.top_p, self.seed)


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop or length
    prompt_tokens: int
    completion_tokens: int


class Base:
    """A base model with the adapters of its served versions, answering ``Request``s in batches."""

    def __init__(self, path, device: str = "cpu", dtype: str = "float32"):
        # its own copy: the adapters stay on it, away from the RAG indexes' answering model
        self.model, self.tokenizer = models.load_llm(path, device, dtype, shared=False)
        self.peft = None
        self.lock = threading.Lock()  # one forward pass at a time: generation, label scoring, adapter loading
        self.queue: queue.Queue[Request] = queue.Queue()
        self.batches, self.largest = 0, 0  # batches run, and the most rows in one (GET /health)
        threading.Thread(target=self._loop, name="nbcustom-batches", daemon=True).start()

    def adapter(self, version) -> str:
        """The adapter name of ``version`` (``NAME@V``), loaded on first use."""
        import warnings

        from peft import PeftModel

        name = f"{version.name}@{version.version}"
        with self.lock, models.quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, version.model_dir, adapter_name=name)
                self.peft.eval()
            elif name not in self.peft.peft_config:
                self.peft.load_adapter(version.model_dir, adapter_name=name)
        return name

    def submit(self, request: Request) -> Future:
        self.queue.put(request)
        return request.future

    def classify(self, adapter: str, ids: list[int], labels: list[str]) -> tuple[str, float]:
        """A label model's label for one tokenized prompt, as ``%%predict`` scores it."""
        from ..engines.llm import labels as llm_labels

        with self.lock:
            self.peft.set_adapter(adapter)
            found, confidence = llm_labels.classify(self.peft, self.tokenizer, [ids], labels)
        return found[0], confidence[0]

    # --- the batch thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            waiting = [self.queue.get()]
            deadline = time.monotonic() + WINDOW
            while len(waiting) < MAX_BATCH:
                try:
                    waiting.append(self.queue.get(timeout=max(0.0, min(GAP, deadline - time.monotonic()))))
                except queue.Empty:
                    break
            groups: dict[tuple, list[Request]] = {}
            for request in waiting:
                groups.setdefault(request.sampling, []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[Request]) -> None:
        try:
            rows = self._generate(group)
        except BaseException as e:  # every waiting client gets the error; the thread goes on
            for request in group:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        for request, row in zip(group, rows):
            request.future.set_result(row.completion())

    def _generate(self, group: list[Request]) -> list["_Row"]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from ..engines.llm import data as llm_data

        rows = [_Row(r, self.tokenizer) for r in group]

        class Streamer(BaseStreamer):
            started = False

            def put(self, value):
                if not self.started:  # the first call passes the prompts
                    self.started = True
                    return
                for row, token in zip(rows, value.tolist()):
                    row.add(token)

            def end(self):
                pass

        class Done(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([row.done for row in rows], device=input_ids.device)

        device = next(self.model.parameters()).device
        batch = llm_data.left_padded([r.ids for r in group], self.tokenizer.pad_token_id, device)
        temperature, top_p, seed = group[0].sampling
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        with self.lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            model = self.model
            adapters = {r.adapter for r in group}
            if self.peft is not None and len(adapters) == 1:  # one adapter: peft's plain path, faster than a mixed batch
                model = self.peft
                self.peft.set_adapter(adapters.pop())
            elif self.peft is not None:
                model, sampling["adapter_names"] = self.peft, [r.adapter for r in group]
            model.generate(
                **batch, max_new_tokens=max(r.max_tokens for r in group), num_beams=1, streamer=Streamer(),
                stopping_criteria=StoppingCriteriaList([Done()]), eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, **sampling,
            )
        self.batches, self.largest = self.batches + 1, max(self.largest, len(group))
        return rows


class _Row:
    """One request's tokens as they are generated: its text, where it stops, what is streamed."""

    def __init__(self, request: Request, tokenizer):
        self.request, self.tokenizer = request, tokenizer
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.done, self.reason = False, "length"

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

    def completion(self) -> Completion:
        self.done = True
        self._stream()
        return Completion(self.text.strip(), self.reason, len(self.request.ids), len(self.tokens))
