#!/usr/bin/env python3
"""Drives a running colo pair through QEMU's own QMP library (qemu.qmp's QMPClient).

Usage: colo_pair.py PRIMARY_QMP SECONDARY_QMP

Both sides must be in COLO (or about to be). Checks negotiation, query-colo-status,
query-commands, query-status, query-version, that stop is refused in COLO, a failover by
x-colo-lost-heartbeat on the secondary (its COLO_EXIT event and query-colo-status after),
stop/cont on the secondary once it serves alone (STOP and RESUME), and ends both sides with
quit. Exits 0 and prints "ok" when everything held; otherwise raises (non-zero exit).
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient

# Every wait is bounded: a hung side fails the test instead of hanging it.
STEP = 30.0

EXPECTED_COMMANDS = {
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-colo-status",
    "migrate-set-capabilities",
    "migrate-set-parameters",
    "migrate",
    "x-colo-lost-heartbeat",
    "stop",
    "cont",
    "quit",
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def bounded(coro, what):
    try:
        return await asyncio.wait_for(coro, STEP)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: nothing within {STEP} s") from None


async def client(name, path):
    qmp = QMPClient(name)
    # connect() reads the greeting and negotiates (qmp_capabilities).
    await bounded(qmp.connect(path), f"{name}: connect and negotiate")
    return qmp


async def expect_error(qmp, cmd, cls, what):
    try:
        await bounded(qmp.execute(cmd), what)
    except ExecuteError as e:
        check(e.error_class == cls, f"{what}: {e.error_class} ({e})")
        return
    raise AssertionError(f"{what}: {cmd} was accepted")


async def main(primary_path, secondary_path):
    pri = await client("primary", primary_path)
    sec = await client("secondary", secondary_path)

    st = await bounded(pri.execute("query-colo-status"), "query-colo-status")
    check(st["mode"] == "primary", f"primary status {st}")
    # The secondary may still be in its initial sync on a busy machine: wait (bounded)
    # for its first checkpoint.
    for _ in range(300):
        st = await bounded(sec.execute("query-colo-status"), "query-colo-status")
        if st.get("x-colo-phase") != "syncing":
            break
        await asyncio.sleep(0.1)
    check(st == {"mode": "secondary", "last-mode": "none", "reason": "none",
               "x-colo-phase": "colo"}, f"{st}")

    names = {c["name"] for c in await bounded(sec.execute("query-commands"), "query-commands")}
    check(EXPECTED_COMMANDS <= names, f"query-commands lacks {EXPECTED_COMMANDS - names}")

    ver = await bounded(pri.execute("query-version"), "query-version")
    check(all(isinstance(ver["qemu"][k], int) for k in ("major", "minor", "micro")), f"{ver}")
    check(ver["package"].startswith("colo "), f"package {ver}")

    # The secondary runs once its first checkpoint is applied: then a failover has
    # something to take over.
    for _ in range(int(STEP / 0.1)):
        s = await bounded(sec.execute("query-status"), "query-status")
        if s["status"] == "running":
            break
        check(s["status"] == "inmigrate", f"secondary before its first checkpoint: {s}")
        await asyncio.sleep(0.1)
    check(s == {"running": True, "singlestep": False, "status": "running"}, f"secondary {s}")
    s = await bounded(pri.execute("query-status"), "query-status")
    check(s == {"running": True, "singlestep": False, "status": "running"}, f"primary {s}")

    await expect_error(sec, "stop", "GenericError", "stop while in COLO")

    with sec.listener("COLO_EXIT") as exits, pri.listener("COLO_EXIT") as pri_exits:
        check(await bounded(sec.execute("x-colo-lost-heartbeat"), "failover") == {}, "reply")
        ev = await bounded(exits.get(), "the secondary's COLO_EXIT")
        check(ev["data"] == {"mode": "secondary", "reason": "request"}, f"COLO_EXIT {ev}")
        # The primary loses its secondary too, and says so.
        ev = await bounded(pri_exits.get(), "the primary's COLO_EXIT")
        check(ev["data"]["mode"] == "primary", f"primary COLO_EXIT {ev}")
    st = await bounded(sec.execute("query-colo-status"), "query-colo-status")
    check(st == {"mode": "none", "last-mode": "secondary", "reason": "request",
               "x-colo-phase": "serving"}, f"{st}")

    # Serving alone, the secondary's guest can be paused and resumed.
    for _ in range(int(STEP / 0.1)):
        s = await bounded(sec.execute("query-status"), "query-status")
        if s["status"] == "running":
            break
        await asyncio.sleep(0.1)
    with sec.listener(("STOP", "RESUME")) as run_events:
        check(await bounded(sec.execute("stop"), "stop") == {}, "stop reply")
        check((await bounded(run_events.get(), "STOP"))["event"] == "STOP", "STOP event")
        s = await bounded(sec.execute("query-status"), "query-status")
        check(s == {"running": False, "singlestep": False, "status": "paused"}, f"{s}")
        check(await bounded(sec.execute("cont"), "cont") == {}, "cont reply")
        check((await bounded(run_events.get(), "RESUME"))["event"] == "RESUME", "RESUME")
        s = await bounded(sec.execute("query-status"), "query-status")
        check(s["status"] == "running", f"{s}")

    # quit answers first; then the side ends (the Rust test checks how).
    for qmp in (sec, pri):
        check(await bounded(qmp.execute("quit"), "quit") == {}, "quit reply")
        await bounded(qmp.disconnect(), "disconnect")
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
