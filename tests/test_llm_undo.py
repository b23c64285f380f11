"""Whatever fails inside a fine-tuning run (the bf16 set-up half done, an evaluation, a
training step, generation, Ctrl-C), the kernel's shared base model is left exactly as a
fresh load from disk: same modules, dtypes and values, no adapter, hook or replaced forward,
and it generates as before. A small model of SmolLM2's shape keeps each failure a second."""

from __future__ import annotations

import pytest

import llm_task
from nbcustom import models
from nbcustom.engines.llm import generate as llm_generate, pack as llm_pack, precision

OPTIONS = {"max_steps": 3, "batch_size": 4, "eval_frac": 0.25, "max_new_tokens": 4, "precision": "bf16", "system": llm_task.SYSTEM, "ui": "none"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return llm_task.tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU's bf16 path where it has one; elsewhere a CPU with native bf16 whose oneDNN
    cannot pack weights, so the bf16 set-up runs (emulated: slow, but the model is small)."""
    if not precision.cpu_features().native_bf16:
        monkeypatch.setattr(precision, "cpu_features", lambda: precision.CPUFeatures(("avx512_bf16",), False, "AVX512"))


def fail_in_setup(monkeypatch):
    made, real = [], precision._Adapted.__init__

    def half_then_fail(self, *args):
        if len(made) == 2:  # two groups of layers already swapped in
            raise RuntimeError("injected: the bf16 set-up failed half-way")
        made.append(self)
        real(self, *args)

    monkeypatch.setattr(precision._Adapted, "__init__", half_then_fail)
    return RuntimeError


def failing_loss(monkeypatch, training: bool, error=RuntimeError, after: int = 0):
    calls, real = [], llm_pack.causal_lm_loss

    def loss(model, *args, **kwargs):
        if model.training == training:
            calls.append(1)
            if len(calls) > after:
                raise error(f"injected into {'a training step' if training else 'an evaluation'}")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(llm_pack, "causal_lm_loss", loss)
    return error


def fail_in_generation(monkeypatch):
    calls, real = [], llm_generate.generate

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the tuned model's answers, after training
            raise RuntimeError("injected into generation")
        return real(*args, **kwargs)

    monkeypatch.setattr(llm_generate, "generate", generate)
    return RuntimeError


PHASES = {
    "the precision set-up": fail_in_setup,
    "an evaluation": lambda mp: failing_loss(mp, training=False),
    "a training step": lambda mp: failing_loss(mp, training=True, after=1),
    "generation": fail_in_generation,
    "Ctrl-C in a training step": lambda mp: failing_loss(mp, training=True, error=KeyboardInterrupt, after=1),
}


def differences(model, fresh) -> list[str]:
    """How ``model`` differs from ``fresh`` (the same weights loaded anew): empty if it does not."""
    import torch

    found = []
    modules, fresh_modules = dict(model.named_modules()), dict(fresh.named_modules())
    if modules.keys() != fresh_modules.keys():
        found.append(f"modules differ: {sorted(modules.keys() ^ fresh_modules.keys())[:3]}")
    for name, module in modules.items():
        other = fresh_modules.get(name)
        if other is None:
            continue
        if type(module) is not type(other) or module.training:
            found.append(f"{name}: {type(module).__name__}, training={module.training}")
        if "forward" in vars(module) or getattr(module, "_compiled_call_impl", None) is not None:
            found.append(f"{name}: forward replaced")
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if len(getattr(module, hooks)) != len(getattr(other, hooks)):
                found.append(f"{name}: {hooks} left")
    fresh_params = dict(fresh.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        other = fresh_params[name]
        if p.dtype != other.dtype or p.requires_grad or not torch.equal(p, other):
            found.append(f"{name}: {p.dtype}, requires_grad={p.requires_grad}, equal={p.dtype == other.dtype and torch.equal(p, other)}")
    if (model.lm_head.weight is model.model.embed_tokens.weight) != (fresh.lm_head.weight is fresh.model.embed_tokens.weight):
        found.append("lm_head is no longer tied to the embeddings as loaded")
    if model.config._attn_implementation != fresh.config._attn_implementation or hasattr(model, "peft_config"):
        found.append(f"attention {model.config._attn_implementation}, peft_config {hasattr(model, 'peft_config')}")
    if torch.is_autocast_enabled("cpu"):
        found.append("autocast still on")
    return found


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_failure_in_any_phase_leaves_the_shared_base_model_as_a_fresh_load(phase, tiny_base, bf16_cpu, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import nbcustom

    threads = torch.get_num_threads()
    error = PHASES[phase](monkeypatch)
    with pytest.raises(error, match="injected"):
        nbcustom.finetune("fmt", llm_task.rows(12), store=tmp_path / "store", base=str(tiny_base), **OPTIONS)
    assert not (tmp_path / "store" / "fmt").exists()  # no version
    monkeypatch.undo()  # the real functions again
    model, tokenizer = models.load_llm(tiny_base)  # the kernel's shared copy, used by the run
    fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    assert differences(model, fresh) == [] and torch.get_num_threads() == threads
    ids = torch.tensor([tokenizer.encode("The Onyx lamp comes in red and sells for 12 dollars.")])
    with torch.no_grad():  # and it computes as before, in float32
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_a_run_after_failed_ones_trains_and_commits(tiny_base, bf16_cpu, tmp_path):
    """The next run on the same shared model works: a version, trained in bf16."""
    import nbcustom

    version = nbcustom.finetune("fmt", llm_task.rows(12), store=tmp_path / "store", base=str(tiny_base), **OPTIONS)
    assert version.version == 1 and version.manifest["llm"]["precision"]["name"] == "bf16"
