"""Drives a ringvisor QMP server with QEMU's own Python client library (PyPI `qemu.qmp`).

Usage: python3 qemu_qmp_client.py SOCKET
Prints one JSON object with what it saw; the Rust test (tests/python_qemu_qmp.rs) checks it.
The server must implement the test handler's `echo` and `emit` commands.
"""
import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol


async def async_api(path, out):
    qmp = QMPClient("ringvisor-test")
    await asyncio.wait_for(qmp.connect(path), 10)
    out["greeting"] = {
        "version": dict(qmp.greeting.QMP.version),
        "capabilities": list(qmp.greeting.QMP.capabilities),
    }
    cmds = await asyncio.wait_for(qmp.execute("query-commands"), 10)
    out["commands"] = [c["name"] for c in cmds]
    out["echo"] = await asyncio.wait_for(
        qmp.execute("echo", {"uri": "tcp:127.0.0.1:4444", "n": 5, "nested": {"a": [1]}}), 10
    )
    try:
        await asyncio.wait_for(qmp.execute("no-such-command"), 10)
        out["unknown"] = "no error"
    except ExecuteError as err:
        out["unknown"] = {"class": err.error_class, "desc": err.error.error.desc}
    with qmp.listener("TEST_EVENT") as listener:
        await asyncio.wait_for(qmp.execute("emit", {"k": "v"}), 10)
        event = await asyncio.wait_for(listener.get(), 10)
        out["event"] = {
            "event": event["event"],
            "data": event["data"],
            "timestamp": event["timestamp"],
        }
    await qmp.disconnect()


def legacy_api(path, out):
    mon = QEMUMonitorProtocol(path)
    mon.settimeout(10.0)
    mon.connect(negotiate=True)
    out["legacy_echo"] = mon.cmd("echo", x=1)
    mon.cmd("emit", y=2)
    event = mon.pull_event(wait=10.0)
    out["legacy_event"] = {"event": event["event"], "data": event["data"]}
    mon.close()


def main():
    path = sys.argv[1]
    out = {}
    asyncio.run(async_api(path, out))
    legacy_api(path, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
