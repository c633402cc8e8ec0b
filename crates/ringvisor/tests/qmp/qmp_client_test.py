#!/usr/bin/env python3
"""ringvisor driven by QEMU's own QMP client library (PyPI `qemu.qmp`), as a QEMU user's script
would drive QEMU: live migration with a mid-migration max-bandwidth change and MIGRATION events,
a cancelled migration that leaves the guest running on the source and a later one that
completes, and calc-dirty-rate / query-dirty-rate in dirty-ring mode.

Run by crates/ringvisor/tests/qmp_py.rs with RINGVISOR_BIN set to the binary under test.
Every check is a decision the program made (a status, a parameter value, a counter that grew,
a rate under the cap it was given); nothing here bounds how long anything took.
"""
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

BIN = os.environ["RINGVISOR_BIN"]
MIB = 1 << 20


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


class Proc:
    """A ringvisor process with a QMP socket."""

    def __init__(self, tmp, name, args):
        self.sock = os.path.join(tmp, f"{name}.qmp")
        self.log = open(os.path.join(tmp, f"{name}.log"), "w")
        self.p = subprocess.Popen(
            [BIN] + args + ["--qmp", f"unix:{self.sock}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QMPClient(name)

    async def connect(self):
        # The socket appears once the VM process has set up its monitor.
        for _ in range(600):
            if self.p.poll() is not None:
                raise AssertionError(f"{self.sock}: process exited with {self.p.returncode}")
            if os.path.exists(self.sock):
                try:
                    await self.qmp.connect(self.sock)
                    return
                except (ConnectionError, OSError):
                    pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.sock} never accepted a QMP connection")

    async def run(self, cmd, args=None):
        return await self.qmp.execute(cmd, args)

    async def close(self):
        try:
            await self.qmp.execute("quit")
        except Exception:
            pass
        try:
            await self.qmp.disconnect()
        except Exception:
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def guest_args(dirty_rate):
    return ["run", "--memory", "256M", "--vcpus", "2", "--working-set", "64M",
            "--dirty-rate", dirty_rate]


async def incoming_uri(dest):
    """Starts the deferred destination listening on a free port; returns tcp:HOST:PORT."""
    st = await dest.run("query-status")
    check(st["status"] == "inmigrate", f"destination waits for a migration ({st})")
    await dest.run("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info = await dest.run("query-migrate")
    addrs = info.get("socket-address", [])
    check(len(addrs) == 1 and int(addrs[0]["port"]) > 0,
          f"query-migrate on the destination gives its listening address ({addrs})")
    return f"tcp:{addrs[0]['host']}:{addrs[0]['port']}"


async def wait_status(vm, wanted, limit_s=300):
    t0 = time.monotonic()
    while True:
        info = await vm.run("query-migrate")
        if info.get("status") in wanted:
            return info
        if time.monotonic() - t0 > limit_s:  # a hang guard, not a performance assertion
            raise AssertionError(f"migration stuck in {info.get('status')}: {info}")
        await asyncio.sleep(0.2)


async def migrate_with_bandwidth_change(tmp):
    src = Proc(tmp, "src1", guest_args("50M"))
    dst = Proc(tmp, "dst1", ["incoming", "--incoming", "defer"])
    await src.connect()
    await dst.connect()
    st = await src.run("query-status")
    check(st == {"status": "running", "running": True, "singlestep": False} or
          (st["status"] == "running" and st["running"] is True), "source is running")
    cmds = {c["name"] for c in await src.run("query-commands")}
    for c in ("migrate", "query-migrate", "migrate_cancel", "migrate-set-parameters",
              "query-migrate-parameters", "calc-dirty-rate", "query-dirty-rate", "stop", "cont"):
        check(c in cmds, f"query-commands lists {c}")
    uri = await incoming_uri(dst)

    cap = 8 * MIB
    await src.run("migrate-set-parameters", {"max-bandwidth": cap, "downtime-limit": 300})
    params = await src.run("query-migrate-parameters")
    check(params["max-bandwidth"] == cap and params["downtime-limit"] == 300,
          "query-migrate-parameters shows the values set")

    with src.qmp.listener(("MIGRATION", "MIGRATION_PASS")) as events:
        await src.run("migrate", {"uri": uri})
        info = await wait_status(src, ("active",))
        # ram.transferred grows while active, and under the 8 MiB/s cap it grows at most at
        # the cap (plus one token-bucket burst): an upper bound holds on a busy machine too.
        t0, x0 = time.monotonic(), info["ram"]["transferred"]
        await asyncio.sleep(2.0)
        info = await src.run("query-migrate")
        t1, x1 = time.monotonic(), info["ram"]["transferred"]
        check(info["status"] == "active", "still active under the 8 MiB/s cap")
        check(x1 > x0, f"ram.transferred grows while active ({x0} -> {x1})")
        check((x1 - x0) <= cap * (t1 - t0) + 4 * MIB,
              f"rate under the cap: {(x1 - x0) / (t1 - t0) / MIB:.1f} MiB/s <= 8 MiB/s")
        for k in ("transferred", "remaining", "total", "duplicate", "normal",
                  "dirty-pages-rate", "mbps", "dirty-sync-count", "precopy-bytes"):
            check(k in info["ram"], f"query-migrate ram has {k}")
        # Lift the cap mid-migration: the job takes the new value and completes.
        await src.run("migrate-set-parameters", {"max-bandwidth": 0})
        params = await src.run("query-migrate-parameters")
        check(params["max-bandwidth"] == 0, "max-bandwidth changed mid-migration")
        info = await wait_status(src, ("completed", "failed", "cancelled"))
        check(info["status"] == "completed", f"migration completed ({info.get('error-desc')})")
        for k in ("total-time", "downtime", "setup-time"):
            check(k in info, f"completed query-migrate has {k}")
        seen = []
        while not events.empty():
            ev = await events.get()
            if ev["event"] == "MIGRATION":
                seen.append(ev["data"]["status"])
        check(seen[:1] == ["setup"] and "active" in seen and seen[-1] == "completed",
              f"MIGRATION events setup .. active .. completed ({seen})")
    st = await src.run("query-status")
    check(st["status"] == "postmigrate" and st["running"] is False, "source is postmigrate")
    st = await dst.run("query-status")
    check(st["status"] == "running", "destination runs the guest")
    await src.close()
    await dst.close()


async def cancel_then_migrate(tmp):
    src = Proc(tmp, "src2", guest_args("50M"))
    dst = Proc(tmp, "dst2", ["incoming", "--incoming", "defer"])
    await src.connect()
    await dst.connect()
    uri = await incoming_uri(dst)
    await src.run("migrate-set-parameters", {"max-bandwidth": 4 * MIB})
    await src.run("migrate", {"uri": uri})
    await wait_status(src, ("active",))
    await src.run("migrate_cancel")
    info = await wait_status(src, ("cancelled", "failed", "completed"))
    check(info["status"] == "cancelled", f"migrate_cancel cancels ({info})")
    st = await src.run("query-status")
    check(st["status"] == "running" and st["running"] is True,
          "after the cancel the guest keeps running on the source")
    # The guest is really running: its write counters keep growing.
    g0 = await src.run("x-ringvisor-query-guest")
    await asyncio.sleep(0.5)
    g1 = await src.run("x-ringvisor-query-guest")
    check(sum(g1["writes"]) > sum(g0["writes"]), "the source's guest keeps writing")
    # The destination dropped what it received and waits for another migration.
    st = await dst.run("query-status")
    check(st["status"] == "inmigrate", f"the destination waits again ({st})")
    info = await dst.run("query-migrate")
    uri = f"tcp:{info['socket-address'][0]['host']}:{info['socket-address'][0]['port']}"
    await src.run("migrate-set-parameters", {"max-bandwidth": 0})
    await src.run("migrate", {"uri": uri})
    info = await wait_status(src, ("completed", "failed", "cancelled"))
    check(info["status"] == "completed", f"a later migrate completes ({info.get('error-desc')})")
    await src.close()
    await dst.close()


async def dirty_rate(tmp):
    vm = Proc(tmp, "dr", guest_args("32M"))
    await vm.connect()
    await vm.run("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-ring"})
    t0 = time.monotonic()
    while True:
        r = await vm.run("query-dirty-rate")
        if r["status"] == "measured":
            break
        check(r["status"] == "measuring", f"query-dirty-rate status ({r['status']})")
        if time.monotonic() - t0 > 120:
            raise AssertionError("dirty rate never measured")
        await asyncio.sleep(0.2)
    check(r["mode"] == "dirty-ring" and r["calc-time"] == 1, "dirty-ring mode, 1 s")
    check(r["dirty-rate"] > 0, f"a dirtying guest has a dirty rate ({r['dirty-rate']} MB/s)")
    per = r.get("vcpu-dirty-rate", [])
    check([v["id"] for v in per] == [0, 1], "one per-vCPU rate for each of the 2 vCPUs")
    check(all(v["dirty-rate"] > 0 for v in per), f"both vCPUs dirty memory ({per})")
    try:
        await vm.run("calc-dirty-rate", {"calc-time": "one"})
        raise AssertionError("a string calc-time was accepted")
    except ExecuteError as e:
        check(e.error.error.class_ == "GenericError", f"wrong argument type -> GenericError ({e})")
    await vm.close()


async def main():
    with tempfile.TemporaryDirectory(prefix="rv-qmp-") as tmp:
        try:
            await migrate_with_bandwidth_change(tmp)
            await cancel_then_migrate(tmp)
            await dirty_rate(tmp)
        except BaseException:
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".log"):
                    print(f"--- {f}")
                    print(open(os.path.join(tmp, f)).read()[-4000:])
            raise
    print("qemu.qmp: all checks passed")


if __name__ == "__main__":
    asyncio.run(main())
