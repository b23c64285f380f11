"""Holdout evaluations during training: when they happen (``--eval-every``), the best
adapter so far (``--keep best``) and when to stop (``--patience``).

The evaluation is the holdout's mean loss (no generation), so it is cheap enough to run
about ten times per run. The best adapter's weights are a CPU copy of the LoRA tensors (a
few MB), kept in memory and in every checkpoint, so ``--resume`` keeps the best-so-far.
"""

from __future__ import annotations

import math

EVALUATIONS = 10  # evaluations per run by default
# --patience by default: label tasks stop early (tests/benchmarks/bench_finetune_labels.py:
# as accurate, less time); free text never does (its loss is no proxy for its metrics)
PATIENCE = {"labels": 2, "text": 0}
MIN_DELTA = 1e-3  # a holdout loss this much below the best resets the patience count


class Watch:
    """Decides when to evaluate and stop, and holds the best adapter; its progress lives in
    the run's ``state`` (``best``: step and eval loss, ``stale``: evaluations without
    improvement), which checkpoints save."""

    def __init__(self, spec, state: dict):
        self.eval_every = spec.eval_every
        self.patience = spec.patience or 0
        self.keep = spec.keep
        self.state = state
        self.every = 1
        self.weights: dict | None = None  # the best adapter's tensors (keep best)

    def plan(self, total: int, per_epoch: int) -> None:
        """Evaluate every ``--eval-every`` steps, or about ``EVALUATIONS`` times and at least once per epoch."""
        self.every = self.eval_every or max(1, min(per_epoch, math.ceil(total / EVALUATIONS)))

    def due(self, done: int, total: int) -> bool:
        return done % self.every == 0 or done == total

    def record(self, model, done: int, eval_loss: float) -> bool:
        """Note the evaluation after step ``done``; True when training should stop."""
        best = self.state.get("best")
        improved = best is None or eval_loss < best["eval_loss"] - MIN_DELTA
        if best is None or eval_loss < best["eval_loss"]:
            self.state["best"] = {"step": done, "eval_loss": eval_loss}
            if self.keep == "best":
                from peft import get_peft_model_state_dict

                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
        self.state["stale"] = 0 if improved else self.state.get("stale", 0) + 1
        return bool(self.patience) and self.state["stale"] >= self.patience

    def finish(self, model) -> dict:
        """Put the best adapter back into ``model`` (keep best); the run's facts for the manifest."""
        best = self.state.get("best") or {}
        if self.keep == "best" and self.weights is not None and best.get("step") != self.state["step"]:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, self.weights)
        return {
            "eval_every": self.every, "patience": self.patience, "keep": self.keep,
            "best_step": best.get("step"), "best_eval_loss": best.get("eval_loss"),
            "kept_step": best.get("step") if self.keep == "best" else self.state["step"],
            "evaluations": [list(e) for e in self.state["eval_history"]],
        }


def notes(run: dict) -> list[str]:
    """The summary's lines on early stopping and the adapter kept."""
    lines = []
    if run["steps"] < run["planned_steps"]:
        lines.append(f"stopped early at step {run['steps']} of {run['planned_steps']}: no better holdout loss in {run['patience']} evaluations")
    if run["best_step"] is not None:
        kept = "kept the adapter with the lowest holdout loss" if run["keep"] == "best" else f"kept the last step's adapter (--keep last); lowest holdout loss {run['best_eval_loss']:.4f}"
        lines.append(f"{kept}: best at step {run['best_step']} of {run['steps']}")
    return lines
