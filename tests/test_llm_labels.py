"""Label tasks, evaluation during training, early stopping and the adapter kept, on the real
embedded SmolLM2 (CPU, small data, few steps). Early stopping, ``--keep last`` and ``--resume``
are plumbing, checked on the tests' 2-layer ``tiny`` model (at a rate where its holdout loss
turns up within a few steps). The full label run (accuracy, confusion matrix, a saved notebook)
is in test_llm_labels_notebook.py."""

from __future__ import annotations

import sys

import pytest

import label_task
import llm_task
from conftest import snapshot
from nbcustom import Store, models
from nbcustom.display.run import TextDisplay
from nbcustom.engines.llm import data as llm_data, labels as llm_labels
from nbcustom.engines.llm.early_stop import Watch
from nbcustom.errors import NbCustomError
from nbcustom.specs import FinetuneSpec


def _tokenizer():
    from nbcustom.engines.llm.train import _tokenizer

    return _tokenizer(models.resolve_llm(None))


def _choose(frame, task="auto", previous=None):
    train_at, held_at = llm_data.split(len(frame), 0.1, 0)
    return llm_labels.choose(task, frame["response"].tolist(), train_at, held_at, _tokenizer(), "response", previous)


# --- choosing the task (tokenizer only) --------------------------------------------------


def test_auto_picks_labels_for_few_short_values_and_says_why():
    labels, why = _choose(label_task.rows(200))
    assert labels == label_task.LABELS
    assert why.startswith("labels (auto)") and "5 distinct values" in why and "every holdout label occurs in training" in why


def test_auto_picks_text_for_long_values_or_a_holdout_label_never_trained_on():
    labels, why = _choose(llm_task.rows(40))
    assert labels is None and why.startswith("text (auto)") and "tokens" in why
    frame = label_task.rows(60)
    _, held_at = llm_data.split(len(frame), 0.1, 0)
    frame.loc[held_at[0], "response"] = "zephyr"  # a label only the holdout has
    labels, why = _choose(frame)
    assert labels is None and "holdout value 'zephyr' never occurs in training" in why
    assert _choose(frame, task="labels")[0] == sorted([*label_task.LABELS, "zephyr"])
    assert _choose(label_task.rows(60), task="text") == (None, "text (--task text)")


def test_a_continued_label_model_keeps_its_label_order_and_adds_new_labels():
    frame = label_task.rows(60)
    frame.loc[frame["response"] == "ember", "response"] = "fable"
    previous = ["ember", "delta", "cedar", "boreal", "atlas"]
    labels, why = _choose(frame, task="labels", previous=previous)
    assert labels == [*previous, "fable"] and "the 5 labels of the previous version kept" in why


def test_task_labels_on_thousands_of_long_values_is_one_line_and_leaves_the_store_unchanged(ip, store_dir):
    import pandas as pd

    words = "the customer wrote a long message about an order that went wrong in several ways".split()
    ip.user_ns["essays"] = pd.DataFrame({
        "prompt": [f"ticket {i}" for i in range(3000)],
        "response": [" ".join(words[(i + j) % len(words)] for j in range(30)) + f" ({i})" for i in range(3000)],
    })
    before, loads = snapshot(store_dir), models.LOADS["count"]
    with pytest.raises(NbCustomError, match="--task labels: 'response' has 3,000 distinct values .* tokens .*use --task text") as error:
        ip.run_cell_magic("finetune", "essays --task labels", "SELECT * FROM essays")
    assert "\n" not in str(error.value)
    assert snapshot(store_dir) == before and models.LOADS["count"] == loads


@pytest.mark.parametrize("options, message", [("--task words", "--task must be one of auto, text, labels"),
                                              ("--keep first", "--keep must be one of best, last"),
                                              ("--patience -1", "--patience must be 0"), ("--eval-every 0", "--eval-every must be positive")])
def test_bad_options_are_one_line(ip, options, message):
    ip.user_ns["tickets"] = label_task.rows(20)
    with pytest.raises(NbCustomError, match=message):
        ip.run_cell_magic("finetune", f"tickets {options}", "SELECT * FROM tickets")


# --- evaluation schedule and patience (no model) ------------------------------------------


def _watch(**options):
    return Watch(FinetuneSpec.from_options(**options), {"step": 0})


def test_default_evaluations_are_about_ten_per_run_and_at_least_one_per_epoch():
    watch = _watch()
    watch.plan(total=63, per_epoch=21)
    assert watch.every == 7 and [s for s in range(1, 64) if watch.due(s, 63)] == list(range(7, 64, 7))
    watch.plan(total=90, per_epoch=4)  # short epochs: every epoch
    assert watch.every == 4 and watch.due(90, 90)  # and always after the last step
    explicit = _watch(eval_every=5)
    explicit.plan(total=63, per_epoch=21)
    assert explicit.every == 5


def test_patience_counts_evaluations_without_improvement():
    assert _watch().patience == 0  # off unless asked for
    watch = _watch(patience=2, keep="last")
    stops = [watch.record(None, step, loss) for step, loss in enumerate([3.0, 2.0, 2.5, 1.9995, 2.1], 1)]
    # 1.9995 is better than 2.0, so it is the best, but by less than MIN_DELTA: still stale
    assert stops == [False, False, False, True, True]
    assert watch.state["best"] == {"step": 4, "eval_loss": 1.9995}
    never = _watch(keep="last")
    assert not any(never.record(None, step, 1.0 + step) for step in range(1, 20))


# --- batched label scoring (the base model, inference only) ------------------------------


def test_batched_label_scores_equal_each_labels_full_forward_log_likelihood():
    import torch

    model, tokenizer = models.load_llm(models.resolve_llm(None))
    texts = ["My invoice charged me twice.", "hi", "The parcel never arrived at my house, where is it now?"]
    prompts = [llm_data.prompt_ids(tokenizer, t, label_task.SYSTEM) for t in texts]
    labels = ["atlas", "boreal", "sign-in issue", "x"]
    answers = llm_labels.label_tokens(tokenizer, labels)
    # a label is scored as the response turn training uses: the label, then end of turn
    assert all(a[-1] == tokenizer.eos_token_id for a in answers) and tokenizer.decode(answers[2][:-1]) == "sign-in issue"
    scores = llm_labels.log_likelihoods(model, prompts, answers, tokenizer.pad_token_id)
    for i, prompt in enumerate(prompts):
        for j, answer in enumerate(answers):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), -1)
            expected = sum(float(logp[len(prompt) - 1 + k, token]) for k, token in enumerate(answer))
            assert scores[i, j] == pytest.approx(expected, abs=1e-3)
    predicted, confidence = llm_labels.classify(model, tokenizer, prompts, labels)
    assert predicted == [labels[j] for j in scores.argmax(1)]
    assert all(0 < c <= 1 for c in confidence)


def test_label_metrics_come_from_scikit_learn():
    from sklearn.metrics import f1_score

    references = ["a", "a", "b", "c", "c", "c"]
    predictions = ["a", "b", "b", "c", "a", "c"]
    scores, details = llm_labels.metrics(predictions, references, ["a", "b", "c"])
    assert scores == {"accuracy": pytest.approx(4 / 6), "macro_f1": pytest.approx(f1_score(references, predictions, average="macro"))}
    assert details["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert details["per_class"]["b"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


# --- training: early stopping, the adapter kept, resume -----------------------------------

TICKETS = f'--eval-frac 0.2 --lr 2e-3 --batch-size 8 --system "{label_task.SYSTEM}"'


def _holdout_loss(version, frame) -> float:
    """The saved adapter's mean holdout loss, recomputed from the version's files in the
    precision the run evaluated in."""
    from nbcustom.engines.llm import precision
    from nbcustom.engines.llm.generate import adapted, mean_loss

    model, tokenizer = models.load_llm(version.manifest["base"]["path"])
    options = version.manifest["options"]
    _, held_at = llm_data.split(len(frame), options["eval_frac"], options["seed"])
    held = llm_data.examples(frame.iloc[held_at].reset_index(drop=True), tokenizer, "prompt", "response", version.manifest["llm"]["system"])
    with adapted(model, adapter_dir=version.model_dir) as peft_model, precision.choose("cpu", options["precision"]).computing(peft_model):
        return mean_loss(peft_model, held, tokenizer.pad_token_id)


@pytest.mark.slow
def test_patience_stops_early_and_keeps_the_best_adapter(ip, store_dir, tiny):
    frame = ip.user_ns["tickets"] = label_task.rows(40)
    ip.run_cell_magic("finetune", f"tickets {TICKETS} --base {tiny} --lr 2e-2 --max-steps 30 --eval-every 1 --patience 2", "SELECT * FROM tickets")
    version = Store(store_dir).get("tickets")
    run = version.manifest["llm"]
    evals = dict(map(tuple, run["evaluations"]))
    assert run["planned_steps"] == 30 and run["steps"] < 30 and version.manifest["counts"]["steps"] == run["steps"]
    assert run["patience"] == 2 and run["keep"] == "best" and run["kept_step"] == run["best_step"] <= run["steps"]
    assert run["best_eval_loss"] == pytest.approx(version.manifest["metrics"]["after"]["eval_loss"], rel=1e-6)
    assert _holdout_loss(version, frame) == pytest.approx(run["best_eval_loss"], rel=1e-5)
    assert min(evals.values()) == evals[run["best_step"]] == run["best_eval_loss"] and max(evals) == run["steps"]


@pytest.mark.slow
def test_keep_last_saves_the_last_step_and_runs_every_step(ip, store_dir, tiny):
    frame = ip.user_ns["tickets"] = label_task.rows(40)
    ip.run_cell_magic("finetune", f"tickets {TICKETS} --base {tiny} --max-steps 4 --eval-every 2 --keep last --patience 0", "SELECT * FROM tickets")
    version = Store(store_dir).get("tickets")
    run = version.manifest["llm"]
    assert run["steps"] == run["planned_steps"] == 4 and run["kept_step"] == 4 and run["eval_every"] == 2
    assert _holdout_loss(version, frame) == pytest.approx(version.manifest["metrics"]["after"]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_keeps_the_best_so_far(ip, store_dir, monkeypatch, tiny):
    """The run is interrupted at its last step: the checkpoint holds the best evaluation and
    its adapter, and the resumed run keeps the best over all evaluations, before and after."""
    import torch

    from nbcustom.engines.llm.train import Checkpoint

    frame = ip.user_ns["tickets"] = label_task.rows(40)
    options = f"{TICKETS} --base {tiny} --lr 5e-3 --max-steps 8 --eval-every 1 --patience 0"
    monkeypatch.setattr(sys.modules[Checkpoint.__module__], "CHECKPOINT_SECONDS", 0)  # a checkpoint at every planned step
    real_step = TextDisplay.step

    def interrupting(self, step, total=None, **metrics):
        if self.state.phase == "training" and "loss" in metrics and step == 8 and not interrupting.done:
            interrupting.done = True
            raise KeyboardInterrupt
        real_step(self, step, total, **metrics)

    interrupting.done = False
    monkeypatch.setattr(TextDisplay, "step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("finetune", f"tickets {options}", "SELECT * FROM tickets")
    folder = Checkpoint(store_dir, "tickets", "").folder
    import json

    saved = json.loads((folder / "state.json").read_text())
    best = torch.load(folder / "state.pt", weights_only=False)["best"]
    assert saved["best"]["step"] <= 7 and saved["best"]["eval_loss"] == min(loss for _, loss in saved["eval_history"])
    assert best and all(t.device.type == "cpu" for t in best.values())

    ip.run_cell_magic("finetune", f"tickets {options} --resume", "SELECT * FROM tickets")
    version = Store(store_dir).get("tickets")
    run = version.manifest["llm"]
    evals = dict(map(tuple, run["evaluations"]))
    assert run["resumed_from"] == 7 and run["steps"] == 8 and sorted(evals) == list(range(1, 9))
    assert run["best_eval_loss"] == min(evals.values()) == evals[run["best_step"]]
    assert _holdout_loss(version, frame) == pytest.approx(run["best_eval_loss"], rel=1e-5)


def test_without_lr_a_label_task_trains_at_3e_3_and_free_text_at_2e_4(tmp_path):
    """The default learning rate follows the task (tests/benchmarks/RESULTS.md, label tasks)."""
    import nbcustom

    tiny = llm_task.tiny_base(tmp_path / "tiny")
    options = dict(store=tmp_path / "store", base=str(tiny), max_steps=1, eval_frac=0.25, max_new_tokens=2, ui="none")
    labels = nbcustom.finetune("router", label_task.rows(20), **options)
    text = nbcustom.finetune("fmt", llm_task.rows(12), **options)
    assert (labels.manifest["llm"]["task"], labels.manifest["llm"]["lr"]) == ("labels", 3e-3)
    assert (text.manifest["llm"]["task"], text.manifest["llm"]["lr"]) == ("text", 2e-4)
    given = nbcustom.finetune("router", label_task.rows(20), lr=5e-4, **options)
    assert given.manifest["llm"]["lr"] == 5e-4
