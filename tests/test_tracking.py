"""MLflow tracking with a real local MLflow store (SQLite beside the artifact store): a
%%retrain becomes a run with params, before/after metrics, a step curve and artifacts; an
unreachable tracking server costs one warning line, never the version. (The %%finetune
run is checked in test_llm_export.py, on that module's fine-tune.)"""

from __future__ import annotations

import time

import pytest

from nbcustom import Store, tracking
from rag_facts import facts_frame
from test_automl import cancer_frame


@pytest.fixture
def tracked(ip, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ip.run_line_magic("config", "NbCustom.tracking = 'mlflow'")
    yield ip
    ip.run_line_magic("config", "NbCustom.tracking = 'none'")


def runs_of(store_dir, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(store_dir))
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name}"
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_retrain_is_an_mlflow_run_with_params_metrics_curve_and_artifacts(tracked, store_dir, capsys):
    tracked.user_ns["cancer_df"] = cancer_frame().head(200)
    tracked.run_cell_magic("retrain", "cancer --target diagnosis --time-limit 10", "SELECT * FROM cancer_df")
    assert capsys.readouterr().err.strip() == ""
    version = Store(store_dir).get("cancer")
    client, runs = runs_of(store_dir, "cancer")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "v1"
    assert run.data.params["target"] == "diagnosis" and run.data.params["time_limit"] == "10"
    after = version.manifest["metrics"]["after"]
    assert run.data.metrics["after_accuracy"] == pytest.approx(after["accuracy"])
    assert run.data.metrics["before_accuracy"] == pytest.approx(version.manifest["metrics"]["before"]["accuracy"])
    curve = client.get_metric_history(run.info.run_id, "val_score")
    assert [m.step for m in curve] == [n for n, _ in version.manifest["history"]["val_score"]] and len(curve) >= 1
    assert run.data.tags["nbcustom.version"] == "1" and run.data.tags["nbcustom.store"] == str(store_dir)
    assert run.data.tags["nbcustom.data_sha256"] == version.manifest["data"]["sha256"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "eval.parquet", "feature_importance.png"} <= artifacts
    assert (store_dir.parent / "mlruns" / "mlflow.db").exists()  # the local store beside nbcustom_store


@pytest.mark.slow
def test_unreachable_tracking_server_keeps_the_version_and_warns_once(tracked, store_dir, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    tracked.user_ns["facts"] = facts_frame()
    tracked.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    warning = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warning) == 1 and "facts@1 is saved, but MLflow tracking failed" in warning[0]
    version = Store(store_dir).get("facts")
    assert version.version == 1
    started = time.monotonic()  # MLflow is imported by now: this is the tracking call alone
    assert tracking.log_version(version, store_dir) is None
    assert time.monotonic() - started < 30  # MLflow's default retries would take minutes
    assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 1


def test_tracking_is_off_by_default_and_follows_the_environment(ip, store_dir, monkeypatch):
    assert tracking.mode() == "none"
    monkeypatch.setenv("NBCUSTOM_TRACKING", "mlflow")
    assert tracking.mode() == "none"  # the kernel's setting wins over the environment
    import subprocess
    import sys

    code = "from nbcustom import tracking; print(tracking.mode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "mlflow"


def test_metric_keys_and_params_from_a_manifest():
    manifest = {
        "options": {"top_k": 4, "llm": None, "text": "fact"},
        "base": "smollm2-135m-instruct",
        "metrics": {"before": {"answer_f1": 0.1}, "after": {"answer_f1": 0.5, "hit_rate@4": 1.0, "per_class": {"a": 1}}},
        "counts": {"read": 30, "flag": True},
        "history": {"loss": [[1, 2.5], [2, 1.5]]},
    }
    assert tracking.params(manifest) == {"top_k": "4", "text": "fact", "base": "smollm2-135m-instruct"}
    assert tracking.metrics(manifest) == [
        ("before_answer_f1", 0.1, 0), ("after_answer_f1", 0.5, 0), ("after_hit_rate_4", 1.0, 0),
        ("count_read", 30.0, 0), ("loss", 2.5, 1), ("loss", 1.5, 2),
    ]
