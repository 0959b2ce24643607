"""The tagging process's handle and its shared-memory frame ring.

:class:`ChildProcess` starts and watches the interpreter that runs
:mod:`bluesky_xsml.tagging_process`; :class:`SharedRing` is the ``/dev/shm``
file that inline frames cross through. Used by
:class:`~bluesky_xsml.inference.process.ProcessInferenceWorker` (moved out of
:mod:`~bluesky_xsml.inference.process`, which keeps the old private names).
"""

from __future__ import annotations

import contextlib
import ctypes
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

__all__ = ["ChildProcess", "SharedRing", "allow_reads_by"]

_PR_SET_PTRACER = 0x59616D61  # prctl option of the Yama security module


def allow_reads_by(pid: int) -> None:
    """Let process ``pid`` read this process's memory (``process_vm_readv``).

    Under Yama's ``ptrace_scope=1`` (the Ubuntu default) only an ancestor may
    read a process's memory; ``PR_SET_PTRACER`` names the one other process
    allowed (the latest call wins). Without Yama this changes nothing and
    the kernel's same-user rule applies; under ``ptrace_scope`` 2 or 3 reads
    stay refused and the tagging process falls back to the shared ring.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(pid), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))


class ChildProcess:
    """A fresh interpreter running :mod:`bluesky_xsml.tagging_process`.

    Started with :mod:`subprocess` (``python -m``), not ``multiprocessing``:
    a spawned ``multiprocessing`` child re-runs the parent's ``__main__``
    script, which breaks beamline scripts without an ``if __name__ ==
    "__main__"`` guard. The link is one end of a Unix socket pair.
    """

    def __init__(self, popen) -> None:
        self._popen = popen

    @classmethod
    def start(cls, spec: dict):
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "bluesky_xsml.tagging_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if spec.get("frame_transport") != "ring":
            allow_reads_by(popen.pid)  # before the child can read the spec and probe
        conn = Connection(ours.detach())
        conn.send_bytes(pickle.dumps(spec))
        return cls(popen), conn

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(Exception):
            self._popen.wait(timeout)


class SharedRing:
    """A file in ``/dev/shm`` mapped here and, by path, in the child."""

    def __init__(self, size: int) -> None:
        from multiprocessing import shared_memory

        self._shm = shared_memory.SharedMemory(create=True, size=size)
        self.path = f"/dev/shm/{self._shm.name.lstrip('/')}"
        self.buf = self._shm.buf
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.buf = None
        with contextlib.suppress(Exception):
            self._shm.close()
        with contextlib.suppress(Exception):
            self._shm.unlink()
