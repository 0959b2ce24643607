"""How long a client that never finishes its request headers holds a connection.

    python experiments/slow_headers.py [--wait 30] [--header-timeout 5]

Starts the service (no callback) on loopback twice: once as ``serve_app`` runs
it (uvicorn with the header deadline of :mod:`bluesky_xsml.api.protocol`), once
under plain uvicorn with the same limits (``limit_concurrency``,
``timeout_keep_alive``) and uvicorn's own protocol. Each time it opens two
connections, one sending half a request (``GET /healthz HTTP/1.1``, ``Host``
and an unfinished header line) and one sending nothing, and waits up to
``--wait`` seconds for the server to close each. Prints one line per server:
``<server> half_headers_s <s|open> silent_s <s|open>`` (``open``: still open
when the wait ended).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time


def held_for(address: tuple[str, int], payload: bytes, wait: float) -> float | None:
    s = socket.create_connection(address)
    if payload:
        s.sendall(payload)
    s.settimeout(wait)
    t0 = time.monotonic()
    try:
        while s.recv(4096):
            pass
        return time.monotonic() - t0
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - t0
    finally:
        s.close()


def measure(address, wait: float) -> tuple[float | None, float | None]:
    out: dict[str, float | None] = {}
    payloads = {"half": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", "silent": b""}
    threads = [threading.Thread(target=lambda k=k, p=p: out.__setitem__(k, held_for(
        address, p, wait))) for k, p in payloads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out["half"], out["silent"]


def plain_uvicorn(app, settings):
    import uvicorn

    from bluesky_xsml.api.serve import _bind

    sock = _bind("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            limit_concurrency=settings.max_connections,
                            timeout_keep_alive=settings.keep_alive_s)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return sock.getsockname()[:2], server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait", type=float, default=30.0)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    args = parser.parse_args()

    from bluesky_xsml.api.app import create_app
    from bluesky_xsml.api.serve import serve_app
    from bluesky_xsml.api.settings import ServiceSettings

    settings = ServiceSettings(api_key="x" * 32, header_timeout_s=args.header_timeout)

    def shown(v):
        return "open" if v is None else f"{v:.2f}"

    handle = serve_app(create_app(settings=settings), port=0, announce=False)
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    half, silent = measure((host, int(port)), args.wait)
    handle.stop()
    print(f"xsml_serve half_headers_s {shown(half)} silent_s {shown(silent)}", flush=True)

    address, server, thread = plain_uvicorn(create_app(settings=settings), settings)
    half, silent = measure(address, args.wait)
    server.should_exit = True
    thread.join(10)
    print(f"plain_uvicorn half_headers_s {shown(half)} silent_s {shown(silent)}", flush=True)


if __name__ == "__main__":
    main()
