"""An AutoGluon callback that reports each fitted model to the run display.

Its own module because AutoGluon pickles the callbacks with its trainer: the class must be
importable by name (and it imports AutoGluon, so only the engine imports this module).
"""

from __future__ import annotations

from autogluon.core.callbacks import AbstractCallback


class Progress(AbstractCallback):
    """One display step and one log line per fitted model."""

    def __init__(self, display):
        super().__init__()
        self.display = display
        self.done = 0

    def __getstate__(self):
        # the display (a notebook handle) stays with the run, not in the saved predictor
        return {**self.__dict__, "display": None}

    def _after_model_fit(self, trainer, model_names, stack_name="core", level=1):
        if self.display is None:
            return False
        for name in model_names:
            self.done += 1
            score = trainer.get_model_attribute(name, "val_score")
            if score is None:
                self.display.log(f"{name}: fitted")
                continue
            self.display.step(self.done, None, val_score=float(score))
            self.display.log(f"{name}: validation {trainer.eval_metric.name} {score:.4g}")
        return False
