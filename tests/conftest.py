"""Shared fixtures: a temp project home, and one real run of examples/quick.yaml for the flow tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "examples" / "quick.yaml"


def use_home(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point the project home, and with it MLflow, at `root` for the duration of a test."""
    monkeypatch.setenv("LIFECYCLE_HOME", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def quick_run(prefect_harness, tmp_path_factory):
    """examples/quick.yaml run once through the real flow into a temp home: (home, stage run ids)."""
    from flows.lifecycle import lifecycle

    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_home(monkeypatch, root)
        runs = lifecycle(str(QUICK))
    return root, runs
