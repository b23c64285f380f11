"""Promotion: whether a new version becomes the active one, decided in this one place.

The new version and the version it was trained from are scored on the same holdout (the
engines do that); this module reads the task's main metric on both sides and applies the
``--promote`` policy: ``always`` (the magics' default), ``if-better`` (jobs' default) or
``never``. A tie counts as not worse: the new version has seen at least as many rows. A
version that is not promoted is still saved, inactive, with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .display.render import better, fmt
from .specs import PROMOTE as POLICIES

JOB_DEFAULT = "if-better"


@dataclass
class Decision:
    """A promotion decision, stored in the manifest (``promotion``) and the catalog."""

    policy: str
    promote: bool
    reason: str  # one line for `%nbc versions` and the runs table
    metric: str | None = None
    new: float | None = None  # the new version's score
    old: float | None = None  # the compared version's score, same holdout
    against: int | None = None  # the version compared with
    worse: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, name: str, version: int) -> str | None:
        """The summary's one clear line when the new version is worse or left inactive."""
        if self.worse:
            head = f"v{version} is worse than v{self.against} on the same holdout: {self.metric} {fmt(self.new)} vs {fmt(self.old)}"
            if self.promote:
                return f"{head} — `%nbc activate {name} {self.against}` to roll back"
            return f"{head} — kept inactive (--promote {self.policy}); `%nbc activate {name} {version}` to use it anyway"
        if not self.promote:
            return f"v{version} is saved inactive ({self.reason}); `%nbc activate {name} {version}` to use it"
        return None


def main_metric(after: dict, info: dict) -> tuple[str, bool] | None:
    """(name, higher is better) of the task's main metric: the engine's ``eval_metric`` (AutoML,
    scored on its natural scale with ``higher_is_better``), else an LLM's ``eval_loss``."""
    name = info.get("eval_metric")
    if name in after:
        higher = info.get("higher_is_better")
        return name, higher if higher is not None else better(name, 1.0) is True
    if "eval_loss" in after:
        return "eval_loss", False
    return None


def decide(policy: str, outcome, previous) -> Decision:
    """The decision for a run's ``outcome`` (an ``engines.Outcome``) trained from the
    version ``previous`` (None for a first version)."""
    if previous is None:
        return Decision(policy, True, "first version")
    against = previous.version
    chosen = main_metric(outcome.after, outcome.info)
    # the "before" side is the previous version only when the engine scored that version
    # (a RAG refresh has no holdout; a forecast of another horizon is compared with a baseline)
    compared = chosen is not None and outcome.before_label == f"v{against}" and chosen[0] in outcome.before
    if not compared:
        reason = f"no holdout metric to compare with v{against}"
        return Decision(policy, policy != "never", f"{reason}; --promote never" if policy == "never" else reason, against=against)
    metric, higher = chosen
    new, old = float(outcome.after[metric]), float(outcome.before[metric])
    worse = new < old if higher else new > old
    figures = f"{metric} {fmt(new)} vs v{against}'s {fmt(old)} on the same holdout"
    if policy == "never":
        promote, reason = False, f"--promote never ({figures})"
    elif policy == "if-better":
        promote = not worse
        reason = f"{'promoted' if promote else 'not promoted'}: {figures} ({'worse' if worse else 'not worse'}, --promote if-better)"
    else:
        promote, reason = True, f"promoted: {figures}" + (" (worse, --promote always)" if worse else "")
    return Decision(policy, promote, reason, metric, new, old, against, worse)
