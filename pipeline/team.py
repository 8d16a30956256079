"""``make team-up`` / ``make team-down`` (``python -m pipeline.team up|down|restart <service>``): a
team's stack on this machine, to try team mode: PostgreSQL, an mlflow server on it and a Ray head,
all on loopback, each asking for credentials.

Everything lives in ``team/`` (git-ignored; ``--dir`` for another folder), made with umask 077 (only
its user reads it; as root the folder itself is 711, so that the ``postgres`` user reaches ``pg/``):
the PostgreSQL cluster (``pg/``), the server's artifacts (``mlartifacts/``) and its users
(``mlflow_auth.db``), the logs, the secrets (``secrets.json``: PostgreSQL's superuser and the
``catnet`` role, MLflow's admin; ``pgpass``, ``mlflow_auth.ini`` and Ray's ``ray_token`` made from
them; all mode 600), what a shell sources to use the stack (``env``, 600), and ``stack.json``, the
process ids and ports ``down`` stops. Each service runs in a session of its own; ``down`` ends the
session's leader (PostgreSQL's postmaster, the server, the ``ray start --block`` that owns Ray's
processes), waits, then kills by id whatever of that session is left, and then whatever of this
user's still listens on the stack's ports (a service restarted by hand).

PostgreSQL asks for a password (scram-sha-256) on 127.0.0.1, its only socket; the databases
``mlflow`` and ``optuna`` belong to ``catnet``, a role that is not a superuser; clients find the
password in ``pgpass`` (``PGPASSFILE``), never on a command line. The mlflow server runs MLflow's
own authentication (``--app-name basic-auth``): every request but its health check needs a user,
and the client reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from ``env``. Ray
keeps its session folder in a private folder of the system's temporary folder (mode 700: Ray makes
its own sub-folder world-writable, and its sockets need a short path).

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
import subprocess
import sys
from pathlib import Path

from catnet.errors import ConfigError
from pipeline import processes
from pipeline.common import ROOT

LOOPBACK = "127.0.0.1"
HOME = STATE = ENV_FILE = TOKEN = SECRETS = PGPASS = AUTH_INI = Path()  # set by use(): the stack's files
SERVICES = ("postgresql", "mlflow server", "ray head")
MLFLOW_ADMIN = "admin"


def use(folder: Path) -> None:
    """The stack's folder (``team/`` of the project unless ``--dir``) and the files in it."""
    global HOME, STATE, ENV_FILE, TOKEN, SECRETS, PGPASS, AUTH_INI
    HOME = folder.resolve()
    STATE = HOME / "stack.json"  # what down stops: process ids, with their start times, and the ports
    ENV_FILE = HOME / "env"  # what a shell sources to use the stack (credentials: mode 600)
    TOKEN = HOME / "ray_token"  # Ray's token (mode 600)
    SECRETS = HOME / "secrets.json"  # every password of the stack (mode 600)
    PGPASS = HOME / "pgpass"  # libpq's password file (PGPASSFILE), made from SECRETS
    AUTH_INI = HOME / "mlflow_auth.ini"  # the mlflow server's authentication settings (MLFLOW_AUTH_CONFIG_PATH)


use(ROOT / "team")


def _private(path: Path, text: str) -> None:
    """Write a secret: mode 600 from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def secrets() -> dict[str, str]:
    """The stack's passwords (and the mlflow server's key for its forms' CSRF tokens), made once:
    they stay with its data across down and up."""
    import secrets as random

    known = json.loads(SECRETS.read_text()) if SECRETS.exists() else {}
    made = {name: known.get(name) or random.token_urlsafe(24) for name in ("postgres", "catnet", "mlflow", "flask")}
    if made != known:
        _private(SECRETS, json.dumps(made, indent=1))
    return made


def client_env(state: dict) -> dict[str, str]:
    """What catnet, MLflow's client and Optuna need to use the stack (``env``): the server's URI and
    user, libpq's password file, and Ray's settings."""
    return {"MLFLOW_TRACKING_URI": state["tracking_uri"], "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_TRACKING_PASSWORD": secrets()["mlflow"], "PGPASSFILE": str(PGPASS),
            **ray_env(state["ray_address"])}


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


def _psql(port: int, user: str, database: str, sql: str) -> str:
    """``sql`` through psql as ``user`` (its password from ``pgpass``), run as this user: psql,
    unlike the server, runs as root too."""
    out = subprocess.run([str(_pg_bin() / "psql"), "-h", LOOPBACK, "-p", str(port), "-U", user, "-d", database, "-w",
                          "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True,
                         env={**os.environ, "PGPASSFILE": str(PGPASS)})
    if out.returncode != 0:
        raise ConfigError(f"PostgreSQL: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
    return out.stdout.strip()


def _start_postgres(port: int, services: list) -> str:
    """The cluster (made if new, a superuser ``postgres`` with a password), started on 127.0.0.1
    only; the role ``catnet`` (not a superuser) and its databases ``mlflow`` and ``optuna``."""
    bindir, pg = _pg_bin(), HOME / "pg"
    pg.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres")
        if subprocess.run(_as_postgres(["test", "-w", str(pg)])).returncode != 0:
            raise ConfigError(f"the postgres user cannot write {pg}: a folder above it is closed to other users "
                              "(chmod o+x on each, or clone the project elsewhere)")
    data, log = pg / "data", pg / "log"
    password = secrets()
    _private(PGPASS, "".join(f"{LOOPBACK}:{port}:*:{user}:{password[user]}\n" for user in ("postgres", "catnet")))
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "pwfile"  # initdb reads the superuser's password from a file, as the postgres user
        _private(pwfile, password["postgres"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        try:
            _run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "--auth=scram-sha-256", "-U", "postgres",
                               f"--pwfile={pwfile}"]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    elif "scram-sha-256" not in (data / "pg_hba.conf").read_text():
        raise ConfigError(f"{data}: this cluster lets users in without a password (trust: made by an older "
                          f"catnet); remove {pg} to make a new one (its runs are lost), or set passwords by hand")
    _run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                       f"-p {port} -c listen_addresses={LOOPBACK} -c unix_socket_directories=''", "start"]), "pg_ctl start")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    services.append({"name": "postgresql", "pid": pid, "started": processes.started(pid), "stop": "SIGINT", "ports": [port]})
    if _psql(port, "postgres", "postgres", "SELECT 1 FROM pg_roles WHERE rolname='catnet'") != "1":
        _psql(port, "postgres", "postgres", "CREATE ROLE catnet LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                            f"PASSWORD '{password['catnet']}'")
    for database in ("mlflow", "optuna"):
        if _psql(port, "postgres", "postgres", f"SELECT 1 FROM pg_database WHERE datname='{database}'") != "1":
            _psql(port, "postgres", "postgres", f"CREATE DATABASE {database} OWNER catnet")
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
    _private(AUTH_INI, "[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{HOME / 'mlflow_auth.db'}\nadmin_username = {MLFLOW_ADMIN}\n"
                       f"admin_password = {secrets()['mlflow']}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    proc = _spawn([str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                   "--backend-store-uri", f"{database}/mlflow", "--artifacts-destination", str(HOME / "mlartifacts"),
                   "--host", LOOPBACK, "--port", str(port), "--workers", "1"], log,
                  {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_AUTH_CONFIG_PATH": str(AUTH_INI),
                   "PGPASSFILE": str(PGPASS), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets()["flask"]})
    services.append({"name": "mlflow server", "pid": proc.pid, "started": processes.started(proc.pid), "stop": "SIGTERM",
                     "ports": [port]})

    def answers() -> bool:
        if proc.poll() is not None:
            raise ConfigError(f"mlflow server exited with {proc.returncode} (log {HOME / 'mlflow.log'})")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return True
        except OSError:
            return False

    processes.wait_until(answers, 120, "the mlflow server", log)
    return uri


def _start_ray(port: int, client_port: int, dashboard_port: int, services: list, tracking_uri: str) -> str:
    import secrets as random
    import tempfile

    log, address = HOME / "ray.log", f"{LOOPBACK}:{port}"
    if not TOKEN.exists():
        _private(TOKEN, random.token_hex(32))
    # the jobs Ray runs write to the stack's server: its workers inherit the head's environment
    env = {**client_env({"tracking_uri": tracking_uri, "ray_address": address})}
    env.pop("RAY_ADDRESS")  # the head starts a cluster; it does not join one
    private = Path(tempfile.mkdtemp(prefix="catnet-ray-"))  # mode 700; Ray's sockets need a short path
    proc = _spawn([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                   f"--node-ip-address={LOOPBACK}", f"--port={port}", f"--ray-client-server-port={client_port}",
                   f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", f"--temp-dir={private / 'ray'}",
                   "--disable-usage-stats"], log, env)
    services.append({"name": "ray head", "pid": proc.pid, "started": processes.started(proc.pid), "stop": "SIGTERM",
                     "temp_dir": str(private), "ports": [port, client_port, dashboard_port]})

    def answers() -> bool:  # a driver, as a sweep connects: with team/env's settings
        if proc.poll() is not None:
            raise ConfigError(f"ray start exited with {proc.returncode} (log {HOME / 'ray.log'})")
        try:
            probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"],
                                   capture_output=True, env={**os.environ, **ray_env(address)}, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return probe.returncode == 0

    processes.wait_until(answers, 180, "the Ray head", log)
    return address


def up(pg_port: int, mlflow_port: int, ray_port: int, client_port: int, dashboard_port: int) -> dict:
    """Start the stack (or say it is up already); what to use, as a dict."""
    os.umask(0o077)  # every file and folder the stack makes is its user's alone
    if STATE.exists():
        state = json.loads(STATE.read_text())
        if all(processes.started(s["pid"]) == s["started"] for s in state["services"]):
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
        if not processes.port_free(port):
            raise ConfigError(f"port {port} ({what}) is taken on {LOOPBACK}: choose another, e.g. "
                              "make team-up TEAM_ARGS='--mlflow-port 5001'")
    HOME.mkdir(parents=True, exist_ok=True)
    HOME.chmod(0o711 if os.geteuid() == 0 else 0o700)  # root: the postgres user passes through to pg/
    services: list[dict] = []
    state = {"services": services, "ports": {"pg": pg_port, "mlflow": mlflow_port, "ray": ray_port,
                                             "ray_client": client_port, "dashboard": dashboard_port}}
    try:
        _start(state, "postgresql")
        _start(state, "mlflow server")
        _start(state, "ray head")
        state["beyond_loopback"] = processes.beyond_loopback(services)
        STATE.write_text(json.dumps(state, indent=1))
    except BaseException:
        STATE.write_text(json.dumps(state, indent=1))
        down(quiet=True)
        raise
    _show(state)
    return state


def _start(state: dict, name: str) -> None:
    """Start service ``name`` on the stack's ports, recorded in ``state`` (and stack.json)."""
    ports, services = state["ports"], state["services"]
    if name == "postgresql":
        database = _start_postgres(ports["pg"], services)
        state["optuna_storage"] = f"{database}/optuna"
    elif name == "mlflow server":
        state["tracking_uri"] = _start_mlflow(ports["mlflow"], state["optuna_storage"].rsplit("/", 1)[0], services)
    else:
        state["ray_address"] = _start_ray(ports["ray"], ports["ray_client"], ports["dashboard"], services,
                                          state["tracking_uri"])
        state["dashboard"] = f"http://{LOOPBACK}:{ports['dashboard']}"
        _private(ENV_FILE, f"# make team-up's stack, for a shell that uses it: source {_shown(ENV_FILE)}\n"
                           + "".join(f"export {k}={v}\n" for k, v in client_env(state).items()))
    STATE.write_text(json.dumps(state, indent=1))


def _missing_extra() -> str | None:
    for module in ("ray", "psycopg", "flask_wtf"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: make setup-cluster (the cluster extra) first"
    return None


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _show(state: dict) -> None:
    beyond = state.get("beyond_loopback") or []
    print(f"team: PostgreSQL, mlflow server and Ray head up, each asking for credentials; logs, data and "
          f"secrets (mode 600) in {_shown(HOME)}/\n"
          f"  source {_shown(ENV_FILE)} first: the MLflow user and password, PostgreSQL's password file, "
          f"Ray's address and token\n"
          f"  tracking.uri={state['tracking_uri']} (the UI asks for user {MLFLOW_ADMIN} and the password "
          f"in {_shown(SECRETS)})\n"
          f"  Ray address: {state['ray_address']}, token authentication on: hydra/launcher=ray_cluster\n"
          f"  Optuna storage: hydra.sweeper.storage={state['optuna_storage']}\n"
          f"  Ray dashboard: {state['dashboard']}\n"
          f"  listening beyond loopback: " + (", ".join(beyond) if beyond else "nothing (every port on 127.0.0.1)"))


def down(quiet: bool = False) -> list[int]:
    """Stop what ``up`` started, by process id, newest first, then whatever of this user's still
    listens on the stack's ports; the ids stopped."""
    if not STATE.exists():
        if not quiet:
            print(f"team: nothing to stop (no {_shown(STATE)})")
        return []
    state = json.loads(STATE.read_text())
    for service in reversed(state["services"]):
        processes.stop(service, quiet)
    refused = processes.stop_listeners([p for p in state.get("ports", {}).values()], quiet)
    STATE.unlink()
    ENV_FILE.unlink(missing_ok=True)
    if refused:
        raise ConfigError("team: still listening on the stack's ports: " + "; ".join(refused))
    return [s["pid"] for s in state["services"]]


def restart(name: str) -> dict:
    """Stop service ``name`` of the stack (by process id, then whatever listens on its ports) and
    start it again on the same ports; the others keep running."""
    if not STATE.exists():
        raise ConfigError(f"no stack to restart a service of (no {_shown(STATE)}): make team-up")
    os.umask(0o077)
    state = json.loads(STATE.read_text())
    service = next(s for s in state["services"] if s["name"] == name)
    processes.stop(service, quiet=False)
    refused = processes.stop_listeners(service.get("ports", []), quiet=False)
    if refused:
        raise ConfigError("team: " + "; ".join(refused))
    state["services"] = [s for s in state["services"] if s is not service]
    _start(state, name)
    order = {n: i for i, n in enumerate(SERVICES)}
    state["services"].sort(key=lambda s: order[s["name"]])
    STATE.write_text(json.dumps(state, indent=1))
    print(f"team: {name} restarted (pid {next(s['pid'] for s in state['services'] if s['name'] == name)})")
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.team", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "restart"))
    parser.add_argument("service", nargs="?", choices=("postgresql", "mlflow", "ray"),
                        help="restart: the service to stop and start again")
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
        elif args.action == "restart":
            if not args.service:
                raise ConfigError("restart: name the service: postgresql, mlflow or ray")
            restart({"mlflow": "mlflow server", "ray": "ray head"}.get(args.service, args.service))
        else:
            down()
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"catnet: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
