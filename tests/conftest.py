"""Shared fixtures: a temp project home, tiny trained models, and one real run of examples/quick.yaml for the flow
tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from examples.generate import DATA_DIR
from schemas.spec import ModelInit, PretrainStage, SFTStage, TokenizerTrain, TrainSpec
from stages.common.contract import StageResult
from stages.common.training import complete

# as `lifecycle` sets for its own server and the store: the harness's server and MLflow must not try to reach the
# network
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# as `lifecycle` sets before torch loads: stages trained in the test process wait passively too (a busy CI machine)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "examples" / "quick.yaml"
TINY = ModelInit(hidden_size=64, layers=2, heads=2, max_seq_len=128)
FAST = dict(batch_size=8, lr=3e-3, warmup=0.0, logging_steps=5, precision="fp32")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--train-seed",
        type=int,
        default=0,
        help="the seed of the tiny models the tests train (the shared fixtures and the tests of a stage's direction): "
        "a direction test must pass on several, e.g. `pytest tests/test_alignment.py --train-seed 2`",
    )


@pytest.fixture(scope="session")
def train_seed(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--train-seed")


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Path:
    """A 512-token BPE trained on the bundled pretrain text, with the chatml template."""
    from stages import tokenizer

    texts = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()]
    return tokenizer.run(TokenizerTrain(vocab_size=512), texts, "chatml", tmp_path_factory.mktemp("tok")).checkpoint


@pytest.fixture(scope="session")
def pretrained(trained_tokenizer, train_seed, tmp_path_factory) -> StageResult:
    """A 2-layer, 64-wide Llama pretrained for 40 steps on the bundled text."""
    from transformers import AutoTokenizer

    from stages import pretrain
    from stages.common.contract import StageInputs

    spec = PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[DATA_DIR / "pretrain.jsonl"],
        heldout=[DATA_DIR / "pretrain_heldout.jsonl"],
        packing={"block_size": 64},
        train=TrainSpec(max_steps=40, save_steps=20, seed=train_seed, **FAST),
    )
    prepared = pretrain.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer))
    assert 0 < prepared.counts["train_tail_tokens_dropped"] < 64
    return pretrain.run(spec, StageInputs(TINY, trained_tokenizer, prepared.datasets), tmp_path_factory.mktemp("pre"))


@pytest.fixture(scope="session")
def chat_model(trained_tokenizer, pretrained, train_seed, tmp_path_factory) -> Path:
    """The pretrained tiny model after 200 steps of SFT: the input of the alignment stages."""
    from transformers import AutoTokenizer

    from stages import sft
    from stages.common.contract import StageInputs

    spec = SFTStage(
        name="sft",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        max_len=256,
        template="chatml",
        train=TrainSpec(max_steps=200, seed=train_seed, **FAST),
    )
    datasets = sft.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    return sft.run(
        spec, StageInputs(pretrained.checkpoint, trained_tokenizer, datasets), tmp_path_factory.mktemp("sft")
    ).checkpoint


def stage_run(folder: Path, name: str = "stage"):
    """A real MLflow store in `folder` and a run in it, for a stage run outside the flow: (client, run id)."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else mlflow.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
    )
    return mlflow, mlflow.create_run(experiment_id, run_name=name).info.run_id


def use_home(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point the project home, and with it MLflow and Prefect, at `root` for the duration of a test. Every variable
    `Home.configure` sets where unset is set here, so `main()` run in the test process leaves none of them behind for
    later tests' commands to inherit."""
    monkeypatch.setenv("LIFECYCLE_HOME", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(root / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    profiles = Path("~/.prefect/profiles.toml").expanduser()
    if "PREFECT_PROFILES_PATH" in os.environ or profiles.exists():
        monkeypatch.setenv("PREFECT_PROFILES_PATH", os.environ.get("PREFECT_PROFILES_PATH", str(profiles)))


def cli_env(root: Path, prefect_api: str | None = None) -> dict[str, str]:
    """The environment of a `lifecycle` command in the home `root`, with its own MLflow store; with `prefect_api`,
    on that Prefect server (the harness's) instead of starting one for the home."""
    env = os.environ | {"LIFECYCLE_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # the home's own (<root>/prefect), whatever this process was pointed at
    return env | ({"PREFECT_API_URL": prefect_api} if prefect_api else {})


def start_run(spec: Path, env: dict[str, str]) -> subprocess.Popen:
    """`lifecycle run SPEC` as a process of its own session (a kill of its group reaches all it started), its stderr
    piped: a run a test stops, kills or waits for."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(work: Path, stage: str, process: subprocess.Popen, timeout: float = 600) -> Path:
    """The first complete in-stage checkpoint under `work/<stage glob>/trainer` (the Trainer writes its state file
    last and not atomically: a folder whose state file does not parse yet is not one), while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := sorted(f for f in work.glob(f"{stage}/trainer/checkpoint-*") if complete(f)):
            return found[0]
        if process.poll() is not None:
            said = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"the run ended before {stage} saved a checkpoint:\n{said[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{stage} saved no complete checkpoint in {timeout:.0f} s")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    from flows.server import START_TIMEOUT

    with prefect_test_harness(server_startup_timeout=int(START_TIMEOUT)):  # a busy machine starts it slowly
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> str:
    """The harness's Prefect API, for `lifecycle` commands run as processes."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def quick_run(prefect_harness, tmp_path_factory):
    """examples/quick.yaml run once through the real flow into a temp home: (home, stage run ids)."""
    from flows.lifecycle import lifecycle

    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_home(monkeypatch, root)
        # a sample of the machine a second, not MLflow's one in 10 s: the quick stages take seconds
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        runs = lifecycle(str(QUICK))
    return root, runs
