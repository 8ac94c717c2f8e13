"""The per-user daemon: everything that runs under trio, and nothing else.

Composed, outermost first:

- :mod:`.main`: start-up and shut-down: the one-daemon lock, the control
  socket (or systemd's), signals, readiness and the watchdog;
- :mod:`.lifetime`: what ends the daemon: a signal, a ``stop`` request,
  or an idle stretch (``--exit-when-idle``);
- :mod:`.server`: connections: peer credentials, framing with limits and
  timeouts, the hello, and turning requests into calls on the sessions;
- :mod:`.sessions`: the lease rules: who may hold what, and what ends a
  lease (release, the holder's death, its ttl), recovery after a restart,
  garbage sweeps;
- :mod:`.table` (the live leases and their resources), :mod:`.ports` (the
  registry-port pool), :mod:`.holders` (pidfd watches), :mod:`.reaping`
  (ending leftover processes) and :mod:`.systemd` (activation, sd_notify,
  journal logs) serve the sessions and the main loop.

Nothing outside this package imports trio; the client side stays light.
"""

from tractor_session.daemon.config import Config
from tractor_session.daemon.main import serve

__all__ = ["Config", "serve"]
