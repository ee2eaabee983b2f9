"""The home's Prefect server: started by the first command that needs it, kept for the next ones.

Prefect's ephemeral mode starts a temporary API server inside every `lifecycle run` and gives it
20 s to answer. On a slow or busy 2-core machine that start took 27-34 s with a new database
(so a first run failed) and about 20 s with the database already there (so every re-run paid it
again). Here the same server (Prefect's own ASGI app with its ephemeral settings: no UI, no
background services) is started once per home, detached, with a start-up limit sized for slow
machines; later commands find it through `<home>/prefect/server.json` and pay nothing.
`lifecycle stop` stops it. A `PREFECT_API_URL` the user set (a real server) is used as it is.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

from schemas.errors import LifecycleError
from tasks.home import Home

START_TIMEOUT = 300.0  # seconds; a first start migrates a new database: 34 s seen on an idle slow machine, more under load
EPHEMERAL = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerError(LifecycleError):
    """The home's Prefect server could not be started or reached: the message says why and what to do."""


def _folder(home: Home) -> Path:
    return Path(os.environ.get("PREFECT_HOME", home.root / "prefect"))


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, exited: reaped here
            return False
    except ChildProcessError:
        pass  # not our child: started by an earlier command
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its new parent) answers kill(0) but is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _recorded(folder: Path) -> dict | None:
    """The running server this home recorded, if it still answers and runs this Prefect version."""
    try:
        state = json.loads((folder / "server.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("prefect") != version("prefect") or not _alive(state["pid"]) or not _healthy(state["url"]):
        return None
    return state


@contextmanager
def _locked(folder: Path):
    """One process at a time starts or stops the home's server."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(folder: Path, timeout: float) -> dict:
    # found, not imported: Prefect reads its settings once, on import, and this process has yet to set PREFECT_API_URL
    packages = Path(find_spec("prefect").origin).parent.parent
    log = folder / "server.log"
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(packages), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    with open(log, "w") as output:  # detached: a kill of the command's process group leaves the server to the next command
        process = subprocess.Popen(command, env=os.environ | EPHEMERAL, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if process.poll() is not None:
            raise ServerError(f"the Prefect server for this home exited with code {process.returncode} while starting; "
                              f"its log ({log}) ends with:\n{_tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            raise ServerError(f"the Prefect server for this home did not answer within {timeout:.0f} s (log: {log}); "
                              "the machine may be very busy: try again, or start one yourself (`prefect server start`) "
                              "and set PREFECT_API_URL")
        time.sleep(0.2)
    return {"pid": process.pid, "url": url, "prefect": version("prefect")}


def ensure(home: Home, timeout: float = START_TIMEOUT) -> str:
    """The API URL of the home's Prefect server, started if none answers; the user's PREFECT_API_URL if set."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    folder = _folder(home)
    if state := _recorded(folder):
        return state["url"]
    with _locked(folder):
        if state := _recorded(folder):  # another command started it while this one waited
            return state["url"]
        _stop_recorded(folder)
        print("starting this home's Prefect server (once: later commands reuse it; `lifecycle stop` stops it) ...",
              file=sys.stderr, flush=True)
        began = time.monotonic()
        state = _start(folder, timeout)
        (folder / "server.json").write_text(json.dumps(state))
        print(f"Prefect server on {state['url'].removesuffix('/api')} ({time.monotonic() - began:.0f} s to start)",
              file=sys.stderr, flush=True)
        return state["url"]


def _stop_recorded(folder: Path) -> bool:
    """Stop the server recorded in `folder`, if its process still runs; forget it either way."""
    path = folder / "server.json"
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return False
    path.unlink()
    if not _alive(pid):
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    return True


def stop(home: Home) -> bool:
    """Stop the home's Prefect server; False if none was running."""
    folder = _folder(home)
    with _locked(folder):
        return _stop_recorded(folder)
