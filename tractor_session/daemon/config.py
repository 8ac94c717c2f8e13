"""What the daemon can be told (``tractor-session serve --help``); the
defaults suit a dev box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tractor_session import gc, wire
from tractor_session.daemon.ports import DEFAULT_POOL


@dataclass
class Config:
    root: Path
    socket: Path
    port_pool: range = DEFAULT_POOL
    reap_grace: float = 3.0
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    request_timeout: float = 5.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    max_leases: int = 20000
    gc_interval: float = 60.0
    gc_grace: float = gc.DEFAULT_GRACE
    exit_when_idle: float | None = None
    """Exit after this many seconds with no live lease and no client
    connected; None (by hand, under systemd): never."""
    log_level: str = "info"
    verbose: bool = False
    """Also log every grant and release (see ``systemd.configure_logging``)."""
    log_file: Path | None = None
    """Log there, rotated, rather than to stderr."""
