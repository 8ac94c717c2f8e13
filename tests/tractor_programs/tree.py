"""An unmodified tractor program on tractor's defaults: a root actor, one
subactor, the default registry.  Written the way users write them: it
reads no envelope and passes no address.

    python tree.py NAME OUT_JSON [PEER_NAME]

Spawns subactor ``sub-NAME``, then reports as JSON whether this root is the
registrar, and whether the registry it uses also knows ``sub-PEER_NAME``
(another tree's subactor: the trees merged).  Then holds until its stdin
closes, so that two trees overlap.  ``TREE_TPT=uds`` enables the uds
transport instead of tractor's default tcp (the registry stays tractor's
default for it).
"""

import json
import os
import sys

import tractor
import trio


async def ping() -> int:
    return os.getpid()


async def main(name: str, out: str, peer: str | None) -> None:
    async with tractor.open_nursery(enable_transports=[os.environ.get("TREE_TPT", "tcp")]) as nursery:
        portal = await nursery.start_actor(f"sub-{name}", enable_modules=[__name__])
        sub_pid = await portal.run(ping)
        actor = tractor.current_actor()
        report = {
            "name": name,
            "pid": os.getpid(),
            "sub_pid": sub_pid,
            "is_registrar": actor.is_registrar,
            "xdg": os.environ.get("XDG_RUNTIME_DIR"),
            "peer_seen": None,
        }
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.rename(tmp, out)
        # Hold (and keep looking for the other tree's subactor) until stdin closes.
        async with trio.open_nursery() as waiting:
            async def look_for_peer() -> None:
                if peer is None:
                    return
                while True:
                    async with tractor.find_actor(f"sub-{peer}") as other:
                        if other is not None:
                            report["peer_seen"] = True
                            with open(tmp, "w") as f:
                                json.dump(report, f)
                            os.rename(tmp, out)
                            return
                    await trio.sleep(0.05)

            waiting.start_soon(look_for_peer)
            await trio.to_thread.run_sync(sys.stdin.read)
            waiting.cancel_scope.cancel()
        await portal.cancel_actor()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
