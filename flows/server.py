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
import threading
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from schemas.errors import LifecycleError
from tasks.home import Home, running, started

WATCH_SECONDS = 15.0  # how often the server checks that its home still records it and that it is still used
IDLE = "LIFECYCLE_SERVER_IDLE_SECONDS"  # a server no request reached for this long stops itself (0: never)
KEEPALIVE_SECONDS = 60.0  # how often a `lifecycle run` on the home's server tells it it is still used
START_TIMEOUT = (
    300.0  # seconds; a first start migrates a new database: 34 s seen on an idle slow machine, more under load
)
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
    return running(pid)


def _ours(state: dict) -> bool:
    """The process `state` records is still the server this home started: alive, and started when it was (a pid the
    system has handed to another process since is never signalled)."""
    return _alive(state["pid"]) and state.get("started") == started(state["pid"])


def _recorded(folder: Path) -> dict | None:
    """The server this home recorded, if its process still runs this Prefect version (it may still be starting)."""
    try:
        state = json.loads((folder / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("prefect") == version("prefect") and _ours(state) else None


def _lock(folder: Path):
    """An open file holding the lock under which one process at a time starts or stops the home's server."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "server.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(folder: Path) -> tuple[int, str]:
    """Start the server detached (a kill of this command's process group leaves it running) on a socket bound here,
    so its port is known at once and no other process can take it while the server loads."""
    with socket.socket() as sock, open(folder / "server.log", "w") as output:
        sock.bind(("127.0.0.1", 0))
        command = [sys.executable, "-m", "flows.server", str(folder / "server.json"), str(sock.fileno())]
        process = subprocess.Popen(
            command,
            env=os.environ | EPHEMERAL,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[sock.fileno()],
        )
        return process.pid, f"http://127.0.0.1:{sock.getsockname()[1]}/api"


def idle_seconds() -> float:
    """How long the home's server waits for a request before it stops itself ($LIFECYCLE_SERVER_IDLE_SECONDS, an hour
    by default; 0 keeps it until `lifecycle stop`). A run keeps it in use (`keep_alive`), however long its stages."""
    return float(os.environ.get(IDLE, "3600"))


class Activity:
    """An ASGI app that notes when its app last had a request (none yet: it is starting, however long that takes)."""

    def __init__(self, app):
        self.app, self.last = app, None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.last = time.monotonic()
        await self.app(scope, receive, send)


def serve(record: Path, fd: int) -> None:
    """Prefect's API app under uvicorn, as Prefect runs its own ephemeral server, on the socket `fd`, for as long as the
    home records this process as its server and it is used: removing the home (`make clean`), `lifecycle stop`, a
    newer server or `idle_seconds` without a request ends it, so no server outlives its use."""
    import uvicorn
    from prefect.server.api.server import create_app

    app, idle = Activity(create_app()), idle_seconds()

    def watch() -> None:
        while True:
            time.sleep(min(WATCH_SECONDS, idle / 3) if idle > 0 else WATCH_SECONDS)
            try:
                recorded = json.loads(record.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                recorded = None
            unused = idle > 0 and app.last is not None and time.monotonic() - app.last > idle
            if recorded != os.getpid() or unused:
                if unused and recorded == os.getpid():
                    record.unlink(missing_ok=True)  # gone: the next command starts a server anew
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on it
                return

    threading.Thread(target=watch, daemon=True).start()
    config = uvicorn.Config(app, log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


def keep_alive(url: str) -> None:
    """Tell the home's server, from a daemon thread for as long as this process runs, that it is in use: a stage may
    make no API call for hours."""

    def ping() -> None:
        while True:
            time.sleep(KEEPALIVE_SECONDS)
            _healthy(url)

    threading.Thread(target=ping, name="prefect-keepalive", daemon=True).start()


def _answering(state: dict, log: Path, deadline: float, timeout: float) -> None:
    while not _healthy(state["url"]):
        if not _alive(state["pid"]):
            raise ServerError(
                f"the Prefect server for this home exited while starting; its log ({log}) ends with:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            if _ours(state):
                os.killpg(state["pid"], signal.SIGKILL)
            raise ServerError(
                f"the Prefect server for this home did not answer within {timeout:.0f} s (log: {log}); "
                "the machine may be very busy: try again, or start one yourself (`prefect server start`) "
                "and set PREFECT_API_URL"
            )
        time.sleep(0.2)


def start(home: Home, timeout: float = START_TIMEOUT) -> tuple[str, Callable[[], str]]:
    """The API URL of the home's Prefect server, and a function that waits until the server answers.

    The user's PREFECT_API_URL if set; else the home's server, started if none runs. The URL is known at once, so a
    command does its own start-up work (data checks, imports) while a new server starts. A server is recorded as
    soon as it is started, so one whose command stopped before it answered is found, not started twice."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url, lambda: url
    folder = _folder(home)
    if (state := _recorded(folder)) and _healthy(state["url"]):
        return state["url"], lambda: state["url"]
    lock = _lock(folder)
    began = time.monotonic()
    try:
        if (state := _recorded(folder)) is None:
            _stop_recorded(folder)
            print(
                "starting this home's Prefect server (once: later commands reuse it; `lifecycle stop` stops it) ...",
                file=sys.stderr,
                flush=True,
            )
            pid, url = _spawn(folder)
            state = {"pid": pid, "url": url, "prefect": version("prefect"), "started": started(pid)}
            (folder / "server.json").write_text(json.dumps(state))
    except BaseException:
        lock.close()
        raise

    def answering() -> str:
        try:
            _answering(state, folder / "server.log", began + timeout, timeout)
        except ServerError:
            (folder / "server.json").unlink(missing_ok=True)  # it records a server that is gone
            raise
        finally:
            lock.close()
        print(
            f"Prefect server on {state['url'].removesuffix('/api')} ({time.monotonic() - began:.0f} s to start)",
            file=sys.stderr,
            flush=True,
        )
        return state["url"]

    return state["url"], answering


def _stop_recorded(folder: Path) -> bool:
    """Stop the server recorded in `folder`, if its process still runs; forget it either way."""
    path = folder / "server.json"
    try:
        state = json.loads(path.read_text())
        pid = state["pid"]
    except (OSError, ValueError, KeyError):
        return False
    path.unlink()
    if not _ours(state):
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
    with _lock(folder):
        return _stop_recorded(folder)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
