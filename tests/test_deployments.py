"""deployments/: the work-pool templates and the deployments of prefect.yaml, as a real Prefect server takes them, and
`lifecycle run SPEC --deployment NAME`, which queues a flow run of one for the pool's workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from uuid import UUID

import pytest
import yaml

from .conftest import ROOT, cli_env

DEPLOYMENTS = ROOT / "deployments"
POOL_TYPES = {"lifecycle": "process", "lifecycle-docker": "docker", "lifecycle-kubernetes": "kubernetes"}


@pytest.fixture(scope="module")
def deployed(prefect_harness) -> dict[str, UUID]:
    """Every pool of prefect.yaml made on the server (the Docker and Kubernetes ones from deployments/pools/), and every
    deployment: the server refuses a template whose placeholders are not declared variables or whose defaults do not
    fit their schema, and a deployment whose job variables do not fit its pool's. Deployment name -> id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    project = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    with get_client(sync_client=True) as client:
        for name, kind in POOL_TYPES.items():
            template = DEPLOYMENTS / "pools" / f"{kind}.json"
            base = json.loads(template.read_text()) if template.exists() else {}
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=base), overwrite=True)
        flow_id = client.create_flow_from_name("lifecycle")
        return {
            entry["name"]: client.create_deployment(
                flow_id=flow_id,
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                parameters=entry["parameters"],
                work_pool_name=entry["work_pool"]["name"],
                job_variables=entry["work_pool"].get("job_variables", {}),
                pull_steps=entry.get("pull", project["pull"]),
            )
            for entry in project["deployments"]
        }


def test_every_deployment_runs_the_lifecycle_flow_on_a_spec_of_the_repository_in_its_pool(deployed) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint

    assert set(deployed) == {"toy", "quick", "docker", "docker-gpu", "kubernetes"}
    with get_client(sync_client=True) as client:
        for deployment_id in deployed.values():
            deployment = client.read_deployment(deployment_id)
            flow = load_flow_from_entrypoint(str(ROOT / deployment.entrypoint))
            assert flow.name == "lifecycle" and set(deployment.parameters) <= set(flow.parameters.properties)
            assert (ROOT / deployment.parameters["spec_path"]).exists()
            folder = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]
            # the image's deployments run in the image's copy of the repository (deployments/Dockerfile's WORKDIR)
            in_image = POOL_TYPES[deployment.work_pool_name] != "process"
            assert folder == ("/opt/llm-lifecycle" if in_image else "{{ $PWD }}")
        pool = client.read_work_pool("lifecycle-kubernetes")
    assert "WORKDIR /opt/llm-lifecycle" in (DEPLOYMENTS / "Dockerfile").read_text()
    # the Kubernetes job asks for a GPU, names the tracking server and mounts the data volume
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "{{ mlflow_tracking_uri }}"} in container["env"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]


def lifecycle_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flows.cli", "run", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_with_a_deployment_queues_a_flow_run_for_its_workers_and_trains_nothing_here(
    deployed, prefect_api, tmp_path
) -> None:
    from prefect.client.orchestration import get_client

    home = tmp_path / "home"
    submitted = lifecycle_run("examples/quick.yaml", "--deployment", "quick", env=cli_env(home, prefect_api))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    first, prefect_link = submitted.stdout.splitlines()[:2]
    assert first.startswith("examples/quick.yaml submitted to deployment lifecycle/quick: flow run ")
    flow_run_id = UUID(first.split("(")[1].split(")")[0])
    assert prefect_link.strip().startswith("Prefect: http://") and str(flow_run_id) in prefect_link
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.deployment_id == deployed["quick"] and flow_run.parameters == {"spec_path": "examples/quick.yaml"}
    assert flow_run.state.is_scheduled()  # queued for a worker of the pool: this machine ran nothing
    assert not (home / "mlflow.db").exists() and not (home / "work").exists()

    unknown = lifecycle_run("examples/quick.yaml", "--deployment", "nowhere", env=cli_env(home, prefect_api))
    assert unknown.returncode == 2 and "error: no deployment lifecycle/nowhere on the Prefect server" in unknown.stderr
    serverless = lifecycle_run("examples/quick.yaml", "--deployment", "quick", env=cli_env(home))
    assert serverless.returncode == 2 and "set PREFECT_API_URL" in serverless.stderr


def test_a_flow_run_cannot_make_its_docker_container_privileged_or_mount_the_host(deployed) -> None:
    from prefect.client.orchestration import get_client
    from prefect.utilities.templating import apply_values

    template = json.loads((DEPLOYMENTS / "pools" / "docker.json").read_text())
    variables = template["variables"]["properties"]
    defaults = {name: schema["default"] for name, schema in variables.items() if "default" in schema}
    attack = {"privileged": True, "volumes": ["/:/host"], "network_mode": "host", "container_create_kwargs": {}}
    rendered = apply_values(template["job_configuration"], defaults | attack)
    assert rendered["privileged"] is False and rendered["volumes"] == ["lifecycle-data:/data:ro"]
    assert rendered["container_create_kwargs"] == {"shm_size": "2g", "device_requests": []}
    assert "network_mode" not in rendered and rendered["networks"] == ["lifecycle"]
    # and the server refuses such a deployment outright: the pool declares no such variables
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("lifecycle")
        for name, value in attack.items():
            with pytest.raises(Exception, match="(?i)validation|additional|unprocessable|422"):
                client.create_deployment(
                    flow_id=flow_id,
                    name=f"attack-{name}",
                    entrypoint="flows/lifecycle.py:lifecycle",
                    work_pool_name="lifecycle-docker",
                    job_variables={name: value},
                )


def test_the_team_servers_ask_who_calls_and_the_secrets_stay_out_of_the_image() -> None:
    compose = yaml.safe_load((DEPLOYMENTS / "compose.yaml").read_text())
    services = compose["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"] and "mlflow_admin_password" in mlflow["secrets"]
    auth = (DEPLOYMENTS / "mlflow-auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in auth and "\nadmin_password" not in auth  # from the secret
    prefect = services["prefect"]
    assert prefect["secrets"] == ["prefect_auth_string"]
    assert prefect["environment"]["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert "*" not in prefect["environment"]["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    # only the socket proxy sees Docker's socket, read-only; no service runs as root for it
    sockets = {name for name, s in services.items() for v in s.get("volumes", []) if "docker.sock" in str(v)}
    assert sockets == {"docker-proxy"} and services["docker-proxy"]["volumes"] == [
        "/var/run/docker.sock:/var/run/docker.sock:ro"
    ]
    assert all("user" not in s for s in services.values())
    assert (
        services["docker-proxy"]["environment"]["EXEC"] == 0 and services["docker-proxy"]["environment"]["VOLUMES"] == 0
    )
    # every secret is a file of deployments/secrets, which neither git nor the image build takes
    assert {s["file"] for s in compose["secrets"].values()} == {
        f"./secrets/{name}"
        for name in ("mlflow_admin_password", "mlflow_flask_secret", "prefect_auth_string", "signing_key")
    }
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "deployments/secrets" in ignored and "**/*.env" in ignored
    assert "deployments/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_entrypoint_gives_each_secret_to_its_variable_and_refuses_a_short_one(tmp_path) -> None:
    made = subprocess.run(
        ["sh", str(DEPLOYMENTS / "make-secrets.sh")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    folder = DEPLOYMENTS / "secrets"
    try:
        assert made.returncode == 0, made.stderr
        assert {p.name for p in folder.iterdir()} == {
            "mlflow_admin_password",
            "mlflow_flask_secret",
            "prefect_auth_string",
            "signing_key",
        }
        assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir())  # the owner's alone
        shown = subprocess.run(
            [
                "sh",
                str(DEPLOYMENTS / "with-secrets.sh"),
                "sh",
                "-c",
                "echo $PREFECT_API_AUTH_STRING $LIFECYCLE_SIGNING_KEY",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(folder)},
        )
        auth, key = shown.stdout.split()
        assert auth == (folder / "prefect_auth_string").read_text() and auth.startswith("lifecycle:")
        assert key == (folder / "signing_key").read_text() and len(key) == 64
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    (tmp_path / "mlflow_admin_password").write_text("admin")
    refused = subprocess.run(
        ["sh", str(DEPLOYMENTS / "with-secrets.sh"), "true"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(tmp_path)},
    )
    assert refused.returncode == 1 and "mlflow_admin_password is shorter than 16" in refused.stderr


SWEEP = """
name: pooled
model: {{init: {{hidden_size: 32, layers: 1, heads: 2, max_seq_len: 128}}}}
tokenizer: {{train: {{vocab_size: 300, data: [{data}/pretrain.jsonl]}}}}
sweep: {{grid: {{sft.train.lr: [0.001, 0.003]}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl, packing: {{block_size: 64}},
      train: {{max_steps: 4, batch_size: 8}}}}
  - {{name: sft, kind: sft, data: {data}/sft.jsonl, max_len: 128, train: {{max_steps: 4, batch_size: 8}}}}
"""


def test_a_sweep_from_a_deployment_runs_each_branch_as_a_flow_run_of_the_pools_workers(
    prefect_harness, prefect_api, tmp_path
) -> None:
    """A real process worker: the sweep's flow run queues its two branches as flow runs of the same deployment, the
    worker runs them beside it, and the stages they share (the tokenizer, pretrain) train once."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    spec = tmp_path / "pooled.yaml"
    spec.write_text(SWEEP.format(data=ROOT / "examples" / "data"))
    pool = "lifecycle-sweep-test"  # a pool of its own: no flow run another test left queued is taken
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name("lifecycle"),
            name="pooled",
            entrypoint="flows/lifecycle.py:lifecycle",
            parameters={"spec_path": str(spec)},
            work_pool_name=pool,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )
    home = tmp_path / "home"
    env = cli_env(home, prefect_api) | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        submitted = lifecycle_run(str(spec), "--deployment", "pooled", env=env)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        flow_run_id = UUID(submitted.stdout.split("(")[1].split(")")[0])
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            while not (run := client.read_flow_run(flow_run_id)).state.is_final():
                assert time.monotonic() < deadline, f"the sweep's flow run is still {run.state.name}"
                time.sleep(2)
            assert run.state.is_completed(), run.state.message
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    branches = sorted(r.parameters.get("branch") or "" for r in runs)
    assert branches == ["", "sft.train.lr=0.001", "sft.train.lr=0.003"]  # the sweep's own, then each branch's
    assert all(r.state.is_completed() for r in runs)
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("pooled").experiment_id
    names = [r.info.run_name for r in mlflow.search_runs([experiment], "attributes.status = 'FINISHED'")]
    assert {name: names.count(name) for name in ("tokenizer", "pretrain", "sft")} == {
        "tokenizer": 1,
        "pretrain": 1,
        "sft": 2,
    }
