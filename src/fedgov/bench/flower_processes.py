"""Start Flower's Deployment Engine processes on 127.0.0.1, and stop every one of them.

Used by the ``deployment`` benchmark suite and by the tests that start Flower's processes
(``tests/test_deployment*.py``, ``tests/test_flower_simulation.py``, ...). Each process is started in its own session
(``start_new_session=True``) with its output in a log file, and carries a unique
marker in its environment. Flower spawns helpers the test never sees directly:
``flower-superexec`` (the SuperLink starts it in a session of its own),
``flwr-serverapp`` and ``flwr-clientapp``. ``stop_all`` therefore signals the
process group of every process it started, every descendant it can find, and
every process that still carries the marker, by PID: nothing is matched by name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import process_table

__all__ = ["FederationProcessError", "FlowerProcesses", "Started", "free_ports", "flower_bin", "tail",
           "flower_environment", "write_connection", "flwr_run", "wait_for_summary", "serverapp_log",
           "register_supernode", "wait_for_log", "start_secure_superlink", "start_member", "fedgov_test_app"]

MARKER_VARIABLE = "FEDGOV_TEST_PROCESS_TAG"


class FederationProcessError(RuntimeError):
    """A federation of real processes did not do what it was started for (a run not submitted, a
    process that died, a run that ended without its summary)."""


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter (else the bare name)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


def _http_ok(url: str, cafile: Path | None = None) -> bool:
    """Whether ``url`` answers 2xx; an https URL is checked against ``cafile`` (the federation's CA)."""
    opener = _DIRECT
    if cafile is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(cafile))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=1.0) as response:  # noqa: S310 (local URL)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


class FlowerProcesses:
    """The Flower processes of one test: start them, watch them, stop all of them."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.env = {**env, MARKER_VARIABLE: self.tag, "PYTHONUNBUFFERED": "1"}
        self.started: list[Started] = []  # the live federation
        self.retired: list[Started] = []  # attempts that died (port taken); still cleaned up
        self.run_ids: list[str] = []  # runs submitted with flwr_run, in order

    @contextmanager
    def federation(self, app_dir: Path, connection: str) -> Iterator[FlowerProcesses]:
        """Around whatever uses these processes: on failure, print every log and the last run's
        ServerApp output; in any case stop every process, and fail if one outlives that."""
        try:
            yield self
        except BaseException:
            print(self.log_tails())
            print(f"----- flwr run -----\n{tail(self.log_dir / 'flwr-run.log')}")
            run_id = self.run_ids[-1] if self.run_ids else None
            print(f"----- flwr log {run_id} (ServerApp) -----\n{serverapp_log(self, app_dir, connection, run_id)}")
            raise
        finally:
            leftovers = self.stop_all()
        if leftovers:
            raise FederationProcessError(f"processes still running after stop_all: {sorted(leftovers)}")

    def start(self, name: str, argv: Sequence[str], *, extra_env: Mapping[str, str] | None = None) -> Started:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as handle:
            handle.write(f"$ {' '.join(argv)}\n".encode())
            handle.flush()
            process = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env={**self.env, **(extra_env or {})},
                                       start_new_session=True)
        started = Started(name, process, log)
        self.started.append(started)
        return started

    def start_http_service(self, name: str, argv_for_port, *, health_path: str = "/health",
                           timeout: float = 60.0, attempts: int = 3,
                           tls_ca: Path | None = None, port: int | None = None,
                           extra_env: Mapping[str, str] | None = None) -> tuple[Started, int]:
        """Start a server on a free port, retrying on a new port if it dies (port taken); with
        ``port``, on that port only (a restart where its clients expect it), once.

        With ``tls_ca`` the server speaks https, and its health is checked against that CA."""
        last: Started | None = None
        fixed_port = port
        for _ in range(1 if fixed_port is not None else attempts):
            if last is not None:
                self.retire(last)
            port = fixed_port if fixed_port is not None else free_ports(1)[0]
            last = self.start(name, argv_for_port(port), extra_env=extra_env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if last.process.poll() is not None:
                    break
                scheme = "https" if tls_ca is not None else "http"
                if _http_ok(f"{scheme}://127.0.0.1:{port}{health_path}", cafile=tls_ca):
                    return last, port
                time.sleep(0.25)
            else:
                raise TimeoutError(f"{name} did not answer {health_path} on port {port} "
                                   f"within {timeout:.0f} s\n{tail(last.log)}")
        assert last is not None
        raise RuntimeError(f"{name} exited with code {last.process.returncode} "
                           f"({attempts} attempts)\n{tail(last.log)}")

    def exited(self) -> list[Started]:
        return [s for s in self.started if s.process.poll() is not None]

    def retire(self, started: Started) -> None:
        """A process meant to exit (a refused SuperNode): no longer a crash for ``exited``, still stopped."""
        self.started.remove(started)
        self.retired.append(started)

    def kill(self, started: Started) -> None:
        """SIGKILL a process and everything it spawned at once, as when its machine dies."""
        pids = {started.pid} | process_table.descendants([started.pid])
        for pid in pids:
            _signal(pid, signal.SIGSTOP)  # freeze the tree first, so that no child outlives its parent's kill
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        started.process.wait(timeout=10)
        self.retire(started)

    def leftovers(self) -> set[int]:
        return {pid for pid in process_table.tagged(MARKER_VARIABLE, self.tag) if process_table.alive(pid)}

    def stop_all(self, grace: float = 10.0) -> set[int]:
        """Stop everything started here and everything it spawned; return PIDs still alive."""
        everything = self.retired + self.started
        roots = [s.pid for s in everything]
        found = set(roots) | process_table.descendants(roots) | process_table.tagged(MARKER_VARIABLE, self.tag)
        targets = {pid for pid in found if process_table.alive(pid)}
        groups = set()
        for pid in targets:
            try:
                groups.add(os.getpgid(pid))
            except (ProcessLookupError, PermissionError):
                pass
        groups = {g for g in groups if g > 1 and g != os.getpgrp()}
        # SIGTERM first: SuperNodes and SuperLink shut down their flower-superexec, and the
        # ServerApp/ClientApp processes exit when their parent is gone.
        for started in reversed(everything):  # SuperNodes before the SuperLink
            if started.process.poll() is None:
                started.process.terminate()
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        for pid in targets:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for started in everything:
            try:
                started.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and self.leftovers():
            time.sleep(0.2)
        # Whatever ignored SIGTERM: our own children through their Popen, Flower's helpers by
        # PID only while they still carry the marker (a PID seen earlier may have been reused).
        for started in everything:
            if started.process.poll() is None:
                started.process.kill()
        for pid in self.leftovers():
            _signal(pid, signal.SIGKILL)
        for started in everything:
            try:
                started.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.2)
        return self.leftovers()

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(f"----- {s.name} (pid {s.pid}, exit {s.process.poll()}) {s.log} -----\n"
                         f"{tail(s.log, lines)}" for s in self.retired + self.started)


# ---- `flwr run` against a SuperLink of the test's own -------------------------------------

def flower_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of every Flower process of a test: an isolated Flower home, offline."""
    tmp_path = tmp_path.resolve()  # Flower's processes run in other folders (the app's, the SuperLink's)
    env = dict(os.environ)
    env.update({
        # An isolated Flower home: the connection config, installed FABs and the
        # SuperLink's files stay under tmp_path, never in the user's ~/.flwr.
        "HOME": str(tmp_path / "home"),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The SuperLink would otherwise `uv sync` the app's dependencies (needs the network).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Flower launches flower-superexec, flwr-serverapp and flwr-clientapp by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    # Flower's HTTP clients honour HTTP(S)_PROXY; local traffic must not go through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1,localhost"]))
    for folder in ("HOME", "FLWR_HOME"):
        Path(env[folder]).mkdir(parents=True, exist_ok=True)
    return env


def write_connection(flwr_home: Path, name: str, superlink_port: int, *,
                     root_certificates: Path | None = None) -> None:
    """The `flwr` CLI finds SuperLinks by name in $FLWR_HOME/config.toml (Flower >= 1.42);
    with ``root_certificates`` it connects over TLS, trusting that CA, else in clear text."""
    # Flower refuses a relative root-certificates path (and reports it with exit status 0).
    security = (f'root-certificates = "{root_certificates.resolve()}"\n' if root_certificates is not None
                else "insecure = true\n")
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "127.0.0.1:{superlink_port}"\n'
        + security
    )


def register_supernode(procs: FlowerProcesses, app_dir: Path, connection: str, public_key: Path) -> int:
    """``flwr supernode register``: admit a member's key on the SuperLink; returns its node id."""
    argv = [flower_bin("flwr"), "supernode", "register", str(public_key.resolve()), connection, "--format", "json"]
    result = subprocess.run(argv, cwd=app_dir, env=procs.env, capture_output=True, text=True, timeout=60)
    with open(procs.log_dir / "flwr-supernode-register.log", "a") as handle:
        handle.write(f"$ {' '.join(argv)}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}\n")
    start, end = result.stdout.find("{"), result.stdout.rfind("}")
    try:
        reply = json.loads(result.stdout[start:end + 1])
    except ValueError:
        reply = {}
    if not reply.get("success"):
        raise RuntimeError(f"flwr supernode register {public_key} failed (exit {result.returncode}):\n"
                           f"{result.stdout}\n{result.stderr}")
    return int(reply["node-id"])


def start_secure_superlink(procs: FlowerProcesses, tls, *, database: Path | None = None,  # noqa: ANN001
                           name: str = "superlink", port: int | None = None,
                           extra_env: Mapping[str, str] | None = None) -> tuple[Started, int]:
    """A SuperLink over TLS (``fedgov.tls``'s files) that admits registered SuperNodes only;
    with ``database`` its state lives in that SQLite file (and survives a restart). ``extra_env``
    reaches it and what it starts (its ServerApps), and no other process."""
    def argv(free_port: int) -> list[str]:
        return [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(tls.ca_certificate),
                "--ssl-certfile", str(tls.server_certificate), "--ssl-keyfile", str(tls.server_key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                *(["--database", str(database)] if database is not None else []),
                "--host", "127.0.0.1", "--port", str(free_port)]

    return procs.start_http_service(name, argv, tls_ca=tls.ca_certificate, port=port, extra_env=extra_env)


def start_member(procs: FlowerProcesses, name: str, superlink_port: int, tls, key: Path | None,  # noqa: ANN001
                 node_config: str, *, wait: bool = True) -> Started:
    """A SuperNode over TLS that joins with its own key (``fedgov.member_key``); ``wait=False``
    for one expected to be refused (it is started, not health-checked)."""
    def argv(port: int) -> list[str]:
        return [flower_bin("flower-supernode"), "--root-certificates", str(tls.ca_certificate),
                "--superlink", f"127.0.0.1:{superlink_port}", "--host", "127.0.0.1", "--port", str(port),
                *(["--auth-supernode-private-key", str(key)] if key is not None else []),
                "--node-config", node_config]

    if not wait:
        return procs.start(name, argv(free_ports(1)[0]))
    return procs.start_http_service(name, argv)[0]


def fedgov_test_app(root: Path, target: Path, *, clientapp_file: Path) -> Path:
    """A copy of fedgov's Flower App whose ClientApp is ``clientapp_file`` (as ``wire_client.py``):
    the same ServerApp and app config, another ClientApp, for tests that need one on the wire."""
    target.mkdir(parents=True, exist_ok=True)
    pyproject = (root / "pyproject.toml").read_text()
    line = 'clientapp = "fedgov.client_app:app"'
    if line not in pyproject:
        raise RuntimeError(f"{root / 'pyproject.toml'}: no {line!r} to replace")
    # fedgov's own fab-include names its source tree, which the copy does not have.
    pyproject = "\n".join(kept for kept in pyproject.splitlines() if not kept.startswith("fab-include")) + "\n"
    (target / "pyproject.toml").write_text(pyproject.replace(line, 'clientapp = "wire_client:app"'))
    # Not test_*.py: Flower leaves files named like tests out of the FAB.
    (target / "wire_client.py").write_text(clientapp_file.read_text())
    return target


def wait_for_log(log: Path, pattern: str, *, count: int = 1, timeout: float) -> None:
    """Wait until ``pattern`` (a regular expression) has appeared ``count`` times in ``log``."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(regex.findall(Path(log).read_text(errors="replace"))) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{log.name}: {pattern!r} did not appear {count} time(s) within {timeout:.0f} s\n{tail(log)}")


def flwr_run(procs: FlowerProcesses, app_dir: Path, connection: str, *, run_config: Sequence[str],
             federation_config: Sequence[str] = ()) -> str:
    """Submit the app with `flwr run`; returns the run id (fails the test if it was not submitted)."""
    # ONE --run-config string: Flower 1.42 merges repeated --run-config flags table by table,
    # so `-c data.num_cooperatives=2 -c data.partition="iid"` silently drops num_cooperatives.
    argv = [flower_bin("flwr"), "run", ".", connection, "--format", "json", "--run-config", " ".join(run_config)]
    if federation_config:
        argv += ["--federation-config", " ".join(federation_config)]
    result = subprocess.run(argv, cwd=app_dir, env=procs.env, capture_output=True, text=True, timeout=120)
    (procs.log_dir / "flwr-run.log").write_text(
        f"$ {' '.join(argv)}\nexit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    start, end = result.stdout.find("{"), result.stdout.rfind("}")
    try:
        reply = json.loads(result.stdout[start:end + 1])
    except ValueError:
        reply = {}
    if not reply.get("success") or not reply.get("run-id"):
        raise FederationProcessError(f"flwr run did not submit the run (exit {result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}")
    procs.run_ids.append(str(reply["run-id"]))
    return str(reply["run-id"])


def wait_for_summary(procs: FlowerProcesses, out: Path, run_id: str, superlink_log: Path, *,
                     deadline_s: float) -> Path:
    """The run directory once its summary.json exists; fails early if the federation broke."""
    finished = re.compile(rf"Finished task \d+ of run {run_id}\b")
    deadline = time.monotonic() + deadline_s
    finished_at: float | None = None
    while time.monotonic() < deadline:
        summaries = sorted(out.glob("*/summary.json"))
        if summaries:
            return summaries[-1].parent
        if dead := procs.exited():
            raise FederationProcessError("Flower process(es) exited during the run: "
                        + ", ".join(f"{s.name} (exit {s.process.returncode})" for s in dead))
        if finished_at is None and finished.search(tail(superlink_log, 400)):
            finished_at = time.monotonic()  # the ServerApp ended; give the last write a moment
        if finished_at is not None and time.monotonic() - finished_at > 10:
            raise FederationProcessError(f"run {run_id} finished on the SuperLink without writing summary.json "
                                         f"under {out}")
        time.sleep(1.0)
    raise FederationProcessError(f"no summary.json under {out} within {deadline_s:.0f} s of submitting run "
                                 f"{run_id}")


def serverapp_log(procs: FlowerProcesses, app_dir: Path, connection: str, run_id: str | None) -> str:
    """The ServerApp's own output, which the SuperLink keeps (it is not in superlink.log)."""
    if run_id is None or not procs.started or procs.started[0].process.poll() is not None:
        return "<not available>"
    try:
        result = subprocess.run([flower_bin("flwr"), "log", run_id, connection, "--show"], cwd=app_dir,
                                env=procs.env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        return f"<flwr log timed out>\n{exc.stdout or ''}"
    return "\n".join((result.stdout + result.stderr).splitlines()[-80:])
