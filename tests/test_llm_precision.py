"""``--precision auto|fp32|bf16``: which precision a run picks and why, and that a bf16 run
on CPU learns what the float32 run learns (tests/test_llm_pack.py compares one step)."""

from __future__ import annotations

import functools
import json
import os

import pytest

import llm_task
from nbcustom.engines.llm import precision

OPTIONS = {"max_steps": 4, "lr": 2e-3, "eval_frac": 0.2, "max_new_tokens": 12, "system": llm_task.SYSTEM, "ui": "none"}


# Other CPUs, patched in (``precision.cpu_features``) to run their paths on every CPU: one
# without native bf16 or oneDNN's bf16 weight packing (an AVX2-only CPU, as an AMD EPYC
# without AVX-512, or most laptops), and one with native bf16 whose oneDNN cannot pack.
AVX2_ONLY = precision.CPUFeatures(native_bf16=(), packs_bf16=False, capability="AVX2")
UNPACKED_BF16 = precision.CPUFeatures(native_bf16=("avx512_bf16",), packs_bf16=False, capability="AVX512")
NO_PACKING = "this CPU cannot pack bf16 weights for oneDNN (it needs avx512bw, avx512vl and avx512dq, or avx_ne_convert)"


@pytest.fixture
def avx2_only(monkeypatch):
    monkeypatch.setattr(precision, "cpu_features", lambda: AVX2_ONLY)


def test_auto_is_bf16_exactly_where_the_cpu_multiplies_bf16_natively():
    import torch

    capabilities = torch.cpu.get_capabilities()
    native = bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16") or capabilities.get("bf16"))
    native = native and precision.cpu_features().packs_bf16
    auto = precision.choose("cpu", "auto")
    assert auto.name == ("bf16" if native else "fp32") and auto.weights == "float32"
    assert any(flag in auto.why for flag in precision.cpu_features().native_bf16) if native else "no native bf16" in auto.why
    forced = precision.choose("cpu", "fp32")
    assert (forced.name, forced.compute) == ("fp32", "float32") and "--precision fp32" in forced.why


def test_on_a_cpu_without_native_bf16_auto_is_fp32_and_bf16_is_one_line_naming_the_features(avx2_only, ip, store_dir):
    from conftest import snapshot
    from nbcustom.errors import NbCustomError

    auto = precision.choose("cpu", "auto")
    assert auto.name == "fp32" and "AVX2" in auto.why and "no native bf16" in auto.why
    replayed = precision.choose("cpu", "bf16", strict=False)  # %%predict of a version trained in bf16 elsewhere
    assert replayed.name == "fp32" and "trained in bf16" in replayed.why
    ip.user_ns["fmt_rows"] = llm_task.rows(12)
    with pytest.raises(NbCustomError, match="needs a CPU with amx_bf16 or avx512_bf16.*use --precision auto or fp32") as error:
        ip.run_cell_magic("finetune", "fmt --precision bf16", "SELECT * FROM fmt_rows")
    assert "\n" not in str(error.value) and snapshot(store_dir) == {}


@pytest.mark.parametrize("cpu", ["this CPU, oneDNN-packed weights", "a CPU that cannot pack, plain bf16 weights"])
def test_a_cpu_bf16_run_computes_in_bf16_and_leaves_the_shared_base_model_as_it_was(cpu, monkeypatch):
    import torch

    if cpu.startswith("this") and not precision.cpu_features().packs_bf16:
        pytest.skip(NO_PACKING)
    if cpu.startswith("a CPU that cannot"):
        monkeypatch.setattr(precision, "cpu_features", lambda: UNPACKED_BF16)
    packed = precision.cpu_features().packs_bf16

    from nbcustom import models
    from nbcustom.engines.llm.generate import adapted, lora_config

    model, _ = models.load_llm(models.resolve_llm(None))
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    with adapted(model, config=lora_config(model, 8, 16)) as peft_model:
        with precision.choose("cpu", "fp32").computing(peft_model):
            assert not torch.is_autocast_enabled("cpu") and q_proj.weight is weight
        with precision.choose("cpu", "bf16").computing(peft_model):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            attention = peft_model.base_model.model.model.layers[0].self_attn
            base = attention.q_proj
            group = base.forward.func.__self__  # q, k and v read the same input: one node; o reads another
            assert group.layers == [attention.q_proj, attention.k_proj, attention.v_proj] and attention.v_proj.forward.func.__self__ is group
            assert attention.o_proj.forward.func.__self__.layers == [attention.o_proj]
            # the group's W and W^T, side by side, in oneDNN's layout where the CPU packs them
            assert all(w.dtype == torch.bfloat16 and w.is_mkldnn == packed for w in group.weights) and base.lora_A["default"].weight.dtype == torch.float32
            x = torch.randn(1, 3, 576)
            assert peft_model.base_model.model.model.layers[0](x, position_embeddings=model.model.rotary_emb(x, torch.arange(3)[None]))[0].dtype == torch.float32
            assert model.config._attn_implementation == "nbcustom_sdpa_float32"
            assert "forward" in vars(base) and model.lm_head.weight.dtype == torch.bfloat16
            assert os.environ.get(precision.ONEDNN_CACHE[0])  # set before oneDNN's first bf16 kernel, unless the user did
        with precision.choose("cpu", "bf16").computing(peft_model, training=False):  # %%predict: plain bf16 copies
            assert all(w.dtype == torch.bfloat16 and not w.is_mkldnn for w in base.forward.func.__self__.weights)
        assert not torch.is_autocast_enabled("cpu") and model.config._attn_implementation == "sdpa"
        assert "forward" not in vars(base) and model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    assert q_proj.weight is weight and weight.dtype == torch.float32


def test_the_lean_lora_forward_is_peft_lora_with_its_scaling():
    """LoRA layers that read the same input (gate and up; down alone) as one autograd node:
    the same outputs and gradients as peft's layers in float32 (up to the order of sums), and in bf16
    (oneDNN-packed W) within rounding."""
    import torch

    from nbcustom import models
    from nbcustom.engines.llm.generate import adapted, lora_config

    model, _ = models.load_llm(models.resolve_llm(None))
    torch.manual_seed(0)
    with adapted(model, config=lora_config(model, 8, 32)) as peft_model:
        mlp = peft_model.base_model.model.model.layers[3].mlp
        layers = [mlp.gate_proj, mlp.up_proj]
        for layer in layers + [mlp.down_proj]:
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
            assert precision._plain_lora(layer) and layer.scaling["default"] == 4.0
        x = torch.randn(2, 7, 576, requires_grad=True)
        h = torch.randn(2, 7, 1536, requires_grad=True)
        tensors = [x, h] + [p for layer in layers + [mlp.down_proj] for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]

        def run(forwards):
            outs = [forward(x) for forward in forwards[:-1]] + [forwards[-1](h)]
            sum(out.float().square().sum() * (i + 1) for i, out in enumerate(outs)).backward()
            grads = [t.grad.clone() for t in tensors]
            for t in tensors:
                t.grad = None
            return [out.detach().float() for out in outs] + grads

        def lean(dtype):  # bf16: W packed for oneDNN, as in training
            pair, down = precision._Adapted(layers, dtype, True), precision._Adapted([mlp.down_proj], dtype, True)
            return [functools.partial(pair.forward, 0), functools.partial(pair.forward, 1), functools.partial(down.forward, 0)]

        peft = run(layers + [mlp.down_proj])
        for a, b in zip(run(lean(torch.float32)), peft):  # equal up to the order of float32 sums
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = run(lean(torch.bfloat16))
        for a, b in zip(half, peft):
            assert (a - b).norm() < 0.02 * b.norm()


def test_bad_precision_is_one_line_and_leaves_the_store_unchanged(ip, store_dir):
    from conftest import snapshot
    from nbcustom.errors import NbCustomError

    ip.user_ns["fmt_rows"] = llm_task.rows(12)
    before = snapshot(store_dir)
    with pytest.raises(NbCustomError, match="--precision must be one of auto, fp32, bf16") as error:
        ip.run_cell_magic("finetune", "fmt --precision fp16", "SELECT * FROM fmt_rows")
    assert "\n" not in str(error.value) and snapshot(store_dir) == before


# bf16 on a CPU without native bf16 is refused (emulated, ~25x slower): its paths are tested
# there with the detection patched (above and tests/test_llm_undo.py)
native_bf16_only = pytest.mark.skipif(not precision.cpu_features().native_bf16, reason="this CPU has no native bf16 (amx_bf16 or avx512_bf16)")


@pytest.mark.slow
@native_bf16_only
def test_bf16_run_learns_what_the_fp32_run_learns(tmp_path):
    import nbcustom

    rows = llm_task.rows(40)
    runs = {p: nbcustom.finetune("fmt", rows, store=tmp_path / p, precision=p, **OPTIONS) for p in ("fp32", "bf16")}
    manifests = {p: json.loads((v.path / "manifest.json").read_text()) for p, v in runs.items()}
    fp32, bf16 = (manifests[p]["metrics"] for p in ("fp32", "bf16"))
    assert fp32["after"]["exact_match"] >= fp32["before"]["exact_match"] + 0.5  # --precision fp32 learns as before
    assert abs(bf16["after"]["exact_match"] - fp32["after"]["exact_match"]) <= 0.05
    # within 10 %, or 0.005 nats where both runs have learned the task (losses near 0.01)
    assert abs(bf16["after"]["eval_loss"] - fp32["after"]["eval_loss"]) < max(0.1 * fp32["after"]["eval_loss"], 0.005)
    for p, manifest in manifests.items():
        assert manifest["options"]["precision"] == p and manifest["llm"]["precision"]["name"] == p
        assert f"--precision {p}" in manifest["llm"]["precision"]["why"]
