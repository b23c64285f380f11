"""The OpenAI HTTP API over the store (FastAPI): ``GET /v1/models``, ``POST
/v1/chat/completions`` (``stream: true`` as server-sent events) and ``POST /v1/embeddings``.

An LLM version answers with the chat template and system message it was trained with; a
label model with a label, scored as ``%%predict`` scores it, and its ``confidence`` in an
extra field; a RAG index with retrieval and its ``sources`` in an extra field. Errors are
JSON in OpenAI's shape, never a traceback; a request body over ``MAX_BODY`` gets 413.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import NbCustomError
from .batching import Request
from .served import NotServed, Served

MAX_BODY = 1 << 20  # bytes in a request body
MAX_TOKENS = 2048  # the most new tokens a request may ask for
DEFAULT_TOKENS = 256  # new tokens when a request does not say
TOO_LARGE = f"the request body is too large (at most {MAX_BODY // 2**20} MiB): send a shorter prompt"
DONE = format_sse_event(data_str="[DONE]")
log = logging.getLogger("nbcustom.serve")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (n=1, user, ...) are accepted and ignored
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)  # default 0: greedy, as %%predict
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: str = "float"


def error(status: int, message: str, code: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(served: Served, api_key: str | None = None):
    """The ASGI app serving ``served``; with ``api_key``, /v1 needs ``Authorization: Bearer api_key``."""
    app = FastAPI(title="nbcustom", max_body_size=MAX_BODY, docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def authorize(request: HttpRequest, call_next):
        if expected and request.url.path.startswith("/v1"):
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return error(401, "Incorrect or missing API key: send it as the header `Authorization: Bearer KEY`", "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = TOO_LARGE if exc.status_code == 413 else str(exc.detail)
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(NotServed)
    async def unknown(request, exc: NotServed):
        return error(404, str(exc), "model_not_found")

    @app.exception_handler(NbCustomError)
    async def refused(request, exc: NbCustomError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error(500, f"the server failed to answer ({type(exc).__name__}); it goes on serving", kind="server_error")

    @app.get("/health")
    async def health() -> dict:
        bases = served.bases()
        return {"status": "ok", "prompt_reads": sum(b.reads for b in bases), "largest_batch": max((b.largest for b in bases), default=0)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        ids = await asyncio.to_thread(served.ids)
        return {"object": "list", "data": [
            {"id": i["id"], "object": "model", "created": _epoch(i["created"]), "owned_by": "nbcustom", "kind": i["kind"], "version": i["version"]}
            for i in ids
        ]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        version = await asyncio.to_thread(served.version, body.model)
        if version.kind == "rag":
            return await _rag(served, version, body)
        return await _llm(served, version, body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        import numpy as np

        version = await asyncio.to_thread(served.version, body.model)
        if version.kind != "rag":
            raise NbCustomError(f"{body.model} is an LLM; embeddings come from a RAG index's embedding model: name a RAG index")
        if body.encoding_format not in ("float", "base64"):
            raise NbCustomError("encoding_format must be float or base64")
        texts = [body.input] if isinstance(body.input, str) else body.input
        index = await asyncio.to_thread(served.index, version)
        vectors = np.asarray(await asyncio.to_thread(index.embed_model().get_text_embedding_batch, texts), dtype=np.float32)
        encode = (lambda v: base64.b64encode(v.tobytes()).decode()) if body.encoding_format == "base64" else (lambda v: v.tolist())
        words = sum(len(t.split()) for t in texts)
        return {
            "object": "list", "model": body.model, "usage": {"prompt_tokens": words, "total_tokens": words},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        }

    return _Limited(app)


class _Limited:
    """A request whose Content-Length is over ``MAX_BODY`` gets the 413 in OpenAI's shape
    before anything reads it (Starlette answers that case in plain text; a body without a
    length is cut off by FastAPI's ``max_body_size`` and answered by ``http_error``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY:
                return await error(413, TOO_LARGE)(scope, receive, send)
        await self.app(scope, receive, send)


# --- answers -----------------------------------------------------------------------------
async def _llm(served: Served, version, body: ChatRequest):
    base = await asyncio.to_thread(served.base, version)
    adapter = await asyncio.to_thread(base.adapter, version)
    info = version.manifest.get("llm", {})
    chat = [{"role": m.role, "content": m.text()} for m in body.messages]
    if chat[0]["role"] != "system" and info.get("system"):
        chat.insert(0, {"role": "system", "content": info["system"]})  # the system message it was trained with
    ids = await asyncio.to_thread(_tokens, base.tokenizer, chat)
    limit = body.max_completion_tokens or body.max_tokens or DEFAULT_TOKENS
    window = getattr(base.model.config, "max_position_embeddings", 2048)
    if len(ids) + limit > window:
        raise NbCustomError(f"the messages have {len(ids)} tokens; with max_tokens {limit} that is over the model's {window}: send less")
    if info.get("labels"):
        label, confidence = await asyncio.to_thread(base.classify, adapter, ids, info["labels"])
        extra = {"label": label, "confidence": round(confidence, 6)}
        return _answer(body, label, "stop", len(ids), 1, extra)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    request = Request(ids, adapter, limit, stop, body.temperature or 0.0, body.top_p or 1.0, body.seed)
    if not body.stream:
        done = await asyncio.wrap_future(base.submit(request))
        return _answer(body, done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    request.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = asyncio.wrap_future(base.submit(request))

    async def events():
        yield _chunk(body, {"role": "assistant", "content": ""})
        while not (future.done() and pieces.empty()):
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _chunk(body, {"content": getter.result()})
            else:
                getter.cancel()
        done = future.result()
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        yield _chunk(body, {}, done.finish_reason, usage=usage)
        yield DONE

    return _stream(events())


async def _rag(served: Served, version, body: ChatRequest):
    question = next((m.text() for m in reversed(body.messages) if m.role == "user"), "").strip()
    if not question:
        raise NbCustomError("a RAG index answers the last user message: send one with the question")
    index = await asyncio.to_thread(served.index, version)
    limit = body.max_completion_tokens or body.max_tokens
    frame = await asyncio.to_thread(index.ask, [question], max_new_tokens=limit)
    row = frame.iloc[0]
    faithful = row["faithfulness"]
    extra = {"sources": list(row["sources"]), "faithfulness": None if faithful is None or faithful != faithful else float(faithful)}
    return _answer(body, row["answer"], "stop", 0, 0, extra)


def _tokens(tokenizer, chat: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer(body, content: str, finish: str, prompt_tokens: int, completion_tokens: int, extra: dict | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if body.stream:  # a label or RAG answer comes whole; streamed, it is one chunk
        async def events():
            yield _chunk(body, message, extra=extra)
            yield _chunk(body, {}, finish)
            yield DONE

        return _stream(events())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": body.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        **(extra or {}),
    }


def _stream(events) -> EventSourceResponse:
    """Server-sent events, framed by FastAPI's ``format_sse_event``."""
    return EventSourceResponse(events, headers={"Cache-Control": "no-cache"})


def _chunk(body, delta: dict, finish: str | None = None, usage: dict | None = None, extra: dict | None = None) -> bytes:
    chunk = {
        "id": f"chatcmpl-{id(body):x}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return format_sse_event(data_str=json.dumps({**chunk, **({"usage": usage} if usage else {}), **(extra or {})}))


def _epoch(value: Any) -> int:
    return int(value.timestamp()) if hasattr(value, "timestamp") else 0
