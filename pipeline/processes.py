"""The processes of a stack, by id: their sessions and start times, what they listen on, and how
they are stopped (pipeline/team.py): by the process id recorded when they started, then what is
left of their session, then whatever of this user's still listens on their ports."""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import socket
import time
from pathlib import Path

from catnet.errors import ConfigError

LOOPBACK = "127.0.0.1"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def session_pids(leader: int) -> list[int]:
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


def started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def wait_until(check, seconds: float, what: str, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise ConfigError(f"{what} did not answer within {seconds:.0f} s (log {log}"
                      + (f": {tail[0]}" if tail else "") + ")")


def beyond_loopback(services: list) -> list[str]:
    """``address:port (process)`` for each listening socket of the stack's processes that is not on
    a loopback address."""
    import psutil

    pids = {pid for s in services for pid in session_pids(s["pid"])} | {s["pid"] for s in services}
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


def stop(service: dict, quiet: bool) -> None:
    """Stop a service by its recorded process id, then what is left of its session, by id."""
    pid = service["pid"]
    was_running = started(pid) == service["started"]
    if was_running:
        os.kill(pid, getattr(signal, service["stop"]))
        deadline = time.time() + 60
        while started(pid) == service["started"] and time.time() < deadline:
            time.sleep(0.2)
    left = [p for p in session_pids(pid) if p != os.getpid()]
    for p in left + ([pid] if started(pid) == service["started"] else []):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if service.get("temp_dir"):
        shutil.rmtree(service["temp_dir"], ignore_errors=True)
    if not quiet and not was_running and not left:
        print(f"team: {service['name']} (pid {pid}) had ended already")
    elif not quiet:
        print(f"team: stopped {service['name']} (pid {pid}" + (f", and {len(left)} left of its session by id"
                                                                if left else "") + ")")


def listeners(ports: list[int]) -> dict[int, list[int]]:
    """{port: the ids of the processes that hold a listening socket on it} for ``ports``."""
    import psutil

    out: dict[int, list[int]] = {}
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.pid:
            out.setdefault(c.laddr.port, []).append(c.pid)
    return out


def stop_listeners(ports: list[int], quiet: bool) -> list[str]:
    """Stop what still listens on the stack's ``ports`` (a service restarted by hand): on each port,
    the oldest process that holds the socket (a server whose workers share it) and everything it
    started, SIGTERM, then SIGKILL after 30 s. A process of another user (unless this is root) is
    named instead, with how to stop it; the list of those is returned."""
    import psutil

    refused = []
    for port, pids in listeners(ports).items():
        for pid in {_first_holder(p, port) for p in pids}:
            try:
                proc = psutil.Process(pid)
                name, owner = proc.name(), proc.uids().real
                if os.geteuid() not in (0, owner):
                    refused.append(f"port {port}: process {pid} ({name}) of user {proc.username()}: that user "
                                   f"stops it (kill {pid})")
                    continue
                members = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for member in members:
                with contextlib.suppress(psutil.Error):
                    member.terminate()
            for member in psutil.wait_procs(members, timeout=30)[1]:
                with contextlib.suppress(psutil.Error):
                    member.kill()
            if not quiet:
                print(f"team: stopped process {pid} ({name}) and the {len(members) - 1} it started, which listened "
                      f"on port {port} (started outside make team-up)")
    return refused


def _first_holder(pid: int, port: int) -> int:
    """The oldest ancestor of ``pid`` that listens on ``port`` too (a server's workers share its
    socket; the system lists one of them)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        while (parent := proc.parent()) is not None and any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in parent.net_connections(kind="inet")):
            proc = parent
        return proc.pid
    except psutil.Error:
        return pid


def process_alive(pid: int, started: float) -> bool:
    """Whether the process that started the run still exists (same pid and start time)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started != started or abs(proc.create_time() - started) < 1.0  # NaN: start unknown
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # no permission to look: it exists
        return True
