#!/usr/bin/env python3
"""`scripts/bench procs`: long-running processes (issue 14).

- idle: N processes (`sleep infinity` with a 1 s exec health check) on one `muster agent`
  (a `muster server` beside it): the agent's RSS, the CPU of the agent and of all supervisors
  (from /proc, over a window), each supervisor's private memory (Private_Clean + Private_Dirty
  of /proc/PID/smaps_rollup);
- restart: kill -9 of a process (backoff_base = 0) to its restart, timed from the kill to the
  new run's own first instruction (it writes the time), p50/p99;
- healthy: POST of a python3 http.server process to `healthy` (polled every 5 ms), p50/p99,
  next to the same server started bare with subprocess.Popen and polled with a connect every
  5 ms until it accepts, in the same run.

Everything runs on loopback and is killed on the way out (the driver is a child subreaper).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fleet as bf  # noqa: E402
import bench_jobs as bj  # noqa: E402
from bench_jobs import log, pct, rss_kb  # noqa: E402


def ticks(pid):
    """utime + stime of a process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError):
        return 0


def private_kb(pid):
    n = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    n += int(line.split()[1])
    except OSError:
        return None
    return n


def supervisors(agent_dir):
    """The sid (= pid) of every process supervisor under the agent's data dir."""
    out = []
    procs = os.path.join(agent_dir, "procs")
    for d in os.listdir(procs) if os.path.isdir(procs) else []:
        try:
            with open(os.path.join(procs, d, "started.json")) as f:
                out.append(json.load(f)["sid"])
        except (OSError, ValueError, KeyError):
            pass
    return out


def wait_all(api, ids, want, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        items = api.call("GET", "/api/v1/processes")["items"]
        states = {p["id"]: p for p in items if p["id"] in ids}
        if len(states) == len(ids) and all(want(p) for p in states.values()):
            return states
        time.sleep(0.2)
    raise RuntimeError(f"processes not {want} after {timeout} s")


def part_idle(tmp, R, q):
    s = bf.Server(tmp, "idle", {}, mode="server")
    s.start()
    s.setup()
    token = s.join_token(1)
    a = bf.Agent(tmp, "idle", token, server=s.url)
    a.start()
    a.wait_running()
    bf.wait_ready(s.api, ["idle"], 30)
    base_rss = rss_kb(a.pid) / 1024
    n = q["idle"]
    ids = []
    for i in range(n):
        p = s.api.call("POST", "/api/v1/processes", {
            "name": f"idle-{i}", "exec": ["sleep", "infinity"],
            "health": {"exec": ["true"], "interval": "1s", "timeout": "1s"}})
        ids.append(p["id"])
    wait_all(s.api, set(ids), lambda p: p["state"] == "healthy", 300)
    time.sleep(3)
    sups = supervisors(os.path.join(a.data_dir, "agent"))
    hz = os.sysconf("SC_CLK_TCK")
    window = q["window_s"]
    t0 = time.time()
    a0, s0 = ticks(a.pid), {p: ticks(p) for p in sups}
    time.sleep(window)
    dt = time.time() - t0
    a1, s1 = ticks(a.pid), {p: ticks(p) for p in sups}
    agent_cpu = (a1 - a0) / hz / dt * 100
    sup_cpu = sum(s1[p] - s0[p] for p in sups) / hz / dt * 100
    privs = [x for x in (private_kb(p) for p in sups) if x is not None]
    R["idle"] = {
        "n": n, "supervisors": len(sups), "window_s": round(dt, 1),
        "agent_rss_mb_before": round(base_rss, 1),
        "agent_rss_mb": round(rss_kb(a.pid) / 1024, 1),
        "agent_cpu_pct": round(agent_cpu, 2),
        "supervisors_cpu_pct": round(sup_cpu, 2),
        "all_supervision_cpu_pct": round(agent_cpu + sup_cpu, 2),
        "supervisor_private_kb_p50": pct(privs, 50),
        "supervisor_private_kb_max": max(privs) if privs else None,
    }
    log(f"  {n} idle processes: agent RSS {R['idle']['agent_rss_mb']} MB "
        f"(was {R['idle']['agent_rss_mb_before']}), agent CPU {agent_cpu:.2f} %, "
        f"{len(sups)} supervisors {sup_cpu:.2f} % of a core; supervisor private memory "
        f"p50 {R['idle']['supervisor_private_kb_p50']:.0f} KiB, max {R['idle']['supervisor_private_kb_max']} KiB")
    for i in ids:
        s.api.call("DELETE", f"/api/v1/processes/{i}", expect=(202,))
    a.stop()
    s.stop()


def part_restart(tmp, R, q):
    m = bf.Server(tmp, "restart", {}, mode="up")
    m.start()
    m.setup()
    stamp = os.path.join(tmp, "starts")
    p = m.api.call("POST", "/api/v1/processes", {
        "name": "crasher", "shell": f"echo $$ $(date +%s.%N) >> {stamp}; exec sleep infinity",
        "backoff_base": 0, "backoff_max": 0, "max_restarts": 100000, "restart_window": "1s"})

    def runs():
        try:
            with open(stamp) as f:
                return [line.split() for line in f if len(line.split()) == 2]
        except OSError:
            return []

    lat = []
    deadline = time.time() + 30
    while not runs():
        if time.time() > deadline:
            raise RuntimeError("the process never started")
        time.sleep(0.005)
    for _ in range(q["restarts"]):
        seen = runs()
        time.sleep(0.05)  # it runs a moment, as a crashing server would
        t_kill = time.time()
        os.kill(int(seen[-1][0]), signal.SIGKILL)
        while True:
            now = runs()
            if len(now) > len(seen):
                lat.append((float(now[-1][1]) - t_kill) * 1000)
                break
            if time.time() > t_kill + 10:
                raise RuntimeError("not restarted within 10 s")
            time.sleep(0.001)
    R["restart"] = {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                    "max_ms": max(lat)}
    log(f"  kill -9 -> running again: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms "
        f"(n={len(lat)}; backoff_base 0)")
    m.api.call("DELETE", f"/api/v1/processes/{p['id']}", expect=(202,))
    m.stop()


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def part_healthy(tmp, R, q):
    m = bf.Server(tmp, "healthy", {}, mode="up")
    m.start()
    m.setup()
    ours, bare = [], []
    for i in range(q["healthy"]):
        t0 = time.time()
        p = m.api.call("POST", "/api/v1/processes", {
            "name": f"web-{i}", "exec": ["python3", "-m", "http.server", "$PORT", "--bind",
                                         "127.0.0.1"], "ports": ["http"],
            "health": {"tcp": "http", "interval": "1s", "grace": "30s"}})
        while True:
            cur = m.api.call("GET", f"/api/v1/processes/{p['id']}")
            if cur["state"] == "healthy":
                ours.append((time.time() - t0) * 1000)
                break
            if time.time() > t0 + 30:
                raise RuntimeError(f"never healthy: {cur}")
            time.sleep(0.005)
        m.api.call("DELETE", f"/api/v1/processes/{p['id']}", expect=(202,))
        # The same server, bare: Popen and a connect every 5 ms.
        port = bj.free_port()
        t0 = time.time()
        proc = subprocess.Popen(["python3", "-m", "http.server", str(port), "--bind",
                                 "127.0.0.1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while not accepts(port):
            if time.time() > t0 + 30:
                raise RuntimeError("bare http.server never accepted")
            time.sleep(0.005)
        bare.append((time.time() - t0) * 1000)
        proc.kill()
        proc.wait()
    R["healthy"] = {"n": len(ours), "muster_p50_ms": pct(ours, 50),
                    "muster_p99_ms": pct(ours, 99), "popen_p50_ms": pct(bare, 50),
                    "popen_p99_ms": pct(bare, 99)}
    h = R["healthy"]
    log(f"  start -> healthy (python3 http.server): muster p50 {h['muster_p50_ms']:.0f} ms, "
        f"p99 {h['muster_p99_ms']:.0f} ms; Popen + poll p50 {h['popen_p50_ms']:.0f} ms, "
        f"p99 {h['popen_p99_ms']:.0f} ms (ratio p50 {h['muster_p50_ms'] / h['popen_p50_ms']:.2f})")
    m.stop()


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench procs")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", default="", help="comma list of idle,restart,healthy")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, bj._on_signal)
    bj.become_subreaper()
    q = (dict(idle=50, window_s=10, restarts=30, healthy=5) if a.quick
         else dict(idle=200, window_s=30, restarts=100, healthy=20))
    only = set(filter(None, a.only.split(",")))
    json_path = a.json or os.path.join(bj.ROOT, ".bench", "procs-results.json")
    tmp = tempfile.mkdtemp(prefix="muster-bench-procs-")
    R = {"quick": a.quick, "sizes": q, "muster": bj.MUSTER, "cores": os.cpu_count()}
    t_all = time.perf_counter()
    try:
        for name, fn, what in [
            ("idle", part_idle, f"{q['idle']} idle processes on one agent"),
            ("restart", part_restart, "kill -9 -> restarted, backoff_base 0"),
            ("healthy", part_healthy, "start -> healthy, next to Popen + poll"),
        ]:
            if only and name not in only:
                continue
            log(what)
            try:
                fn(tmp, R, q)
            except bj.Stop:
                raise
            except Exception as e:  # noqa: BLE001
                log(f"  {name} FAILED: {e}")
                R.setdefault("errors", []).append(f"{name}: {e}")
                bj.kill_all_descendants()
    finally:
        R["total_s"] = time.perf_counter() - t_all
        bj.kill_all_descendants()
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(R, f, indent=1)
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {R['total_s']:.0f} s; raw numbers in {json_path}")
    if R.get("errors"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
