"""`lifecycle run SPEC --deployment NAME`: the spec handed to a Prefect deployment, whose work pool's workers run it,
in place of a run in this process.

The deployment's flow is this project's `lifecycle` flow, so what runs on a worker is what `lifecycle run` runs here:
the data checks first, then every stage reused or trained against the workers' tracking server. The spec path is sent
as it is: a worker reads it relative to the folder its deployment runs in (the repository root for a process worker,
/opt/llm-lifecycle in the image) or as an absolute path (the pool's data volume, /data/...). The spec is checked here
first when this machine has it, so a spec with an error is never queued.
"""

from __future__ import annotations

from pathlib import Path

from schemas.errors import LifecycleError
from schemas.load import load_spec
from tasks.home import Home

FLOW = "lifecycle"  # the flow's name in flows/lifecycle.py: a deployment's full name is lifecycle/<deployment>


class SubmitError(LifecycleError):
    """The run could not be handed to the deployment: no Prefect server, or no such deployment."""


def deployment_name(name: str) -> str:
    return name if "/" in name else f"{FLOW}/{name}"


def submit(spec_path: Path, deployment: str, home: Home) -> list[str]:
    """Create a flow run of `deployment` for the spec; the lines that say where to follow it."""
    name = deployment_name(deployment)
    notes = []
    if spec_path.exists():
        spec_name = load_spec(spec_path).name
    else:
        spec_name = None
        notes.append(f"note: {spec_path} is not on this machine; the worker reads it where its deployment runs")

    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.urls import url_for

    if not PREFECT_API_URL.value():
        raise SubmitError(
            "--deployment needs the Prefect server the workers poll: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api), or `prefect config set PREFECT_API_URL=...`"
        )
    try:
        # timeout=0: queued, not waited for; as_subflow off: this process runs no flow the run would belong to
        flow_run = run_deployment(name, parameters={"spec_path": str(spec_path)}, timeout=0, as_subflow=False)
    except ObjectNotFound:
        raise SubmitError(
            f"no deployment {name} on the Prefect server at {PREFECT_API_URL.value()}; "
            "`prefect deployment ls` lists them (deployments/prefect.yaml makes ours)"
        ) from None
    lines = [
        *notes,
        f"{spec_path} submitted to deployment {name}: flow run {flow_run.name} ({flow_run.id}), "
        f"{flow_run.state.name if flow_run.state else 'scheduled'}",
        f"  Prefect: {url_for(flow_run) or PREFECT_API_URL.value()}",
    ]
    lines.append(f"  MLflow:  {_experiment_link(home, spec_name)}")
    lines.append(f"follow it with `lifecycle status {spec_path}` where MLFLOW_TRACKING_URI names the workers' server")
    return lines


def _experiment_link(home: Home, spec_name: str | None) -> str:
    """The spec's experiment on the tracking server this machine points at, when that is a server: where the workers
    record too, if they share it. A local store is not where a worker records."""
    uri = home.tracking_uri.rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return "recorded where the workers' MLFLOW_TRACKING_URI points; set it here too to follow the run"
    if spec_name is None:
        return uri
    from tasks.lineage import client, ui_route

    experiment = client(home).get_experiment_by_name(spec_name)
    if experiment is None:
        return f"{uri} (experiment {spec_name}, made when the run starts)"
    return f"{uri}/{ui_route(experiment.experiment_id)}"
