"""tractor-session: a private, self-cleaning session for every tractor run.

A per-user daemon hands out *leases*: a session id, a private socket
directory (the *bindspace*), a free registry address and the environment
(the *envelope*) that every process of the session inherits.  When the
lease ends, the daemon removes what the session left behind.

Importing this package imports nothing heavy: the client side must stay
fast because it sits on the hot path of every test run.
"""

__version__ = "0.1.0"
