"""Settings of the steering service (environment prefix ``XSML_``).

Every option can come from the environment (``XSML_PORT=8770``,
``XSML_API_KEY=...``) or be given in code::

    from bluesky_xsml.api.settings import ServiceSettings
    settings = ServiceSettings(port=8770, api_key="a-long-secret")

Examples
--------
>>> s = ServiceSettings(api_key="k" * 20)
>>> s.host, s.max_body_bytes
('127.0.0.1', 1048576)
>>> s.resolved_api_key()
'kkkkkkkkkkkkkkkkkkkk'
>>> len(ServiceSettings().resolved_api_key()) >= 32   # generated when not set
True
"""

from __future__ import annotations

import ipaddress
import secrets

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServiceSettings", "API_KEY_HEADER", "LOOPBACK_NAMES", "is_loopback"]

#: The request header that carries the API key (``Authorization: Bearer <key>`` or
#: ``Authorization: ApiKey <key>`` work too).
API_KEY_HEADER = "X-API-Key"

#: Host names that always reach this machine's loopback interface.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or host name) is a loopback interface.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost")
    (True, True, True)
    >>> is_loopback("0.0.0.0"), is_loopback("beamline-ws1")
    (False, False)
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServiceSettings(BaseSettings):
    """Options of the steering service.

    Parameters
    ----------
    host : str
        Interface to bind; loopback by default. Binding another interface
        exposes the service to the network: use a strong ``api_key`` then.
    port : int
        TCP port (0: any free port).
    api_key : str, optional
        Key that every state-changing request must carry in the ``X-API-Key``
        header. When not set, a random key is generated at start and printed.
    max_body_bytes : int
        Largest request body accepted (413 above it).
    latest_frames : int
        Recent frame results kept for ``/api/frames/latest`` and feed replay.
    max_runs : int
        Runs whose per-frame tags are kept for ``/api/runs/{uid}/frames``.
    max_frames_per_run : int
        Frames kept per run (later ones are counted, not kept). A kept frame
        costs about 3 KiB, so the defaults hold at most about 150 MiB.
    thumbnails : int
        Recent frames whose thumbnails are kept (about 16 KiB each). With
        ``isolation="process"`` a thumbnail is made when it is first asked
        for, from the frame's input in the tagging process's label cache.
    feed_queue : int
        Messages buffered per live-feed client before it starts missing some.
    feed_heartbeat_s : float
        Seconds between keep-alive comments on an idle live feed.
    nice : int
        Niceness of the server thread when it runs next to the RunEngine
        (Linux, per thread; 0 leaves it): tagging gets the CPU first.
    trusted_hosts : list of str, optional
        ``Host`` header values the service answers (without the port; ``"*"``
        allows any). Default: the loopback names and ``host``, plus this
        machine's host name when ``host`` is a wildcard (``0.0.0.0``, ``::``).
        Any other ``Host`` gets 400: a page on another origin cannot read the
        API through DNS rebinding.
    keyed_reads : bool, optional
        Whether reads under ``/api/`` need the key too. Default: only when
        ``host`` is not a loopback interface.
    max_connections : int
        Open connections (and requests in progress) above which uvicorn
        answers 503 (its ``limit_concurrency``).
    max_feed_clients : int
        Live-feed (``/api/feed``) clients at once; one more gets 503.
    header_timeout_s : float
        Longest time a client may take to send a request's headers (from the
        connection, or the request's first byte); then the connection is closed.
    keep_alive_s : int
        Seconds an idle keep-alive connection is kept open.
    """

    model_config = SettingsConfigDict(env_prefix="XSML_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    api_key: SecretStr | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    latest_frames: int = Field(default=2000, ge=1)
    max_runs: int = Field(default=10, ge=1)
    max_frames_per_run: int = Field(default=5000, ge=1)
    thumbnails: int = Field(default=500, ge=0)
    feed_queue: int = Field(default=1000, ge=1)
    feed_heartbeat_s: float = Field(default=15.0, gt=0)
    nice: int = Field(default=10, ge=0, le=19)
    trusted_hosts: list[str] | None = None
    keyed_reads: bool | None = None
    max_connections: int = Field(default=64, ge=2, le=10_000)
    max_feed_clients: int = Field(default=8, ge=1, le=1000)
    header_timeout_s: float = Field(default=5.0, gt=0, le=300)
    keep_alive_s: int = Field(default=5, ge=1, le=300)

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("api_key must be at least 16 characters (or leave it unset to "
                             "have one generated)")
        return v

    def allowed_hosts(self) -> frozenset[str]:
        """Lower-case ``Host`` names (no port, no brackets) the service answers."""
        if self.trusted_hosts is not None:
            names = list(self.trusted_hosts)
        else:
            names = [*LOOPBACK_NAMES, self.host]
            if self.host in ("0.0.0.0", "::", ""):
                import socket

                names.append(socket.gethostname())
        return frozenset(n.strip().strip("[]").lower() for n in names if n.strip())

    def reads_need_key(self) -> bool:
        """Whether ``/api/`` reads need the key (default: bound off loopback)."""
        return (not is_loopback(self.host)) if self.keyed_reads is None else self.keyed_reads

    def resolved_api_key(self) -> str:
        """The configured key, or a newly generated one (stored for later calls)."""
        if self.api_key is None:
            self.api_key = SecretStr(secrets.token_urlsafe(32))
        return self.api_key.get_secret_value()
