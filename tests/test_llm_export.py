"""LLM exports of a real fine-tuned SmolLM2 version: merged safetensors loaded by plain
transformers in a fresh process, GGUF (f16 and q8_0) read back by transformers, and the
Ollama Modelfile's template rendered against the tokenizer's chat template.

One small fine-tune per module (``exported``) and one export of each format, shared by
the tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llm_task
from nbcustom import Store, models
from nbcustom.engines.llm import data as llm_data
from nbcustom.engines.llm.generate import generate
from test_tracking import runs_of

OPTIONS = f'--max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{llm_task.SYSTEM}"'
MAX_NEW = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(shell, tmp_path_factory):
    """``fmt`` v1 tuned through the magic, exported as merged, f16 GGUF and Ollama (q8_0)
    with ``%nbc export``, and ``%%predict`` on its holdout prompts plus fresh ones."""
    import pandas as pd

    root = tmp_path_factory.mktemp("llm_export")
    store = root / "store"
    shell.run_line_magic("config", f"NbCustom.store = {str(store)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'none'")
    shell.user_ns["fmt_rows"] = llm_task.rows(40)
    env = pytest.MonkeyPatch()
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    shell.run_line_magic("config", "NbCustom.tracking = 'mlflow'")  # the fine-tune is also the tracking test's run
    try:
        shell.run_cell_magic("finetune", f"fmt {OPTIONS}", "SELECT * FROM fmt_rows")
    finally:
        shell.run_line_magic("config", "NbCustom.tracking = 'none'")
        env.undo()
    version = Store(store).get("fmt")
    holdout = pd.read_parquet(version.path / "eval.parquet")["prompt"].tolist()
    prompts = holdout + llm_task.rows(12, seed=11)["prompt"].tolist()
    shell.user_ns["export_prompts"] = pd.DataFrame({"prompt": prompts})
    predicted = shell.run_cell_magic("predict", f"fmt --max-new-tokens {MAX_NEW}", "SELECT * FROM export_prompts")
    folders = {fmt: root / fmt for fmt in ("merged", "gguf", "ollama")}
    shell.run_line_magic("nbc", f"export fmt --format merged --to {folders['merged']}")
    shell.run_line_magic("nbc", f"export fmt@1 --format gguf --quant f16 --to {folders['gguf']}")
    shell.run_line_magic("nbc", f"export fmt --format ollama --to {folders['ollama']}")
    for name in ("fmt_rows", "export_prompts"):
        shell.user_ns.pop(name)
    return {"store": store, "version": version, "folders": folders, "holdout": len(holdout),
            "prompts": prompts, "predicted": predicted["prediction"].tolist()}


def _generations(model, tokenizer, prompts: list[str]) -> list[str]:
    ids = [llm_data.prompt_ids(tokenizer, p, llm_task.SYSTEM) for p in prompts]
    return generate(model, tokenizer, ids, MAX_NEW)


def test_merged_export_loads_without_nbcustom_or_peft_and_generates_as_predict(exported):
    folder = exported["folders"]["merged"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    script = textwrap.dedent(
        """
        import json, sys

        sys.modules["nbcustom"] = sys.modules["peft"] = None  # as if neither were installed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, system = sys.argv[1], sys.argv[2]
        prompts = json.loads(sys.stdin.read())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                               tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        assert sys.modules["nbcustom"] is None and sys.modules["peft"] is None
        print(json.dumps([tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]))
        """
    )
    holdout = exported["prompts"][: exported["holdout"]]
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder), llm_task.SYSTEM], input=json.dumps(holdout),
        capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == exported["predicted"][: exported["holdout"]]


def test_gguf_f16_generates_as_the_merged_model_and_q8_0_nearly(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = exported["folders"]["merged"]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = exported["prompts"]
    with models.quiet():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        expected = _generations(merged, tokenizer, prompts)
        del merged
        f16_dir = exported["folders"]["gguf"]
        f16 = AutoModelForCausalLM.from_pretrained(f16_dir, gguf_file="fmt-v1.f16.gguf", dtype=torch.float32).eval()
        assert _generations(f16, tokenizer, prompts) == expected
        del f16
        q8 = AutoModelForCausalLM.from_pretrained(exported["folders"]["ollama"], gguf_file="fmt-v1.q8_0.gguf", dtype=torch.float32).eval()
        same = [a == b for a, b in zip(_generations(q8, tokenizer, prompts), expected)]
    print(f"q8_0: {sum(same)}/{len(same)} generations equal to the merged model's")
    assert sum(same) / len(same) >= 0.9
    assert expected[: exported["holdout"]] == exported["predicted"][: exported["holdout"]]


def test_gguf_metadata_carries_the_tokenizer_chat_template_and_turn_end_token(exported):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["folders"]["merged"])
    reader = GGUFReader(exported["folders"]["gguf"] / "fmt-v1.f16.gguf")
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(field("tokenizer.ggml.tokens")))))
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.ggml.eos_token_id") == eos == field("tokenizer.ggml.eot_token_id")
    assert field("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    types = {t.name.split(".")[0]: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd"] == "F16" and "output" not in types  # tied embedding: no output.weight
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("_norm.weight")} == {"F32"}
    q8 = GGUFReader(exported["folders"]["ollama"] / "fmt-v1.q8_0.gguf")
    assert {t.tensor_type.name for t in q8.tensors if len(t.shape) == 2} == {"Q8_0"}


def render_go_template(template: str, values: dict) -> str:
    """The subset of Go's text/template the Modelfile uses: ``{{ .Field }}`` and
    ``{{ if .Field }}...{{ end }}``; like Ollama, stop at ``{{ .Response }}`` when the
    response is still to be generated."""
    template = template.split("{{ .Response }}")[0] if not values.get("Response") else template
    template = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m.group(2) if values.get(m.group(1)) else "", template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), template)


def modelfile_fields(text: str) -> dict:
    fields = {}
    for match in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER stop) (?:"""(.*?)"""|"(.*?)"|(\S+))$', text, re.M | re.S):
        fields[match.group(1)] = next(g for g in match.groups()[1:] if g is not None)
    return fields


def test_ollama_modelfile_template_renders_the_chat_template(exported):
    from transformers import AutoTokenizer

    folder = exported["folders"]["ollama"]
    tokenizer = AutoTokenizer.from_pretrained(exported["folders"]["merged"])
    text = (folder / "Modelfile").read_text()
    fields = modelfile_fields(text)
    assert (folder / fields["FROM"]).is_file() and fields["FROM"] == "./fmt-v1.q8_0.gguf"
    assert fields["SYSTEM"] == llm_task.SYSTEM
    assert fields["PARAMETER stop"] == "<|im_end|>" == tokenizer.eos_token
    prompt = "The Onyx mug is red and costs 12 dollars."
    for system in (llm_task.SYSTEM, "Answer in French."):
        rendered = render_go_template(fields["TEMPLATE"], {"System": system, "Prompt": prompt})
        expected = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        assert rendered == expected
    assert "ollama create fmt -f Modelfile" in (folder / "README.md").read_text()


def test_ollama_system_defaults_to_the_template_s_own_when_the_version_has_none():
    from nbcustom.engines.llm.export import modelfile

    _, tokenizer = models.load_llm(models.resolve_llm(None))
    fields = modelfile_fields(modelfile(tokenizer, "m.gguf", None))
    prompt = "Hello"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert render_go_template(fields["TEMPLATE"], {"System": fields["SYSTEM"], "Prompt": prompt}) == expected


def test_finetune_with_tracking_is_an_mlflow_run_with_the_loss_curve(exported):
    manifest = exported["version"].manifest
    client, runs = runs_of(exported["store"], "fmt")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "v1"
    assert run.data.params["max_steps"] == "4" and run.data.params["lora_r"] == "16"
    assert run.data.params["base"] == "smollm2-135m-instruct" and run.data.params["system"] == llm_task.SYSTEM
    for side in ("before", "after"):
        for metric in ("eval_loss", "exact_match", "rouge_l"):
            assert run.data.metrics[f"{side}_{metric}"] == pytest.approx(manifest["metrics"][side][metric])
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    assert [m.value for m in loss] == pytest.approx([value for _, value in manifest["history"]["loss"]])
    evaluations = client.get_metric_history(run.info.run_id, "eval_loss")  # every holdout evaluation during training
    assert [(m.step, m.value) for m in evaluations] == [tuple(e) for e in manifest["history"]["eval_loss"]] and len(evaluations) == 4
    assert {"manifest.json", "eval.parquet", "loss.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["nbcustom.data_sha256"] == manifest["data"]["sha256"] and run.data.tags["nbcustom.kind"] == "llm"
