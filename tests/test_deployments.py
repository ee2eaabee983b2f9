"""deployments/: the work-pool templates and the deployments of prefect.yaml, as a real Prefect server takes them, and
`lifecycle run SPEC --deployment NAME`, which queues a flow run of one for the pool's workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
