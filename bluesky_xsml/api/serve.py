"""Run the service: from IPython next to the RunEngine, or as ``xsml serve``.

From IPython (the service shares the live callback's state)::

    from bluesky_xsml.api.serve import serve

    xsml = TaggingCallback(Tagger.load(), downstream=[writer])
    RE.subscribe(xsml)
    service = serve(xsml, port=8765)    # prints the page URL and the API key
    ...
    service.stop()

(``xsml.serve(port=8765)`` still works and warns: it is deprecated, the
service is started from here, above the callback. Importing this module
registers :func:`serve` as what that method calls.)

From a shell, ``xsml serve`` loads the model, tags the documents of a 0MQ
bus (``--zmq 127.0.0.1:5578``, the output port of ``bluesky-0MQ-proxy``) and
serves until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

from ..documents.callback import TaggingCallback, set_service_starter
from ..readout import readout_option

__all__ = ["ServiceHandle", "add_arguments", "main", "serve", "serve_app"]

log = logging.getLogger(__name__)


class ServiceHandle:
    """A service running in a background thread.

    Attributes
    ----------
    url : str
        Base URL (``http://127.0.0.1:8765``); the page is at ``url + "/page/"``.
    api_key : str
        The key for state-changing requests (``X-API-Key`` header, or
        ``Authorization: Bearer <key>``).
    app : FastAPI
    page_url : str
        The page with the key in the URL fragment (the fragment never leaves
        the browser).
    """

    def __init__(self, app, server, thread, sock, url):
        self.app = app
        self._server = server
        self._thread = thread
        self._sock = sock
        self.url = url
        self.api_key = app.state.api_key

    @property
    def page_url(self) -> str:
        return f"{self.url}/page/#key={self.api_key}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End live feeds, stop the server and wait for its thread (idempotent)."""
        self.app.state.service.end_feeds()
        self._server.should_exit = True
        self._thread.join(timeout)
        try:
            self._sock.close()
        except OSError:  # pragma: no cover
            pass

    def __enter__(self) -> ServiceHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<xsml service {self.url} {'running' if self.running else 'stopped'}>"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(callback=None, *, host: str | None = None, port: int | None = None, settings=None,
          policy_engine=None, queue_steering=None, log_level: str = "warning",
          announce: bool = True,
          start_timeout: float = 30.0) -> ServiceHandle:
    """Start the service in a background thread and return its handle.

    Parameters
    ----------
    callback : TaggingCallback, optional
    host, port : str, int, optional
        Override the settings (default 127.0.0.1:8765; port 0 picks a free port).
    settings : ServiceSettings, optional
    policy_engine : PolicyEngine, optional
    queue_steering : QueueSteering, optional
        Its pending queue-server actions are listed and approved over the API.
    log_level : str
        uvicorn's log level.
    announce : bool
        Print the page URL, and the API key when it was generated (a key the
        operator set is never printed).
    start_timeout : float
        Longest wait for the server to accept connections.
    """
    from .app import create_app
    from .settings import ServiceSettings

    settings = settings if settings is not None else ServiceSettings()
    updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    app = create_app(callback, settings=settings, policy_engine=policy_engine,
                     queue_steering=queue_steering)
    return serve_app(app, host=settings.host, port=settings.port, log_level=log_level,
                     announce=announce, start_timeout=start_timeout)


def serve_app(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
              announce: bool = True, start_timeout: float = 30.0) -> ServiceHandle:
    """Run an app made by :func:`~bluesky_xsml.api.app.create_app` in a background thread."""
    import uvicorn

    from .protocol import MAX_HEADER_BYTES, header_deadline_protocol
    from .settings import ServiceSettings, is_loopback

    own = getattr(app.state, "settings", None)
    settings = own if own is not None else ServiceSettings()
    if not is_loopback(host) and is_loopback(settings.host):
        # the app's host check and keyed reads were set up for loopback
        raise ValueError(f"the app was made for host {settings.host!r} and would serve "
                         f"{host!r} with open reads: create it with "
                         f"ServiceSettings(host={host!r}) (or use serve(host=...))")
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                            access_log=False, lifespan="on",
                            http=header_deadline_protocol(settings.header_timeout_s),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            limit_concurrency=settings.max_connections,
                            timeout_keep_alive=settings.keep_alive_s)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # not the main thread; IPython keeps Ctrl-C
    nice = int(own.nice) if own is not None else 0

    def run() -> None:
        if nice and hasattr(os, "setpriority"):
            try:  # Linux: per thread; the RunEngine and the tagger keep their priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError:  # pragma: no cover - not permitted here
                log.debug("could not renice the service thread")
        server.run(sockets=[sock])

    thread = threading.Thread(target=run, name="xsml-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the xsml service did not start on {url}")
        time.sleep(0.02)
    handle = ServiceHandle(app, server, thread, sock, url)
    if announce:
        if getattr(app.state, "api_key_generated", True):
            print(f"xsml service: {handle.page_url}\n  API key (X-API-Key header): "
                  f"{handle.api_key}", flush=True)
        else:  # the operator's own key: never printed (it may be in a shared log)
            print(f"xsml service: {handle.url}/page/ (API key: the one you configured; "
                  "open the page with #key=<your key>)", flush=True)
    return handle


# TaggingCallback.serve (deprecated) delegates here without importing this module
set_service_starter(serve)


# ------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface (default 127.0.0.1; XSML_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8765; XSML_PORT)")
    parser.add_argument("--model", default=None,
                        help="checkpoint file (default: the packaged model)")
    parser.add_argument("--zmq", default=None, metavar="HOST:PORT",
                        help="tag the documents of this 0MQ proxy output "
                             "(e.g. 127.0.0.1:5578)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="with --zmq: decode pickled documents (bluesky's default "
                             "encoding; lets whoever can publish to the proxy run code here). "
                             "Default: msgpack")
    parser.add_argument("--finetune-dir", default=None, metavar="DIR",
                        help="enable live fine-tuning (labels, checkpoints) in DIR")
    parser.add_argument("--log-level", default="info",
                        help="uvicorn log level (default info)")
    parser.add_argument("--isolation", choices=["thread", "process"], default="thread",
                        help="run the model in this process's worker thread (default) or in "
                             "a tagging process of its own (no fine-tuning there yet)")
    parser.add_argument("--readout", default=None, metavar="JSON",
                        help="the detector readout for runs whose start metadata gives none "
                             "(xsml_readout), as JSON: one readout, e.g. '{\"gain\": 3.6, "
                             "\"offset\": 100, \"saturated_value\": 65535}', or "
                             "{image key: readout}")


def main(args: argparse.Namespace) -> int:
    from ..inference.tagger import Tagger  # torch: only when the service tags here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    isolation = getattr(args, "isolation", "thread")
    readout = None
    if getattr(args, "readout", None):
        try:
            readout = readout_option(args.readout)
        except ValueError as err:  # ConfigurationError
            print(f"xsml serve: {err}", file=sys.stderr)
            return 2
    model = Tagger.load(args.model) if isolation == "thread" else args.model
    callback = TaggingCallback(model, isolation=isolation, readout=readout)
    if args.finetune_dir:
        callback.enable_finetuning(args.finetune_dir)
    source = None
    if args.zmq:
        from ..scaleout.transport import ZMQSource

        source = ZMQSource(args.zmq, serializer="pickle" if args.trust_pickle
                           else "msgpack").start()

        def pump():
            while not source.closed:
                item = source.get(timeout=0.5)
                if item is not None:
                    callback(*item)

        threading.Thread(target=pump, name="xsml-zmq", daemon=True).start()
    handle = serve(callback, host=args.host, port=args.port, log_level=args.log_level)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt  # a second signal: do not wait for the clean stop
        print(f"stopping ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
        stopping.set()

    # SIGTERM (kill, systemd, a container stop) stops as cleanly as Ctrl-C; a SIGINT the
    # shell told this process to ignore (a background job of a script) stays ignored
    signal.signal(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_signal)
    try:
        while handle.running and not stopping.wait(0.5):
            pass
    finally:
        handle.stop()
        if source is not None:
            source.close()
        callback.close()
    return 0
