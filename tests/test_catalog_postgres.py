"""The tag queries and after-the-fact tagging on a Tiled server whose catalog is PostgreSQL.

A facility runs Tiled on PostgreSQL; the SQL tiled generates for JSON queries
differs from SQLite's (``->``/``@>`` on JSONB instead of ``json_extract``).
The fixture starts a throwaway PostgreSQL 15 cluster (Debian's
``postgresql-15``: ``initdb``/``pg_ctl`` from ``/usr/lib/postgresql/15/bin``) in
a temporary directory on a free port, as the ``postgres`` user when the tests
run as root, and serves a Tiled catalog over it
(``tiled.catalog.from_uri("postgresql+asyncpg://...")`` + ``build_app`` +
uvicorn on a thread). The query tests of ``test_query.py`` then run unchanged
against it (they use the ``scenario`` fixture, overridden here), and one
re-tag runs through it.

Skipped, with the reason, when the PostgreSQL binaries or asyncpg are absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import types
from pathlib import Path

import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")
pytest.importorskip("asyncpg", reason="needs asyncpg (tiled's PostgreSQL driver)")

from .test_query import (  # noqa: F401  (the same tests, run against PostgreSQL)
    build_scenario,
    test_find_frames_below_threshold_reads_every_run,
    test_find_frames_on_runs_and_by_model,
    test_find_frames_rows_probabilities_and_positions,
    test_find_runs_by_tag_and_count,
    test_find_runs_rejects_bad_input_with_clear_messages,
    test_find_runs_time_window_and_start_metadata,
    test_xml_export_matches_the_tag_stream,
)

PG_BIN = Path(os.environ.get("XSML_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and no runuser to start PostgreSQL as another user")
    return [runuser, "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster; yields its SQLAlchemy URI (asyncpg driver)."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (Debian: apt-get install "
                    "postgresql-15; or set XSML_PG_BIN)")
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="xsml-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                     "-A", "trust", "--no-sync", "-E", "UTF8"]), **run)
        subprocess.run(_as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off", "start"]), **run)
    except subprocess.CalledProcessError as err:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr}\n{log}")
    try:
        subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                     "-U", "postgres", "tiled"]), **run)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/tiled"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                     "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_catalog(postgres, tmp_path_factory):
    """A Tiled server over the PostgreSQL catalog; yields the runs container and its URI."""
    import uvicorn
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.client import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app
    from tiled.server.simple import ThreadedServer

    from bluesky_xsml.catalog.embedded import process_api_key

    files = tmp_path_factory.mktemp("pg_files")
    (files / "data").mkdir()
    adapter = catalog_from_uri(
        postgres, writable_storage=[files / "data", f"duckdb:///{files / 'storage.duckdb'}"],
        init_if_not_exists=True)
    key = process_api_key()   # tiled's server settings are process-wide: share the key
    app = build_app(adapter, authentication=Authentication(single_user_api_key=key))
    server = ThreadedServer(uvicorn.Config(app, host="127.0.0.1", port=0, loop="asyncio",
                                           log_level="warning"))
    with server.run_in_thread() as base_url:
        deadline = time.monotonic() + 30
        import httpx

        while time.monotonic() < deadline:  # the app serves once its lifespan startup ran
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        uri = f"{base_url}/api/v1?api_key={key}"
        client = from_uri(uri)
        assert client.context.server_info is not None
        catalog = client.create_container("raw", specs=["CatalogOfBlueskyRuns"])
        yield types.SimpleNamespace(catalog=catalog, uri=uri)


@pytest.fixture(scope="module")
def scenario(pg_catalog):
    """The runs of ``test_query.PLAN``, written and tagged in the PostgreSQL catalog."""
    ns = build_scenario(pg_catalog.catalog)
    ns.uri = pg_catalog.uri
    return ns


def test_the_catalog_is_postgresql(pg_catalog, postgres):
    """Guard: the tests above really ran on PostgreSQL, not on a fallback."""
    import asyncio

    import asyncpg

    async def count_nodes():
        conn = await asyncpg.connect(postgres.replace("postgresql+asyncpg", "postgresql"))
        try:
            return await conn.fetchval("SELECT count(*) FROM nodes WHERE key = 'raw'")
        finally:
            await conn.close()

    assert asyncio.run(count_nodes()) == 1


def test_retag_on_postgres(scenario, tagger):
    from bluesky_xsml.catalog.append import retag_run
    from bluesky_xsml.query import find_runs

    uid = scenario.uids["D"]     # the untagged run
    result = retag_run(scenario.catalog[uid], tagger)
    assert result.status == "tagged" and result.frames == 4 and result.skipped == {}
    stop = scenario.catalog[uid].metadata["stop"]
    assert stop["xsml_frames"] == 4 and stop["xsml_model"] == tagger.checkpoint_id
    for tag, n in stop["xsml_tag_counts"].items():
        assert uid in set(find_runs(scenario.catalog, tag, min_frames=n))
        assert uid not in set(find_runs(scenario.catalog, tag, min_frames=n + 1))
    assert retag_run(scenario.catalog[uid], tagger).status == "skipped"
