"""``nbcustom serve`` as a real process, called with the ``openai`` package: LLM versions
(plain and streamed), a label model, a RAG index with sources, embeddings, NAME@V, a switch
of the active version, the key, errors; and ``%nbc serve`` in a real kernel."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nbcustom
from nbcustom.engines.llm.generator import Generator
from nbcustom.store import Store

import label_task
import llm_task
from handbook import documents_frame
from notebooks import run_notebook

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # one module fixture trains three versions and builds an index
KEY = "test-key-5d41402abc4b2a76"
TICKET = "Hi, my parcel is a problem today."
PRODUCT = "Meet Birch: a blue mug, yours for 7 dollars."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_store(tmp_path_factory):
    """Two versions of an LLM (v1 active), a label model and a RAG index, trained briefly."""
    store = tmp_path_factory.mktemp("serve") / "store"
    common = dict(store=store, ui="none", batch_size=4, eval_frac=0.2, max_new_tokens=8)
    nbcustom.finetune("bot", llm_task.rows(20), max_steps=2, system=llm_task.SYSTEM, **common)
    nbcustom.finetune("bot", llm_task.rows(20, seed=1), max_steps=2, lr=1e-3, promote="never", **common)
    nbcustom.finetune("router", label_task.rows(40), max_steps=3, system=label_task.SYSTEM, **common)
    nbcustom.rag("hb", documents_frame(), store=store, ui="none", metadata="section", max_new_tokens=24)
    return store


@pytest.fixture(scope="module")
def server(served_store):
    """``nbcustom serve --api-key KEY`` as its own process (the console command)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "nbcustom"), "--store", str(served_store), "serve", "--port", str(port), "--api-key", KEY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
    yield process, port
    process.terminate()
    process.wait(10)


def client(port, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def ask(api, model, text, **options):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **options)


def test_the_openai_client_talks_to_every_kind_of_model(server, served_store):
    process, port = server
    api = client(port)
    ids = {m.id for m in api.models.list().data}
    assert {"bot", "bot@1", "bot@2", "router", "router@1", "hb", "hb@1"} <= ids

    # an LLM version: the same greedy answer as %%predict, streamed or not
    predicted = nbcustom.predict("bot", f"SELECT '{PRODUCT}' AS prompt", store=served_store, max_new_tokens=16)["prediction"][0]
    plain = ask(api, "bot", PRODUCT, max_tokens=16)
    assert plain.choices[0].message.content == predicted and plain.usage.completion_tokens <= 16
    pieces = [c.choices[0].delta.content or "" for c in ask(api, "bot", PRODUCT, max_tokens=16, stream=True) if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == predicted
    stopped = ask(api, "bot", PRODUCT, max_tokens=16, stop=[predicted[3:6]]).choices[0]
    assert stopped.message.content == predicted[:3].strip() and stopped.finish_reason == "stop"

    # a label model: its label as %%predict scores it, the confidence in an extra field
    expected = nbcustom.predict("router", f"SELECT '{TICKET}' AS prompt", store=served_store)
    label = ask(api, "router", TICKET)
    assert label.choices[0].message.content == expected["prediction"][0] in label_task.LABELS
    # both compute in the version's precision; in bf16 (a CPU with native bf16) through different
    # kernels (peft with nbcustom's lean LoRA, the server's stacked adapters): within bf16 rounding
    bf16 = Generator(Store(served_store).get("router")).run_on.compute == "bfloat16"
    assert label.model_extra["confidence"] == pytest.approx(expected["confidence"][0], abs=3e-2 if bf16 else 1e-3)

    # a RAG index: the answer and its sources
    rag = ask(api, "hb", "Which form is used to request parental leave?")
    assert "QF-7781" in rag.choices[0].message.content
    sources = rag.model_extra["sources"]
    assert sources[0]["id"] == 2 and {"score", "snippet", "metadata"} <= set(sources[0])

    # embeddings of the index's model (the client asks for base64; floats work too)
    texts = ["parental leave", "expense claims"]
    vectors = np.array([d.embedding for d in api.embeddings.create(model="hb", input=texts).data])
    floats = api.embeddings.create(model="hb", input=texts, encoding_format="float").data
    local = np.array(nbcustom.load("hb", store=served_store).embed_model().get_text_embedding_batch(texts))
    assert vectors.shape == (2, 384) and np.allclose(vectors, local, atol=1e-5) and np.allclose(floats[1].embedding, local[1], atol=1e-5)


def test_versions_by_id_and_the_active_one_followed_without_a_restart(server, served_store):
    _, port = server
    api = client(port)
    first = [ask(api, model, PRODUCT, max_tokens=12).choices[0].message.content for model in ("bot", "bot@1", "bot@2")]
    assert first[0] == first[1]
    Store(served_store).activate("bot", 2)
    try:
        assert next(m for m in api.models.list().data if m.id == "bot").model_extra["version"] == 2
        assert ask(api, "bot", PRODUCT, max_tokens=12).choices[0].message.content == first[2]
    finally:
        Store(served_store).activate("bot", 1)


def test_requests_that_arrive_together_are_answered_in_one_batch(server):
    _, port = server
    api = client(port)
    models = ["bot@1", "bot@2", "bot"] * 3
    alone = {m: ask(api, m, PRODUCT, max_tokens=12).choices[0].message.content for m in set(models)}
    before = _health(port)["largest_batch"]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: ask(api, m, PRODUCT, max_tokens=12).choices[0].message.content, models))
    assert together == [alone[m] for m in models]  # adapters mixed in one batch answer as they do alone
    assert _health(port)["largest_batch"] > max(before, 1)


@pytest.fixture(scope="module")
def base(served_store):
    """The batch thread of the server, in this process: bot's base with v1 and v2 loaded."""
    from nbcustom.serve.served import Served

    served = Served(Store(served_store))
    found = served.base(served.version("bot@1"))
    for v in ("bot@1", "bot@2"):
        found.adapter(served.version(v))
    return found


def _prompt(base, text: str) -> list[int]:
    chat = [{"role": "system", "content": llm_task.SYSTEM}, {"role": "user", "content": text}]
    return list(base.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_each_row_gets_its_own_adapter_as_in_peft(base, served_store):
    """One forward pass over rows of v1, v2 and the base equals peft's mixed-adapter batch."""
    import torch
    from peft import PeftModel

    from nbcustom import models
    from nbcustom.engines.llm import data as llm_data

    store = Store(served_store)
    reference, _ = models.load_llm(base.model.name_or_path, "cpu", "float32", shared=False)
    reference = PeftModel.from_pretrained(reference, store.get("bot", 1).model_dir, adapter_name="bot@1")
    reference.load_adapter(store.get("bot", 2).model_dir, adapter_name="bot@2")
    reference.eval()
    names = ["bot@1", "bot@2", None, "bot@2"]
    batch = llm_data.left_padded([_prompt(base, t) for t in (TICKET, PRODUCT, TICKET, "Where is my order 7?")], base.tokenizer.pad_token_id, "cpu")
    with torch.inference_mode(), base.lock:
        expected = reference(**batch, adapter_names=[n or "__base__" for n in names]).logits
        base.lora.use(names)
        got = base.model(**batch).logits
        base.lora.use(["bot@2"] * 4)  # one adapter for every row: its own path
        single = base.model(**batch).logits
        reference.set_adapter("bot@2")
        expected_single = reference(**batch).logits
    assert (expected - got).abs().max() < 1e-4
    assert (expected_single - single).abs().max() < 1e-4
    assert (expected[1] - expected[0]).abs().max() > 1e-2  # the adapters differ: the test can tell rows apart


def test_a_request_joins_a_running_batch_and_a_short_one_leaves_it_early(base):
    from nbcustom.serve.batching import Request

    long_ids, short_ids = _prompt(base, PRODUCT), _prompt(base, TICKET)
    alone_long = base.submit(Request(long_ids, "bot@2", 24)).result()
    alone_short = base.submit(Request(short_ids, "bot@1", 3)).result()
    assert alone_long.completion_tokens > 6  # long enough to be running when the short one comes
    reads, finished = base.reads, []
    long = base.submit(Request(long_ids, "bot@2", 24))
    while base.reads == reads:  # its prompt has been read: it decodes
        time.sleep(0.01)
    short = base.submit(Request(short_ids, "bot@1", 3))
    for name, future in (("long", long), ("short", short)):
        future.add_done_callback(lambda _, name=name: finished.append(name))
    assert (long.result(), short.result()) == (alone_long, alone_short)
    assert finished == ["short", "long"]  # answered when its row stopped, not at the end of the batch
    assert base.reads == reads + 2 and base.largest >= 2  # read on its own, decoded beside the long one


def test_a_seeded_sample_does_not_depend_on_the_other_rows(base):
    from nbcustom.serve.batching import Request

    ids = _prompt(base, PRODUCT)
    sample = lambda seed: Request(ids, "bot@1", 12, temperature=1.2, top_p=0.95, seed=seed)  # noqa: E731
    alone = [base.submit(sample(seed)).result().text for seed in (1, 2)]
    futures = [base.submit(sample(1)), base.submit(Request(_prompt(base, TICKET), "bot@2", 12)), base.submit(sample(2))]
    assert [futures[0].result().text, futures[2].result().text] == alone
    assert len({base.submit(sample(seed)).result().text for seed in range(3, 8)} | set(alone)) > 1  # it samples


def _health(port) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health").json()


def test_the_key_errors_and_limits_and_the_server_goes_on(server, served_store):
    process, port = server
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(client(port, key="wrong"), "bot", PRODUCT)
    api = client(port)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(api, "nope", PRODUCT)
    with pytest.raises(openai.NotFoundError):
        ask(api, "bot@9", PRODUCT)
    with pytest.raises(openai.APIStatusError, match="too large") as oversized:
        ask(api, "bot", "x" * 2_000_000)
    assert oversized.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(api, "bot", PRODUCT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="RAG index"):
        api.embeddings.create(model="bot", input="x")
    assert ask(api, "bot", PRODUCT, max_tokens=4).choices[0].message.content  # still serving
    # the key is nowhere but in the server's environment
    assert KEY not in Path(f"/proc/{process.pid}/cmdline").read_text()
    assert not [p for p in served_store.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def test_refusals_are_one_line_before_anything_starts(served_store):
    nbc = str(Path(sys.executable).parent / "nbcustom")
    for args, message in [
        (["--host", "0.0.0.0"], "needs an API key"),
        (["ghost"], "no such model"),
    ]:
        done = subprocess.run([nbc, "--store", str(served_store), "serve", "--port", str(free_port()), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_nbc_serve_in_a_kernel_returns_at_once_and_answers_the_notebook(served_store):
    port = free_port()
    nb = run_notebook([
        "%load_ext nbcustom",
        f"import time\nstarted = time.time()\n%nbc serve hb --port {port}\nprint(f'took {{time.time() - started:.1f}}s')",
        "import openai\n"
        f"api = openai.OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='none')\n"
        "reply = api.chat.completions.create(model='hb', messages=[{'role': 'user', 'content': 'Who receives the reports of sick days?'}])\n"
        "print(reply.choices[0].message.content, [s['id'] for s in reply.model_extra['sources']])",
        "%nbc serve --stop",
    ], served_store, worker="off")  # it trains nothing: no fork server
    started = nb.cells[1].outputs[0]["text"]
    assert f"http://127.0.0.1:{port}/v1" in started and float(started.split("took ")[1].split("s")[0]) < 30
    assert "[3," in nb.cells[2].outputs[0]["text"]
    assert "stopped the server on port" in nb.cells[3].outputs[0]["text"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_the_vllm_export_holds_every_version_and_a_serve_sh_with_vllms_flags(served_store, tmp_path):
    import json
    import shlex

    from peft import PeftConfig

    from nbcustom.engines.llm.vllm import RANKS

    nbcustom.export("bot", store=served_store, format="vllm", to=tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "base" / "config.json").is_file() and (out / "base" / "chat_template.jinja").is_file()
    for v in (1, 2):
        adapter = out / "adapters" / f"v{v}"
        assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        assert PeftConfig.from_pretrained(adapter).peft_type == "LORA"
    words = shlex.split((out / "serve.sh").read_text().split('"$(dirname "$0")"\n')[1].replace("\\\n", " "))
    assert words[:3] == ["vllm", "serve", "./base"] and words[-1] == "$@"
    flags = [w for w in words if w.startswith("--")]
    assert flags == ["--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras"]  # vLLM's documented flags
    modules = words[words.index("--lora-modules") + 1 : words.index("--max-lora-rank")]
    assert modules == ["bot=./adapters/v1", "bot@1=./adapters/v1", "bot@2=./adapters/v2"]
    rank = int(words[words.index("--max-lora-rank") + 1])
    r = json.loads((out / "adapters" / "v1" / "adapter_config.json").read_text())["r"]
    assert rank in RANKS and rank >= r and words[words.index("--max-loras") + 1] == "2"
    assert "model='bot'" in (out / "README.md").read_text() and llm_task.SYSTEM in (out / "README.md").read_text()
