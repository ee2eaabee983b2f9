"""The project home: where the embedded MLflow store, Prefect's state and the work live.

`./.lifecycle` by default, `$LIFECYCLE_HOME` when set; always made absolute, so nothing
depends on the working directory once a command has started. A tracking URI or Prefect API
the user has set already (a real server when scaling out) is respected, never overridden.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.errors import LifecycleError

if TYPE_CHECKING:
    from tasks.plan import PlannedStage

CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get("LIFECYCLE_HOME", ".lifecycle")).expanduser().resolve())

    @property
    def embedded_tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI", self.embedded_tracking_uri)

    @property
    def artifact_root(self) -> str | None:
        """Artifacts of new experiments go under the home with a local store; a tracking server decides its own."""
        return (
            None
            if self.tracking_uri.startswith(("http://", "https://", "databricks"))
            else (self.root / "artifacts").as_uri()
        )

    def work(self, stage: PlannedStage) -> Path:
        """A stage's working folder: in-stage Trainer checkpoints survive here for a resume."""
        return self.root / "work" / stage.folder

    def claim_file(self, stage: PlannedStage) -> Path:
        """The file a process holds locked while it runs the stage (the kernel lets go of it when the process dies)."""
        return self.root / "claims" / f"{stage.folder}.lock"

    def cache(self, kind: str, key: str) -> Path:
        """The cache entry `kind`/`key`. Both are single names (a key often comes from the store, where anyone who can
        write a tag could put `../x` or an absolute path), so an entry is always inside the home's cache."""
        for part in (kind, key):
            if not CACHE_NAME.fullmatch(part):
                raise LifecycleError(
                    f"{part!r} is not a name the home's cache takes (a letter or digit, then letters, digits, '.', '_' "
                    f"or '-'): refused, so nothing is read or written outside {self.root / 'cache'}"
                )
        return self.root / "cache" / kind / key

    def configure(self) -> None:
        """Point MLflow and Prefect at the home unless the user pointed them elsewhere. Call before importing
        prefect."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_TRACKING_URI", self.embedded_tracking_uri)
        os.environ.setdefault("PREFECT_HOME", str(self.root / "prefect"))
        # PREFECT_HOME also moves Prefect's profiles; keep the user's, where a server URL may be set with `prefect
        # config set`
        user_profiles = Path("~/.prefect/profiles.toml").expanduser()
        if user_profiles.exists():
            os.environ.setdefault("PREFECT_PROFILES_PATH", str(user_profiles))
        # no network beyond this machine: neither library reports its usage home unless the user says so
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def lease_seconds() -> float:
    """How long a RUNNING run counts as alive after its last heartbeat ($LIFECYCLE_LEASE_SECONDS). The process that
    opened the run renews it four times a lease; one renewal can take as long as MLflow retries a request that fails
    (`mlflow_retry_seconds`), so by default a lease outlasts a quarter lease plus that: no run is judged dead while its
    owner's client is still retrying (about 5.6 minutes with MLflow's default retries, and at least a minute)."""
    if "LIFECYCLE_LEASE_SECONDS" in os.environ:
        return float(os.environ["LIFECYCLE_LEASE_SECONDS"])
    return max(60.0, 4 / 3 * mlflow_retry_seconds())


def mlflow_retry_seconds() -> float:
    """The longest MLflow's HTTP client waits between the tries of one request: its retries
    ($MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7), each after backoff_factor·2^i seconds ($MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    2; urllib3 caps one wait at 120 s) plus up to $MLFLOW_HTTP_REQUEST_BACKOFF_JITTER (1) seconds."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "1"))
    return sum(min(factor * 2**i, 120.0) + jitter for i in range(retries))


def host() -> str:
    """This machine's name in the runs it opens: $LIFECYCLE_HOST where set (a container's hostname often says little,
    and two containers may share one), else the hostname."""
    return os.environ.get("LIFECYCLE_HOST") or socket.gethostname()


def sweep_partials(home: Home) -> int:
    """Remove cache entries left half-written by a process that died (`<key>.partial-<pid>`, and a DPO reference
    inside a datasets entry); how many were removed. Nothing ever reads a partial entry, so this only gives the space
    back."""
    removed = 0
    cache = home.root / "cache"
    for partial in [*cache.glob("*/*.partial-*"), *cache.glob("datasets/*/*.partial-*")]:
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and not running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
            removed += 1
    return removed


def running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc to ask: kill(0) answered


def started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), so a pid the system has handed to a new process is not
    mistaken for the old one; "" where /proc is not there to say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
