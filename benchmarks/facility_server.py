"""A Tiled server as a facility runs it: PostgreSQL catalog and tables, several uvicorn workers.

    with FacilityServer(workdir, workers=2, readable=[files]) as server:
        server.uri          # http://127.0.0.1:PORT/api/v1?api_key=...

Starts, in ``workdir``:

* a throwaway PostgreSQL 15 cluster (Debian's ``postgresql-15``, binaries in
  ``/usr/lib/postgresql/15/bin`` or ``$XSML_PG_BIN``; run as the ``postgres``
  user when this process is root) on a free loopback port, with two
  databases: ``tiled`` (the catalog: nodes, metadata, revisions) and
  ``tables`` (the appendable tables of event streams; DuckDB files cannot be
  shared by several server processes);
* the catalog schema (``tiled catalog init``), once, before any worker starts;
* ``uvicorn --workers N --factory tiled.server.app:app_factory`` with a
  ``TILED_CONFIG`` that serves that catalog, writable zarr storage in
  ``workdir/data``, the two SQL databases, ``readable`` directories for
  external (HDF5) files and a single-user API key.

Everything is stopped (and the PostgreSQL cluster removed) on ``close()``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("XSML_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class FacilityServer:
    """PostgreSQL + multi-worker uvicorn Tiled server (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike, *, workers: int = 2,
                 readable: list[str | os.PathLike] = (), api_key: str | None = None):
        self.workdir = Path(workdir)
        self.workers = int(workers)
        self.api_key = api_key or secrets.token_hex(16)
        self.pg_root = Path(tempfile.mkdtemp(prefix="xsml-pg-"))  # chowned to postgres
        self.proc: subprocess.Popen | None = None
        self._pg_started = False
        try:
            self._start_postgres()
            self._start_tiled([Path(p) for p in readable])
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- PostgreSQL
    def _start_postgres(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries not found in {PG_BIN} (Debian: apt-get "
                               "install postgresql-15; or set XSML_PG_BIN)")
        data, sock = self.pg_root / "data", self.pg_root / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in (self.pg_root, sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.pg_port = free_port()
        run = dict(check=True, capture_output=True, text=True, timeout=120)
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                     "-A", "trust", "--no-sync", "-E", "UTF8"]), **run)
        subprocess.run(_as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.pg_root / "log"), "-w",
            "-t", "60", "-o", f"-p {self.pg_port} -k {sock} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200", "start"]), **run)
        self._pg_started = True
        for db in ("tiled", "tables"):
            subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p",
                                         str(self.pg_port), "-U", "postgres", db]), **run)
        self.catalog_uri = f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/tiled"
        self.tables_uri = f"postgresql://postgres@127.0.0.1:{self.pg_port}/tables"

    # -------------------------------------------------------------- Tiled
    def _start_tiled(self, readable: list[Path]) -> None:
        import json

        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "tiled", "catalog", "init", self.catalog_uri],
                       check=True, capture_output=True, text=True, timeout=120)
        self.port = free_port()
        config = {
            "authentication": {"single_user_api_key": self.api_key},
            "trees": [{"path": "/", "tree": "catalog", "args": {
                "uri": self.catalog_uri,
                "writable_storage": [str(data), self.tables_uri],
                "readable_storage": [str(p) for p in readable],
            }}],
        }
        cfg = self.workdir / "tiled-config.yml"
        cfg.write_text(json.dumps(config, indent=1))  # JSON is YAML
        env = {**os.environ, "TILED_CONFIG": str(cfg)}
        self.log_path = self.workdir / "tiled.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "tiled.server.app:app_factory",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers",
                 str(self.workers), "--log-level", "warning", "--no-access-log"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.uri = f"http://127.0.0.1:{self.port}/api/v1?api_key={self.api_key}"
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Tiled server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the Tiled server did not start: {self.log_path.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        """The server's processes (uvicorn's supervisor and its workers)."""
        import psutil

        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent.pid] + [c.pid for c in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the Tiled processes and PostgreSQL."""
        import psutil

        total = 0.0
        procs = [psutil.Process(p) for p in self.pids()]
        for proc in psutil.process_iter(["cmdline"]):  # the postgres backends of this cluster
            cmd = proc.info.get("cmdline") or []
            if cmd and "postgres" in cmd[0] and any(str(self.pg_root) in c for c in cmd):
                procs.append(proc)
                procs.extend(proc.children(recursive=True))
        for proc in {p.pid: p for p in procs}.values():
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if self._pg_started:
            subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.pg_root / "data"),
                                         "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60)
            self._pg_started = False
        shutil.rmtree(self.pg_root, ignore_errors=True)

    def __enter__(self) -> FacilityServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
