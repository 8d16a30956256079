"""``make team-up`` / ``make team-down`` (``python -m pipeline.team up|down``): a team's stack on
this machine, to try team mode: PostgreSQL, an mlflow server on it and a Ray head, all on loopback.

Everything lives in ``team/`` (git-ignored; ``--dir`` for another folder): the PostgreSQL cluster
(``pg/``), the server's artifacts (``mlartifacts/``), the logs, Ray's token (``ray_token``), what a
shell sources to reach the Ray head (``env``), and ``stack.json``, the process ids ``down`` stops and
nothing else. Each service runs in a session of its own; ``down`` ends the session's leader
(PostgreSQL's postmaster, the server, the ``ray start --block`` that owns Ray's processes), waits,
then kills by id whatever of that session is left.

Ray 2.60 turns ``--node-ip-address=127.0.0.1`` into the host's address, and its GCS, raylet and
agents then listen on every interface or on that address. Its setting
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps the loopback address it was given: with it and
``--dashboard-host=127.0.0.1`` every port listens on 127.0.0.1 only. Its token authentication is on
only when a token is found (``~/.ray/auth_token``, left by any earlier local ``ray.init()``); the
stack turns it on itself (``RAY_AUTH_MODE=token``) with a token of its own. ``up`` reads what the
started processes listen on (psutil) and prints what is beyond loopback, if anything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from catnet.errors import ConfigError
from pipeline.common import ROOT

LOOPBACK = "127.0.0.1"
HOME = STATE = ENV_FILE = TOKEN = Path()  # set by use(): the stack's folder and its files


def use(folder: Path) -> None:
    """The stack's folder (``team/`` of the project unless ``--dir``) and the files in it."""
    global HOME, STATE, ENV_FILE, TOKEN
    HOME = folder.resolve()
    STATE = HOME / "stack.json"  # what down stops: process ids, with their start times
    ENV_FILE = HOME / "env"  # what a shell sources to reach the stack's Ray head
    TOKEN = HOME / "ray_token"  # Ray's token (mode 600)


use(ROOT / "team")


def ray_env(address: str) -> dict[str, str]:
    """What the head and every driver of the stack need: loopback kept as the node's address, and
    Ray's token authentication on, with the stack's own token."""
    return {"RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(TOKEN), "RAY_USAGE_STATS_ENABLED": "0"}


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        path = shutil.which("initdb")
        if not path:
            raise ConfigError("PostgreSQL is not installed: apt-get install postgresql (Debian's package)")
        return Path(path).parent
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its tools run as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _session_pids(leader: int) -> list[int]:
    """The processes of the session ``leader`` started (it may be gone; they keep its id)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _wait_until(check, seconds: float, what: str, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise ConfigError(f"{what} did not answer within {seconds:.0f} s (log {log}"
                      + (f": {tail[0]}" if tail else "") + ")")


def _start_postgres(port: int, services: list) -> str:
    bindir, pg = _pg_bin(), HOME / "pg"
    pg.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres")
        if subprocess.run(_as_postgres(["test", "-w", str(pg)])).returncode != 0:
            raise ConfigError(f"the postgres user cannot write {pg}: a folder above it is closed to other users "
                              "(chmod o+x on each, or clone the project elsewhere)")
    data, log = pg / "data", pg / "log"
    if not (data / "PG_VERSION").exists():
        _run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "catnet"]), "initdb")
    _run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                       f"-p {port} -c listen_addresses={LOOPBACK} -c unix_socket_directories=''", "start"]), "pg_ctl start")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    services.append({"name": "postgresql", "pid": pid, "started": _started(pid), "stop": "SIGINT"})
    for database in ("mlflow", "optuna"):
        exists = subprocess.run(_as_postgres([str(bindir / "psql"), "-h", LOOPBACK, "-p", str(port), "-U", "catnet",
                                              "-d", "postgres", "-tAc",
                                              f"SELECT 1 FROM pg_database WHERE datname='{database}'"]),
                                capture_output=True, text=True).stdout.strip()
        if exists != "1":
            _run(_as_postgres([str(bindir / "createdb"), "-h", LOOPBACK, "-p", str(port), "-U", "catnet", database]),
                 f"createdb {database}")
    return f"postgresql://catnet@{LOOPBACK}:{port}"


def _run(cmd: list[str], what: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"{what}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=HOME, stdin=subprocess.DEVNULL, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def _start_mlflow(port: int, database: str, services: list) -> str:
    import urllib.request

    uri, log = f"http://{LOOPBACK}:{port}", HOME / "mlflow.log"
    proc = _spawn([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"{database}/mlflow",
                   "--artifacts-destination", str(HOME / "mlartifacts"), "--host", LOOPBACK, "--port", str(port),
                   "--workers", "1"], log, {"MLFLOW_DISABLE_TELEMETRY": "true"})
    services.append({"name": "mlflow server", "pid": proc.pid, "started": _started(proc.pid), "stop": "SIGTERM"})

    def answers() -> bool:
        if proc.poll() is not None:
            raise ConfigError(f"mlflow server exited with {proc.returncode} (log {HOME / 'mlflow.log'})")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return True
        except OSError:
            return False

    _wait_until(answers, 120, "the mlflow server", log)
    return uri


def _start_ray(port: int, client_port: int, dashboard_port: int, services: list) -> str:
    import secrets

    log, address = HOME / "ray.log", f"{LOOPBACK}:{port}"
    if not TOKEN.exists():
        TOKEN.touch(mode=0o600)
        TOKEN.write_text(secrets.token_hex(32))
    env = ray_env(address)
    env.pop("RAY_ADDRESS")  # the head starts a cluster; it does not join one
    temp = Path(f"/tmp/catnet-ray-{os.getuid()}-{port}")  # Ray's sockets: a path short enough for AF_UNIX
    proc = _spawn([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                   f"--node-ip-address={LOOPBACK}", f"--port={port}", f"--ray-client-server-port={client_port}",
                   f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp}",
                   "--disable-usage-stats"], log, env)
    services.append({"name": "ray head", "pid": proc.pid, "started": _started(proc.pid), "stop": "SIGTERM",
                     "temp_dir": str(temp)})
    ENV_FILE.write_text(f"# make team-up's Ray head, for the shell that runs catnet against it: source {_shown(ENV_FILE)}\n"
                        + "".join(f"export {k}={v}\n" for k, v in ray_env(address).items()))

    def answers() -> bool:  # a driver, as a sweep connects: with team/env's settings
        if proc.poll() is not None:
            raise ConfigError(f"ray start exited with {proc.returncode} (log {HOME / 'ray.log'})")
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"], capture_output=True,
                               env={**os.environ, **ray_env(address)}, timeout=120)
        return probe.returncode == 0

    _wait_until(answers, 180, "the Ray head", log)
    return address


def beyond_loopback(services: list) -> list[str]:
    """``address:port (process)`` for each listening socket of the stack's processes that is not on
    a loopback address."""
    import psutil

    pids = {pid for s in services for pid in _session_pids(s["pid"])} | {s["pid"] for s in services}
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        host = conn.laddr.ip.removeprefix("::ffff:")
        if not (host.startswith("127.") or host == "::1"):
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            out.append(f"{conn.laddr.ip}:{conn.laddr.port} ({name})")
    return sorted(out)


def up(pg_port: int, mlflow_port: int, ray_port: int, client_port: int, dashboard_port: int) -> dict:
    """Start the stack (or say it is up already); what to use, as a dict."""
    if STATE.exists():
        state = json.loads(STATE.read_text())
        if all(_started(s["pid"]) == s["started"] for s in state["services"]):
            print("team: the stack is up already (make team-down stops it)")
            _show(state)
            return state
        print(f"team: the stack in {_shown(STATE)} is not whole: stopping what is left of it first")
        down()
    import_error = _missing_extra()
    if import_error:
        raise ConfigError(import_error)
    for port, what in ((pg_port, "PostgreSQL"), (mlflow_port, "mlflow server"), (ray_port, "Ray head"),
                       (client_port, "Ray client server"), (dashboard_port, "Ray dashboard")):
        if not _port_free(port):
            raise ConfigError(f"port {port} ({what}) is taken on {LOOPBACK}: choose another, e.g. "
                              "make team-up TEAM_ARGS='--mlflow-port 5001'")
    HOME.mkdir(parents=True, exist_ok=True)
    services: list[dict] = []
    state = {"services": services}
    try:
        database = _start_postgres(pg_port, services)
        STATE.write_text(json.dumps(state, indent=1))
        state["tracking_uri"] = _start_mlflow(mlflow_port, database, services)
        STATE.write_text(json.dumps(state, indent=1))
        state["ray_address"] = _start_ray(ray_port, client_port, dashboard_port, services)
        state["optuna_storage"] = f"{database}/optuna"
        state["dashboard"] = f"http://{LOOPBACK}:{dashboard_port}"
        state["beyond_loopback"] = beyond_loopback(services)
        STATE.write_text(json.dumps(state, indent=1))
    except BaseException:
        STATE.write_text(json.dumps(state, indent=1))
        down(quiet=True)
        raise
    _show(state)
    return state


def _missing_extra() -> str | None:
    for module in ("ray", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: make setup-cluster (the cluster extra) first"
    return None


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _show(state: dict) -> None:
    beyond = state.get("beyond_loopback") or []
    print(f"team: PostgreSQL, mlflow server and Ray head up; logs and data in {_shown(HOME)}/\n"
          f"  tracking.uri={state['tracking_uri']}\n"
          f"  Ray address: {state['ray_address']}, token authentication on: source {_shown(ENV_FILE)} first "
          f"(RAY_ADDRESS, RAY_AUTH_MODE=token, the token's path), then hydra/launcher=ray_cluster\n"
          f"  Optuna storage: hydra.sweeper.storage={state['optuna_storage']}\n"
          f"  Ray dashboard: {state['dashboard']}\n"
          f"  listening beyond loopback: " + (", ".join(beyond) if beyond else "nothing (every port on 127.0.0.1)"))


def down(quiet: bool = False) -> list[int]:
    """Stop what ``up`` started, by process id, newest first; the ids stopped."""
    if not STATE.exists():
        if not quiet:
            print(f"team: nothing to stop (no {_shown(STATE)})")
        return []
    state = json.loads(STATE.read_text())
    stopped = []
    for service in reversed(state["services"]):
        pid = service["pid"]
        if _started(pid) == service["started"]:
            os.kill(pid, getattr(signal, service["stop"]))
            deadline = time.time() + 60
            while _started(pid) == service["started"] and time.time() < deadline:
                time.sleep(0.2)
        left = [p for p in _session_pids(pid) if p != os.getpid()]
        for p in left + ([pid] if _started(pid) == service["started"] else []):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(pid)
        if service.get("temp_dir"):
            shutil.rmtree(service["temp_dir"], ignore_errors=True)
        if not quiet:
            print(f"team: stopped {service['name']} (pid {pid}" + (f", and {len(left)} left of its session by id"
                                                                    if left else "") + ")")
    STATE.unlink()
    ENV_FILE.unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.team", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL (Debian's own uses 5432)")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--ray-client-port", type=int, default=10001)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--dir", type=Path, default=ROOT / "team", help="the stack's folder (default: team/)")
    args = parser.parse_args(argv)
    use(args.dir)
    try:
        if args.action == "up":
            up(args.pg_port, args.mlflow_port, args.ray_port, args.ray_client_port, args.dashboard_port)
        else:
            down()
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"catnet: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
