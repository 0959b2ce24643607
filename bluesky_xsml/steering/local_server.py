"""A queue server on this machine: ``redis-server`` and an RE Manager on loopback ports.

For trying queue-server steering without a facility deployment (examples,
tests, a laptop): :class:`LocalQueueServer` starts Debian's ``redis-server``
and bluesky-queueserver's ``start-re-manager`` on free loopback ports, waits
until the manager answers, opens its worker environment from a startup
directory and gives a connected ``REManagerAPI``. Closing it closes the
environment and stops both processes (whole process groups, so the worker goes
too). At a beamline the queue server already runs: connect
:class:`~bluesky_xsml.steering.queue.QueueSteering` to its ``REManagerAPI``
instead.

Examples
--------
>>> from bluesky_xsml.steering.local_server import LocalQueueServer
>>> with LocalQueueServer("profiles/profile_xsml/startup") as qs:  # doctest: +SKIP
...     qs.api.item_add(BPlan("count", ["det"], 3))
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ALLOW_ALL_PERMISSIONS", "LocalQueueServer", "QueueServerStartError", "free_port"]

#: User-group permissions that let the ``primary`` group run every plan on every device
#: (the queue server's ``root`` group keeps its usual exclusions). Fine on a private
#: loopback server; a facility sets its own.
ALLOW_ALL_PERMISSIONS = """\
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions: [null]
    forbidden_functions: [":^_"]
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions: [null]
    forbidden_functions: [null]
"""


class QueueServerStartError(RuntimeError):
    """``redis-server`` or the RE Manager is missing, did not start, or could not open its
    worker environment; the message ends with the tail of the manager's log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class LocalQueueServer:
    """``redis-server`` + RE Manager on loopback ports, with the worker environment open.

    Parameters
    ----------
    startup_dir : str or path-like
        The worker's startup directory (an IPython profile's ``startup/``).
    workdir : str or path-like, optional
        Where the permissions file, the plans/devices list and ``manager.log``
        go. Default: a new temporary directory.
    env : mapping, optional
        Extra environment variables for the RE Manager and its worker (e.g. the
        catalog URI the startup files read).
    permissions : str
        User-group permissions (YAML). Default :data:`ALLOW_ALL_PERMISSIONS`.
    name_prefix : str
        Redis key prefix of this manager.
    start_timeout : float
        Seconds to wait for the manager to answer and for the environment to open.
    timeout_recv : float
        Receive timeout of the returned ``REManagerAPI``.

    Attributes
    ----------
    api : bluesky_queueserver_api.zmq.REManagerAPI
        Connected to the manager (after :meth:`start`).
    workdir, log_path : pathlib.Path
    """

    def __init__(self, startup_dir: str | os.PathLike, workdir: str | os.PathLike | None = None,
                 *, env: Mapping[str, str] | None = None,
                 permissions: str = ALLOW_ALL_PERMISSIONS, name_prefix: str = "xsml",
                 start_timeout: float = 120.0, timeout_recv: float = 30.0):
        self.startup_dir = Path(startup_dir)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(
            prefix="xsml-qserver-"))
        self.log_path = self.workdir / "manager.log"
        self.env = dict(env or {})
        self.permissions = permissions
        self.name_prefix = name_prefix
        self.start_timeout = start_timeout
        self.timeout_recv = timeout_recv
        self.api = None
        self._redis: subprocess.Popen | None = None
        self._manager: subprocess.Popen | None = None
        self._log = None

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return "(no manager log)"

    def start(self) -> LocalQueueServer:
        """Start both processes and open the worker environment.

        Raises
        ------
        QueueServerStartError
            An executable is missing, the manager did not answer within
            ``start_timeout`` or exited, or the environment did not open.
        """
        for exe in ("redis-server", "start-re-manager"):
            if shutil.which(exe) is None:
                raise QueueServerStartError(
                    f"{exe} is not installed (Debian package redis-server; pip "
                    "bluesky-queueserver)")
        from bluesky_queueserver_api.zmq import REManagerAPI

        if not self.startup_dir.is_dir():
            raise QueueServerStartError(f"no startup directory {self.startup_dir}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "permissions.yaml").write_text(self.permissions)
        redis_port, control, info = free_port(), free_port(), free_port()
        try:
            self._redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self._log = open(self.log_path, "w")
            self._manager = subprocess.Popen(
                ["start-re-manager", "--startup-dir", str(self.startup_dir),
                 "--use-ipython-kernel", "OFF",
                 "--zmq-control-addr", f"tcp://127.0.0.1:{control}",
                 "--zmq-info-addr", f"tcp://127.0.0.1:{info}",
                 "--redis-addr", f"127.0.0.1:{redis_port}",
                 "--redis-name-prefix", self.name_prefix,
                 "--existing-plans-devices", str(self.workdir / "existing_plans_and_devices.yaml"),
                 "--user-group-permissions", str(self.workdir / "permissions.yaml"),
                 "--console-output", "OFF"],
                stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                start_new_session=True)
            self.api = REManagerAPI(zmq_control_addr=f"tcp://127.0.0.1:{control}",
                                    zmq_info_addr=f"tcp://127.0.0.1:{info}",
                                    timeout_recv=self.timeout_recv)
            deadline = time.monotonic() + self.start_timeout
            while True:
                try:
                    self.api.status()
                    break
                except Exception:  # noqa: BLE001 - not answering yet: retry until the deadline
                    if time.monotonic() > deadline or self._manager.poll() is not None:
                        raise QueueServerStartError(
                            "the RE Manager did not start:\n" + self._log_tail()) from None
                    time.sleep(0.2)
            self.api.environment_open()
            self.api.wait_for_idle(timeout=self.start_timeout)
            if not self.api.status()["worker_environment_exists"]:
                raise QueueServerStartError(
                    "the worker environment did not open:\n" + self._log_tail())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the environment (best effort) and stop the manager and redis (idempotent)."""
        if self.api is not None:
            try:
                if self._manager is not None and self._manager.poll() is None:
                    self.api.environment_close()
                    self.api.wait_for_idle(timeout=30)
            except Exception:  # noqa: BLE001 - shutdown goes on whatever the manager says
                pass
            try:
                self.api.close()
            except Exception:  # noqa: BLE001 - cleanup
                pass
            self.api = None
        _stop(self._manager)
        _stop(self._redis)
        self._manager = self._redis = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalQueueServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
