"""LLM fine-tuning on the real embedded SmolLM2 (CPU, small data, few steps).

One module-level run (``tuned``) is shared by the tests that only read its results; the
base model is loaded once per session (``models`` caches it in-process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llm_task
from conftest import snapshot
from nbcustom import models
from nbcustom.display.run import TextDisplay
from nbcustom.engines.llm import data as llm_data
from nbcustom.errors import NbCustomError
from nbcustom.evaluate import exact_match

OPTIONS = f'--max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{llm_task.SYSTEM}"'


def _base():
    return models.load_llm(models.resolve_llm(None))


def _weights_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _has_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.fixture(scope="module")
def tuned(shell, tmp_path_factory):
    """Version 1 of ``fmt`` tuned through the magic, with the base weights' digest before it."""
    store = tmp_path_factory.mktemp("llm") / "store"
    base, _ = _base()
    digest = _weights_digest(base)
    shell.run_line_magic("config", f"NbCustom.store = {str(store)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'text'")
    shell.user_ns["fmt_rows"] = llm_task.rows(40)
    shell.run_cell_magic("finetune", f"fmt {OPTIONS}", "SELECT * FROM fmt_rows")
    from nbcustom import Store

    return {"store": store, "version": Store(store).get("fmt"), "digest": digest}


# --- data: chat template and labels (tokenizer only) ----------------------------------


def test_training_prompt_ids_equal_generation_ids_and_prompt_carries_no_loss():
    _, tokenizer = _base()
    example = llm_data.encode(tokenizer, llm_data.Example(0, "The Onyx mug is red, 12 dollars.", "Onyx | $12 | red", llm_task.SYSTEM))
    generation = llm_data.prompt_ids(tokenizer, example.prompt, example.system)
    templated = tokenizer.apply_chat_template(llm_data.messages(example.prompt, example.system), add_generation_prompt=True)["input_ids"]
    assert example.ids[: example.prompt_length] == generation == templated
    assert example.labels[: example.prompt_length] == [llm_data.IGNORE] * example.prompt_length
    response = example.labels[example.prompt_length:]
    assert llm_data.IGNORE not in response and response == example.ids[example.prompt_length:]
    # the response turn ends with <|im_end|>, so the tuned model learns to stop
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response, skip_special_tokens=True).strip() == "Onyx | $12 | red"


def test_default_system_message_and_system_column():
    _, tokenizer = _base()
    import pandas as pd

    rows = pd.DataFrame({"prompt": ["a", "b"], "response": ["x", "y"], "system": ["Be brief.", None]})
    first, second = llm_data.examples(rows, tokenizer, "prompt", "response", "Fallback.")
    assert "Be brief." in tokenizer.decode(first.ids) and "Fallback." in tokenizer.decode(second.ids)


def test_split_is_fixed_by_seed_and_batches_cover_every_example_once_per_epoch():
    assert llm_data.split(50, 0.2, 0) == llm_data.split(50, 0.2, 0)
    train, held = llm_data.split(50, 0.2, 0)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 50
    assert llm_data.split(50, 0.2, 1) != (train, held)
    batches = llm_data.batches(100, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(100)) and max(map(len, batches)) == 8
    assert batches != llm_data.batches(100, 8, seed=0, epoch=1)
    assert len(llm_data.schedule(100, 8, epochs=2, max_steps=None, seed=0)) == 26
    assert len(llm_data.schedule(100, 8, epochs=2, max_steps=5, seed=0)) == 5


def test_generation_prompts_are_left_padded():
    import torch

    left = llm_data.left_padded([[5, 6, 7], [8]], 0, "cpu")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].dtype == torch.long


# --- bad input: one line, nothing written, no model loaded --------------------------


@pytest.mark.parametrize(
    "sql, options, message",
    [
        ("SELECT prompt AS question, response FROM fmt_rows", "", "no column 'prompt'"),
        ("SELECT prompt, response AS answer FROM fmt_rows", "", "no column 'response'"),
        ("SELECT prompt, CASE WHEN prompt LIKE 'The%' THEN NULL ELSE response END AS response FROM fmt_rows", "", "NULL or empty 'response'"),
        ("SELECT prompt, '  ' AS response FROM fmt_rows", "", "NULL or empty 'response'"),
        ("SELECT * FROM fmt_rows", "--max-length 8", "every example is longer than --max-length 8"),
        ("SELECT * FROM fmt_rows LIMIT 3", "", "at least 4"),
        ("SELECT * FROM fmt_rows", "--base no-such-model", "looked in local path"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_store_unchanged(ip, store_dir, sql, options, message):
    ip.user_ns["fmt_rows"] = llm_task.rows(12)
    ip.run_line_magic("config", "NbCustom.ui = 'none'")
    before, loads = snapshot(store_dir), models.LOADS["count"]
    with pytest.raises(NbCustomError, match=message) as error:
        ip.run_cell_magic("finetune", f"bad {options}", sql)
    assert "\n" not in str(error.value)
    assert snapshot(store_dir) == before
    assert models.LOADS["count"] == loads


def test_unknown_base_names_every_place_it_looked(ip):
    ip.user_ns["fmt_rows"] = llm_task.rows(12)
    with pytest.raises(NbCustomError) as error:
        ip.run_cell_magic("finetune", "bad --base acme/missing-model", "SELECT * FROM fmt_rows")
    text = str(error.value)
    assert "local path" in text and "Hugging Face cache (acme/missing-model)" in text


# --- one real fine-tune, read by many tests -------------------------------------------


@pytest.mark.slow
def test_finetune_learns_the_house_format(tuned):
    manifest = json.loads((tuned["version"].path / "manifest.json").read_text())
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["exact_match"] >= before["exact_match"] + 0.5
    assert after["eval_loss"] < before["eval_loss"] and after["perplexity"] < before["perplexity"]
    assert set(after) == {"eval_loss", "perplexity", "exact_match", "token_f1", "rouge_l"}
    assert manifest["counts"]["held_out"] == 8 and manifest["counts"]["trained"] == 32
    assert manifest["base"]["name"] == "smollm2-135m-instruct" and Path(manifest["base"]["path"]).is_dir()
    run = manifest["llm"]
    # the throughput is the training steps': the holdout evaluations between them are timed apart
    assert run["tokens_per_s"] == pytest.approx(manifest["counts"]["train_tokens"] / run["train_seconds"], rel=0.01)
    assert len(run["evaluations"]) >= 1 and run["eval_seconds"] > 0


@pytest.mark.slow
def test_version_files_adapter_examples_and_loss_chart(tuned):
    import pandas as pd

    path = tuned["version"].path
    model = path / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in model.iterdir()}
    assert (path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    examples = pd.read_parquet(path / "eval.parquet")
    assert list(examples.columns) == ["prompt", "reference", "before", "after"] and len(examples) == 8
    matches = [exact_match(a, r) for a, r in zip(examples["after"], examples["reference"])]
    assert sum(matches) / len(matches) == tuned["version"].manifest["metrics"]["after"]["exact_match"]
    assert len(pd.read_parquet(path / "train.parquet")) == 32


@pytest.mark.slow
def test_cached_base_model_stays_pristine(tuned):
    base, _ = _base()
    assert not _has_lora(base) and not hasattr(base, "peft_config")
    assert _weights_digest(base) == tuned["digest"]


@pytest.mark.slow
def test_saved_adapter_loads_with_peft_in_a_fresh_process_and_matches_predict(tuned, shell):
    shell.run_line_magic("config", f"NbCustom.store = {str(tuned['store'])!r}")
    shell.user_ns["fresh"] = llm_task.rows(6, seed=7)[["prompt"]]
    predicted = shell.run_cell_magic("predict", "fmt --max-new-tokens 12", "SELECT * FROM fresh")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import PeftModel
        adapter, base_path, system = sys.argv[1], sys.argv[2], sys.argv[3]
        prompts = json.loads(sys.stdin.read())
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        tokenizer.padding_side = "left"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
        texts = [tokenizer.apply_chat_template([{{"role": "system", "content": system}}, {{"role": "user", "content": p}}],
                                               tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        print(json.dumps([tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]))
        """
    )
    manifest = tuned["version"].manifest
    run = subprocess.run(
        [sys.executable, "-c", script, str(tuned["version"].model_dir), manifest["base"]["path"], llm_task.SYSTEM],
        input=json.dumps(predicted["prompt"].tolist()), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == predicted["prediction"].tolist()
    assert (predicted["prediction"] == llm_task.rows(6, seed=7)["response"]).mean() >= 0.5


@pytest.mark.slow
def test_load_generates_predicts_and_merges(tuned):
    import torch

    import nbcustom

    model = nbcustom.load("fmt", store=tuned["store"])
    rows = llm_task.rows(3, seed=3).rename(columns={"response": "reference"})
    texts = model.generate(rows["prompt"].tolist(), max_new_tokens=12)
    predicted = model.predict(rows, max_new_tokens=12)
    assert predicted["prediction"].tolist() == texts and list(predicted.columns) == ["prompt", "reference", "prediction"]
    merged = model.merged()
    base, tokenizer = _base()
    ids = torch.tensor([llm_data.prompt_ids(tokenizer, rows["prompt"][0], llm_task.SYSTEM)])
    from nbcustom.engines.llm.generate import adapted

    with torch.no_grad(), adapted(base, adapter_dir=model.adapter_dir) as peft_model:
        expected = peft_model(input_ids=ids).logits
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-3)
    assert not _has_lora(base)
    with pytest.raises(NbCustomError, match="no column 'prompt'"):
        model.predict(rows.rename(columns={"prompt": "text"}))


@pytest.mark.slow
def test_second_finetune_continues_from_v1_without_reloading_the_base(tuned, shell):
    shell.run_line_magic("config", f"NbCustom.store = {str(tuned['store'])!r}")
    loads = models.LOADS["count"]
    v1 = tuned["version"].manifest
    shell.run_cell_magic("finetune", "fmt --max-steps 1 --lr 1e-4 --eval-frac 0.2 --max-new-tokens 12", "SELECT * FROM fmt_rows")
    from nbcustom import Store

    v2 = Store(tuned["store"]).get("fmt")
    assert v2.version == 2 and v2.manifest["parent"] == 1
    assert models.LOADS["count"] == loads
    before = v2.manifest["metrics"]["before"]
    for metric in ("exact_match", "token_f1", "rouge_l"):
        assert before[metric] == v1["metrics"]["after"][metric]
    assert before["eval_loss"] == pytest.approx(v1["metrics"]["after"]["eval_loss"], rel=1e-4)
    # continuing keeps v1's LoRA settings and its system message
    assert v2.manifest["llm"]["lora"] == v1["llm"]["lora"] and v2.manifest["llm"]["system"] == llm_task.SYSTEM


# --- Ctrl-C and --resume ------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_writes_no_version_and_resume_continues_from_the_checkpoint(ip, store_dir, monkeypatch, tiny):
    monkeypatch.setattr(_train_module(), "CHECKPOINT_SECONDS", 0)  # a checkpoint at every planned step
    ip.user_ns["fmt_rows"] = llm_task.rows(20)
    options = f"--base {tiny} --max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 8"
    seen: list[int] = []
    real_step = TextDisplay.step

    def interrupting(self, step, total=None, **metrics):
        if self.state.phase == "training" and "loss" in metrics:
            seen.append(step)
            if step == 3 and len(seen) == 3:
                raise KeyboardInterrupt
        real_step(self, step, total, **metrics)

    monkeypatch.setattr(TextDisplay, "step", interrupting)
    before = snapshot(store_dir)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("finetune", f"resumable {options}", "SELECT * FROM fmt_rows")
    assert snapshot(store_dir) == before
    assert not _has_lora(models.load_llm(Path(tiny))[0])
    assert seen == [1, 2, 3]

    seen.clear()
    ip.run_cell_magic("finetune", f"resumable {options} --resume", "SELECT * FROM fmt_rows")
    assert seen == [3, 4]  # steps 1-2 came from the checkpoint saved at step 2
    from nbcustom import Store

    version = Store(store_dir).get("resumable")
    assert version.version == 1 and version.manifest["llm"]["resumed_from"] == 2
    assert version.manifest["counts"]["steps"] == 4
    from nbcustom.engines.llm.train import Checkpoint

    assert not Checkpoint(store_dir, "resumable", "").folder.exists()  # cleared once the version is made


@pytest.mark.slow  # the slow disk: about 10 s more
def test_a_checkpoint_holds_its_steps_adapter_while_the_next_step_runs(ip, store_dir, monkeypatch, tiny):
    """A thread writes each checkpoint from the live tensors while the next step's gradient is
    computed, and the optimizer waits for it: a slow disk must not let the next update into
    the checkpoint."""
    import time

    import torch
    from peft import get_peft_model_state_dict

    from nbcustom.engines.llm.train import Checkpoint, _Writer

    saved, written = [], []
    real_save, real_run = Checkpoint.save, _Writer.run

    def noting_save(self, model, *args, **kwargs):
        saved.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        real_save(self, model, *args, **kwargs)

    def slow_run(self):
        time.sleep(2.5)  # a slow disk: the next step computes meanwhile
        real_run(self)
        written.append(torch.load(self.folder / "state.pt", weights_only=False)["adapter"])

    monkeypatch.setattr(Checkpoint, "save", noting_save)
    monkeypatch.setattr(_Writer, "run", slow_run)
    monkeypatch.setattr(_train_module(), "CHECKPOINT_SECONDS", 0)
    ip.user_ns["fmt_rows"] = llm_task.rows(20)
    ip.run_cell_magic("finetune", f"slowdisk --base {tiny} --max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 8", "SELECT * FROM fmt_rows")
    assert len(saved) == len(written) == 3  # after steps 1-3
    assert not all(torch.equal(saved[0][k], saved[-1][k]) for k in saved[0])  # the adapter changed meanwhile
    for at_save, on_disk in zip(saved, written):
        assert at_save.keys() == on_disk.keys() and all(torch.equal(at_save[k], on_disk[k]) for k in at_save)


@pytest.mark.slow
def test_a_run_shorter_than_the_checkpoint_interval_writes_no_checkpoint(ip, store_dir, monkeypatch, tiny):
    """Checkpoints come at the planned steps, but at most one per ``CHECKPOINT_SECONDS``: a
    short run spends no CPU on them."""
    from nbcustom import Store
    from nbcustom.engines.llm.train import Checkpoint

    saves = []
    monkeypatch.setattr(Checkpoint, "save", lambda self, *args, **kwargs: saves.append(self))
    monkeypatch.setattr(_train_module(), "CHECKPOINT_SECONDS", 3600)
    ip.user_ns["fmt_rows"] = llm_task.rows(12)
    ip.run_cell_magic("finetune", f"quick --base {tiny} --max-steps 3 --eval-frac 0.25 --max-new-tokens 1", "SELECT * FROM fmt_rows")
    assert Store(store_dir).get("quick").manifest["counts"]["steps"] == 3 and saves == []
    summaries = []
    monkeypatch.setattr(TextDisplay, "finish", lambda self, summary: summaries.append(summary))
    ip.run_cell_magic("finetune", f"again --base {tiny} --max-steps 1 --eval-frac 0.25 --max-new-tokens 1 --resume", "SELECT * FROM fmt_rows")
    assert any(note.startswith("--resume found no checkpoint of this run") for note in summaries[0].notes), summaries[0].notes


def _train_module():
    """``nbcustom.engines.llm.train`` the module (the package's ``train`` is its function)."""
    import sys

    from nbcustom.engines.llm.train import Checkpoint

    return sys.modules[Checkpoint.__module__]
