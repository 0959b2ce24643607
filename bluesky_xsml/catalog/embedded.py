"""Opening a Tiled catalog of Bluesky runs: an embedded local one, or a production server.

The embedded default needs no setup: :class:`EmbeddedCatalog` starts tiled's
``SimpleTiledServer`` over a directory (SQLite catalog, DuckDB tables and zarr
arrays under that directory) on a background thread, and opens (or creates) one
``CatalogOfBlueskyRuns`` container in it. The server stops when the object is
closed; the object keeps the server referenced, because tiled stops a
``SimpleTiledServer`` that is garbage-collected.

For a facility server, :func:`connect` opens the container on an existing
Tiled server (SQLite or PostgreSQL catalog) with an API key.

Both give the same client node: write into it with :func:`make_writer`
(bluesky-tiled-plugins' ``TiledWriter`` with ``max_array_size=0``), tag stored
runs with :mod:`bluesky_xsml.catalog.append`, search with
:mod:`bluesky_xsml.catalog.query`.

Examples
--------
>>> import tempfile
>>> from bluesky_xsml.catalog.embedded import EmbeddedCatalog
>>> with EmbeddedCatalog(tempfile.mkdtemp()) as cat:
...     print(type(cat.catalog).__name__, len(cat.catalog))
CatalogOfBlueskyRuns 0
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DEFAULT_CONTAINER",
    "EmbeddedCatalog",
    "connect",
    "make_writer",
    "open_catalog",
    "process_api_key",
]

log = logging.getLogger(__name__)

#: Name of the ``CatalogOfBlueskyRuns`` container opened or created by default.
DEFAULT_CONTAINER = "raw"

_PROCESS_API_KEY: str | None = None


def process_api_key() -> str:
    """The API key shared by every embedded Tiled server of this process.

    tiled keeps its server settings in one process-wide object
    (``tiled.server.settings.get_settings`` is cached) and every app it
    builds writes its ``single_user_api_key`` there, so a second server with
    another key makes the first one refuse its own clients (HTTP 401). All
    servers started here therefore use this one random key.
    """
    global _PROCESS_API_KEY
    if _PROCESS_API_KEY is None:
        import secrets

        _PROCESS_API_KEY = secrets.token_hex(16)
    return _PROCESS_API_KEY


def _open_container(client, container: str | None, *, create: bool):
    """The ``CatalogOfBlueskyRuns`` node ``container`` under ``client`` (``None``: the root)."""
    if container is None:
        return client
    if container in client:
        return client[container]
    if not create:
        raise KeyError(f"the Tiled server has no container {container!r}; it has "
                       f"{sorted(client)[:20]!r} (pass create=True to make it)")
    return client.create_container(container, specs=["CatalogOfBlueskyRuns"])


def _one_request_at_a_time(directory: Path) -> None:
    """Give each request of an embedded server sole use of its DuckDB table connection.

    tiled 0.2's ``SimpleTiledServer`` keeps its tables in DuckDB and hands one
    connection to every request thread at once (``StaticPool``). Concurrent
    clients (two writers, a writer and a reader) then run their transactions
    interleaved on it: appends fail with HTTP 500 ("no active transaction",
    retried by the writer and possibly duplicated) and the server process can
    crash inside DuckDB (a segfault, seen with two re-tag workers). A pool of
    that one connection, checked out by one request at a time, makes the
    requests queue for it instead; the tables are small and local, so the
    wait is short.
    """
    import sqlalchemy.pool
    from tiled.storage import get_storage
    from tiled.utils import ensure_uri

    try:
        storage = get_storage(ensure_uri(f"duckdb:///{directory / 'storage.duckdb'}"))
        template = storage._adbc_connection
    except (KeyError, AttributeError) as err:  # another tiled: its storage is not ours to mend
        log.warning("could not make the embedded catalog's table requests take turns (%r); "
                    "concurrent writers may fail with HTTP 500", err)
        return
    shared = storage.__dict__.pop("_connection_pool", None)
    if shared is not None:
        shared.dispose()
    # tiled's SQLStorage reads its pool from this cached attribute and disposes of it on close
    storage.__dict__["_connection_pool"] = sqlalchemy.pool.QueuePool(
        template.adbc_clone, pool_size=1, max_overflow=0, timeout=600)


def _close_before_thread_join(catalog: EmbeddedCatalog) -> None:
    """Close ``catalog`` when the interpreter exits, before it joins non-daemon threads.

    tiled serves from a non-daemon thread, so a script that ends without
    closing the catalog would wait for it forever: ``atexit`` handlers run only
    after that join. ``threading._register_atexit`` (CPython >= 3.9) runs first;
    a weak reference leaves garbage collection as it was.
    """
    import threading
    import weakref

    ref = weakref.ref(catalog)

    def close() -> None:
        obj = ref()
        if obj is not None:
            obj.close()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(close)
        except RuntimeError:  # already shutting down
            pass


class EmbeddedCatalog:
    """A local Tiled server over ``directory`` with a ``CatalogOfBlueskyRuns`` container.

    Parameters
    ----------
    directory : str or path-like, optional
        Where the catalog lives (created if missing; an existing catalog there
        is reopened). Default: a new temporary directory, deleted on close.
    container : str
        Name of the runs container (created on first use).
    readable_storage : iterable of path-like, optional
        Directories the server may read detector files (HDF5) from, for runs
        whose frames are stored as external references.
    api_key : str, optional
        The server's single-user API key. Default: :func:`process_api_key`
        (servers in one process must share their key; see there).
    port : int
        TCP port on 127.0.0.1 (0: a free one).

    Attributes
    ----------
    server : tiled.server.SimpleTiledServer
    client : tiled.client.container.Container
        The root node of the server.
    catalog : CatalogOfBlueskyRuns
        The runs container: ``catalog[uid]`` is a run.
    uri : str
        The server's URI including the API key (for :func:`connect` from
        another process).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 container: str = DEFAULT_CONTAINER,
                 readable_storage: Iterable[str | os.PathLike] | None = None,
                 api_key: str | None = None, port: int = 0):
        from tiled.client import from_uri
        from tiled.server import SimpleTiledServer

        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        readable = [str(p) for p in readable_storage] if readable_storage else None
        self.server = SimpleTiledServer(directory, api_key=api_key or process_api_key(), port=port,
                                        readable_storage=readable)
        try:
            _one_request_at_a_time(Path(self.server.directory))
            self.client = from_uri(self.server.uri)
            self.catalog = _open_container(self.client, container, create=True)
        except BaseException:
            self.server.close()
            raise
        self.directory = Path(self.server.directory)
        self.uri = self.server.uri
        self._closed = False
        _close_before_thread_join(self)

    def writer(self, *, batch_size: int = 1, max_array_size: int = 0):
        """A new ``TiledWriter`` into :attr:`catalog` (see :func:`make_writer`)."""
        return make_writer(self.catalog, batch_size=batch_size, max_array_size=max_array_size)

    def close(self) -> None:
        """Stop the server (idempotent). The files stay in :attr:`directory`."""
        if not self._closed:
            self._closed = True
            self.server.close()

    def __enter__(self) -> EmbeddedCatalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.server.uri.split("?")[0]
        return f"<EmbeddedCatalog {str(self.directory)!r} {state}>"


def connect(uri: str, *, api_key: str | None = None, container: str | None = DEFAULT_CONTAINER,
            create: bool = False):
    """Open the runs container on an existing Tiled server.

    Parameters
    ----------
    uri : str
        The server, e.g. ``"http://tiled.example:8000"`` (an ``?api_key=``
        in the URI also works).
    api_key : str, optional
        API key; default: the ``TILED_API_KEY`` environment variable as read
        by tiled, or an interactive login where the server offers one.
    container : str or None
        The ``CatalogOfBlueskyRuns`` container; ``None`` if ``uri`` already
        points at it.
    create : bool
        Create the container when it does not exist (needs write access).

    Returns
    -------
    CatalogOfBlueskyRuns
        The runs container node.

    Raises
    ------
    KeyError
        If the container does not exist and ``create`` is false.
    """
    from tiled.client import from_uri

    client = from_uri(uri, api_key=api_key) if api_key is not None else from_uri(uri)
    return _open_container(client, container, create=create)


def make_writer(node, *, batch_size: int = 1, max_array_size: int = 0):
    """bluesky-tiled-plugins' ``TiledWriter`` into the runs container ``node``.

    Parameters
    ----------
    node : CatalogOfBlueskyRuns
    batch_size : int
        Events per write; 1 makes a run readable while it is going.
    max_array_size : int
        0 stores every array data key as an array node (with the writer's
        default, short vectors are stored in the SQL table and read back as
        strings).
    """
    from bluesky_tiled_plugins import TiledWriter

    return TiledWriter(node, batch_size=batch_size, max_array_size=max_array_size)


def open_catalog(spec: str | os.PathLike, *, api_key: str | None = None,
                 container: str = DEFAULT_CONTAINER):
    """Open a catalog from a command-line style ``spec``.

    An ``http://`` or ``https://`` URI connects to that server
    (:func:`connect`); anything else is a directory for an
    :class:`EmbeddedCatalog`.

    Returns
    -------
    (node, closer)
        The runs container, and a callable that releases what was opened
        (stops the embedded server; does nothing for a remote one).
    """
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        return connect(text, api_key=api_key, container=container), (lambda: None)
    if not Path(text).is_dir():
        raise FileNotFoundError(f"no catalog directory {text!r} (give a directory made by "
                                "EmbeddedCatalog, or an http(s):// Tiled URI)")
    embedded = EmbeddedCatalog(text, container=container)
    return embedded.catalog, embedded.close
