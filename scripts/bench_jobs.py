#!/usr/bin/env python3
"""`scripts/bench jobs`: muster's job manager next to Celery 5, in the same run.

Run through `scripts/bench jobs [--quick]`, which builds muster, installs redis-server if missing
and makes the venv with Celery. This file starts everything it measures (muster servers, its own
redis-server on a free loopback port, a Celery prefork worker) and kills all of it on the way out,
also on errors and signals: it makes itself a child subreaper, so even the supervisors muster
detaches (setsid) stay its descendants and are found and killed.
"""

import argparse
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUSTER = os.environ.get("MUSTER_BIN") or os.path.join(ROOT, "target", "release", "muster")
PASSWORD = "correct horse battery"
TERMINAL = ("succeeded", "failed", "aborted")

# ---------------------------------------------------------------------------------------------
# Process hygiene


class Stop(Exception):
    pass


def _on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


def become_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def descendants(root=None):
    """Every live process below `root` (default: this one), from /proc."""
    root = root or os.getpid()
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_all_descendants(grace=2.0):
    pids = descendants()
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline:
        reap()
        if not descendants():
            return
        time.sleep(0.05)
    for p in descendants():
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    reap()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def ts(s):
    """RFC 3339 UTC (milliseconds) to epoch seconds."""
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# muster


class Api:
    def __init__(self, port, token=None):
        self.port = port
        self.token = token
        self.conn = None
        self.anomalies = []

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        return self.conn

    def raw(self, method, path, body=None):
        headers = {}
        if self.token:
            headers["authorization"] = "Bearer " + self.token
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["content-type"] = "application/json"
        for attempt in range(2):
            try:
                c = self._conn()
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def call(self, method, path, body=None, expect=(200, 201)):
        st, data = self.raw(method, path, body)
        if st not in expect:
            req = body if isinstance(body, str) or body is None else json.dumps(body)[:300]
            msg = f"{method} {path} {req or ''} -> {st} {data[:500]!r}"
            self.anomalies.append(msg)
            raise RuntimeError(msg)
        return json.loads(data) if data else None

    def submit(self, spec):
        """POST a tree; returns its id. The answer lists every job: only its id is parsed."""
        st, data = self.raw("POST", "/api/v1/jobs", json.dumps(spec, separators=(",", ":")))
        if st != 201:
            msg = f"POST /api/v1/jobs ({spec.get('name')}) -> {st} {data[:500]!r}"
            self.anomalies.append(msg)
            raise RuntimeError(msg)
        m = re.match(rb'\{"id":"([0-9a-f-]{36})"', data)
        return m.group(1).decode() if m else json.loads(data)["id"]

    def wait_done(self, job_id, timeout, poll=0.002):
        deadline = time.time() + timeout
        while True:
            j = self.call("GET", f"/api/v1/jobs/{job_id}")
            if j["state"] in TERMINAL:
                return j
            if time.time() > deadline:
                raise RuntimeError(f"job {job_id} not done after {timeout} s: {j['state']}")
            time.sleep(poll)

    def tree(self, job_id):
        return self.call("GET", f"/api/v1/jobs/{job_id}/tree")


class Muster:
    """One `muster up` process on a data dir."""

    def __init__(self, tmp, name, env=None, data_dir=None):
        self.data_dir = data_dir or os.path.join(tmp, name)
        self.logpath = os.path.join(tmp, name + ".log")
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.proc = None
        self.port = None
        self.api = None

    def start(self):
        """Starts and waits for /readyz; returns (ms to the 'is up' line, ms to /readyz 200)."""
        os.makedirs(self.data_dir, exist_ok=True)
        logf = open(self.logpath, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [MUSTER, "up", "--data-dir", self.data_dir, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=logf,
            env=self.env,
        )
        port_box = {}
        got = threading.Event()

        def read():
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                m = re.search(rb"muster is up at http://127\.0\.0\.1:(\d+)/", line)
                if m and not got.is_set():
                    port_box["port"] = int(m.group(1))
                    port_box["t"] = time.perf_counter()
                    got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(30):
            raise RuntimeError(f"muster did not come up; see {self.logpath}")
        self.port = port_box["port"]
        up_ms = (port_box["t"] - t0) * 1000
        ready = None
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    ready = time.perf_counter()
                    c.close()
                    break
                c.close()
            except OSError:
                pass
            time.sleep(0.002)
        if ready is None:
            raise RuntimeError("muster never answered /readyz 200")
        self.api = Api(self.port, self.api.token if self.api else None)
        return up_ms, (ready - t0) * 1000

    def setup(self):
        with open(os.path.join(self.data_dir, "setup-code")) as f:
            code = f.read().strip()
        r = self.api.call(
            "POST",
            "/api/v1/setup",
            {"setup_code": code, "username": "admin", "password": PASSWORD},
        )
        self.api.token = r["token"]

    def stop(self, sig=signal.SIGTERM, wait=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Supervisors (their own sessions) and the jobs they run, left behind by this server.
        for p in descendants():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if self.data_dir.encode() in cmd:
                try:
                    os.killpg(os.getpgid(p), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        reap()

    @property
    def pid(self):
        return self.proc.pid


def children_spec(n, job, prefix="j"):
    return [dict(job, name=f"{prefix}{i}") for i in range(n)]


def machine_cpu_s():
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq).

    Throughput swings by a third between runs on these VMs; CPU per job is steadier, and it
    counts every process a job costs (server, agent, supervisor, the job), not only one."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def flat_run(m, n, job, label, timeout):
    """One tree: a grouping root with n children. Returns the numbers."""
    spec = {"name": label, "children": children_spec(n, job)}
    body = json.dumps(spec, separators=(",", ":"))
    c0 = machine_cpu_s()
    t0 = time.perf_counter()
    tid = m.api.submit(json.loads(body))
    t_sub = time.perf_counter()
    root = m.api.wait_done(tid, timeout)
    t1 = time.perf_counter()
    if root["state"] != "succeeded":
        raise RuntimeError(f"{label}: tree ended {root['state']}: {root.get('error')}")
    server_s = ts(root["finished_at"]) - ts(root["created_at"])
    wall = t1 - t0
    return {
        "n": n,
        "cpu_ms_per_job": (machine_cpu_s() - c0) / n * 1000,
        "wall_s": wall,
        "submit_s": t_sub - t0,
        "server_s": server_s,
        "per_s": n / wall,
        "us_per_job": wall / n * 1e6,
    }


def bare_spawn_loop(n):
    true = shutil.which("true")
    env = dict(os.environ)
    c0 = machine_cpu_s()
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(true, ["true"], env)
        os.waitpid(pid, 0)
    dt = time.perf_counter() - t0
    return {"n": n, "wall_s": dt, "per_s": n / dt, "us_per_job": dt / n * 1e6,
            "cpu_ms_per_job": (machine_cpu_s() - c0) / n * 1000}


def nested_spec(width, depth, leaf, inner, name="n"):
    def build(level, path):
        node = dict(inner) if level < depth else dict(leaf)
        node["name"] = f"{name}{path}" if path else name
        if level < depth:
            node["children"] = [build(level + 1, f"{path}-{i}") for i in range(width)]
        return node

    return build(0, "")


def walk(t):
    yield t
    for c in t.get("children", []):
        yield from walk(c)


def tree_latencies(tree):
    """parent.started_at - max(children.finished_at), in ms, for every inner job."""
    out = []
    for j in walk(tree):
        kids = j.get("children") or []
        if kids and j.get("started_at") and all(k.get("finished_at") for k in kids):
            out.append((ts(j["started_at"]) - max(ts(k["finished_at"]) for k in kids)) * 1000)
    return out


# ---------------------------------------------------------------------------------------------
# The parts


def part_b1_muster(tmp, R, q):
    n = q["n"]
    runs = q["runs"]
    m = Muster(tmp, "b1-16", {"MUSTER_AGENT__SLOTS": "16"})
    m.start()
    m.setup()
    try:
        flat_run(m, 500, {"noop": True}, "warmup", 60)
        res = [flat_run(m, n, {"noop": True}, f"b1-noop-{i}", 120) for i in range(runs)]
        log("  noop runs (jobs/s): " + ", ".join(f"{r['per_s']:.0f}" for r in res))
        R["b1_noop"] = sorted(res, key=lambda r: r["wall_s"])[len(res) // 2]
        R["b1_noop"]["runs"] = [r["per_s"] for r in res]
        res = [flat_run(m, n, {"exec": ["true"]}, f"b1-exec-{i}", 300)
               for i in range(q["exec_runs"])]
        log("  exec (16 slots) runs (jobs/s): " + ", ".join(f"{r['per_s']:.0f}" for r in res))
        R["b1_exec16"] = sorted(res, key=lambda r: r["wall_s"])[len(res) // 2]
        R["b1_exec16"]["runs"] = [r["per_s"] for r in res]
        R["anomalies"] += m.api.anomalies
    finally:
        m.stop()
    R["bare"] = bare_spawn_loop(q["bare"])
    log(f"  bare posix_spawn+waitpid loop: {R['bare']['per_s']:.0f}/s")
    m = Muster(tmp, "b1-default", {})
    m.start()
    m.setup()
    try:
        R["b1_exec_default"] = flat_run(m, n, {"exec": ["true"]}, "b1-exec-default", 300)
        log(f"  exec (default slots): {R['b1_exec_default']['per_s']:.0f}/s")
        R["anomalies"] += m.api.anomalies
    finally:
        m.stop()


def part_b2_b3_muster(tmp, R, q):
    m = Muster(tmp, "b23", {"MUSTER_AGENT__SLOTS": "16"})
    m.start()
    m.setup()
    try:
        for kind, inner in (("noop", {"noop": True}), ("group", {})):
            makespans, servers, lat = [], [], []
            for i in range(q["b2_runs"]):
                spec = nested_spec(10, 3, {"noop": True}, inner, name=f"b2{kind}{i}")
                t0 = time.perf_counter()
                tid = m.api.submit(spec)
                root = m.api.wait_done(tid, 30, poll=0.001)
                t1 = time.perf_counter()
                if root["state"] != "succeeded":
                    raise RuntimeError(f"B2 tree ended {root['state']}")
                makespans.append(t1 - t0)
                servers.append(ts(root["finished_at"]) - ts(root["created_at"]))
                tree = m.api.tree(tid)
                lat += tree_latencies(tree)
                n = sum(1 for _ in walk(tree))
                assert n == 1111, n
            R[f"b2_{kind}"] = {
                "makespan_s": statistics.median(makespans),
                "makespans": makespans,
                "server_s": statistics.median(servers),
                "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99),
                "max_ms": max(lat),
                "edges": len(lat),
            }
            log(
                f"  B2 ({kind} inner): makespan median {statistics.median(makespans)*1000:.1f} ms "
                f"(runs {', '.join(f'{x*1000:.0f}' for x in makespans)}), "
                f"parent-start p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms"
            )

        # B3: fail-fast. 16 slots: the failing job and 15 sleepers start, 5 sleepers wait.
        spec = {
            "name": "b3",
            "noop": True,
            "on_failure": "abort",
            "children": [{"name": "fail", "shell": "sleep 0.5; exit 1"}]
            + [{"name": f"s{i}", "shell": "sleep 30"} for i in range(20)],
        }
        tid = m.api.submit(spec)
        deadline = time.time() + 40
        tree_row = None
        while time.time() < deadline:
            items = m.api.call("GET", "/api/v1/jobs?limit=5")["items"]
            tree_row = next((t for t in items if t["id"] == tid), None)
            if tree_row and tree_row["state"] != "running":
                break
            time.sleep(0.001)
        t_seen = time.time()
        tree = m.api.tree(tid)
        root = tree
        jobs = list(walk(tree))
        fail = next(j for j in jobs if j["name"] == "fail")
        f_at = ts(fail["finished_at"])
        sibs = [j for j in jobs if j["name"].startswith("s")]
        states = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        started_after = [j for j in jobs if j.get("started_at") and ts(j["started_at"]) > f_at]
        sib_done = [ts(j["finished_at"]) for j in sibs if j.get("finished_at")]
        time.sleep(1.0)
        leftover = []
        for p in descendants():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"sleep\x0030" in f.read() or False:
                        leftover.append(p)
            except OSError:
                pass
        R["b3"] = {
            "root_state": root["state"],
            "tree_state": tree.get("tree_state"),
            "tree_state_row": tree_row["state"] if tree_row else None,
            "job_states": states,
            "sibs_started": sum(1 for j in sibs if j.get("started_at")),
            "all_sibs_aborted": all(j["state"] == "aborted" for j in sibs),
            "abort_ms": (max(sib_done) - f_at) * 1000 if sib_done else None,
            "tree_failed_ms": (ts(tree_row["finished_at"]) - f_at) * 1000
            if tree_row and tree_row.get("finished_at")
            else None,
            "root_finished_ms": (ts(root["finished_at"]) - f_at) * 1000
            if root.get("finished_at")
            else None,
            "seen_wall_ms": (t_seen - f_at) * 1000,
            "started_after": len(started_after),
            "sleep_procs_after_1s": len(leftover),
            "errors": sorted({str(j.get("error")) for j in sibs}),
        }
        log(f"  B3: {json.dumps(R['b3'])}")
        R["anomalies"] += m.api.anomalies
    finally:
        m.stop()


def part_footprint(tmp, R, q):
    rss, ready, up = [], [], []
    for i in range(3):
        m = Muster(tmp, f"idle{i}", {})
        u, r = m.start()
        up.append(u)
        ready.append(r)
        time.sleep(1.0)
        rss.append(rss_kb(m.pid) / 1024)
        m.stop()
    R["footprint"] = {
        "idle_rss_mb": statistics.median(rss),
        "idle_rss_all": rss,
        "ready_ms": statistics.median(ready),
        "ready_all": ready,
        "up_line_ms": statistics.median(up),
    }
    log(f"  idle RSS {rss} MB, start-to-ready {[round(x) for x in ready]} ms")


def part_scale(tmp, R, q):
    trees, per = q["scale_trees"], q["scale_per"]
    m = Muster(tmp, "scale", {"MUSTER_AGENT__SLOTS": "16"})
    m.start()
    m.setup()
    try:
        t0 = time.perf_counter()
        stored = 0
        budget = q["scale_budget_s"]
        for i in range(trees):
            app = "x" if i % 10 == 0 else f"app{i % 7}"
            spec = {
                "name": f"scale{i}",
                "tags": {"application": app},
                "children": children_spec(per, {"noop": True}),
            }
            tid = m.api.submit(spec)
            m.api.wait_done(tid, 300, poll=0.02)
            stored += per + 1
            if (i + 1) % max(1, trees // 5) == 0:
                R.setdefault("scale_rss_curve", []).append((stored, rss_kb(m.pid) / 1024))
                log(f"  {stored:,} jobs stored, server RSS {rss_kb(m.pid) / 1024:.0f} MB")
            if time.perf_counter() - t0 > budget:
                log(f"  store fill: stopping at {i + 1} trees (budget {budget} s)")
                break
        fill_s = time.perf_counter() - t0
        log(f"  stored {stored} jobs in {fill_s:.1f} s ({stored / fill_s:.0f} jobs/s)")
        time.sleep(1.0)
        lat = {}
        for label, path in (
            ("list", "/api/v1/jobs?limit=50"),
            ("list_app", "/api/v1/jobs?limit=50&application=x"),
        ):
            xs = []
            for _ in range(q["list_reqs"]):
                a = time.perf_counter()
                r = m.api.call("GET", path)
                xs.append((time.perf_counter() - a) * 1000)
            lat[label] = {"p50": pct(xs, 50), "p99": pct(xs, 99), "items": len(r["items"])}
        du = sum(
            os.path.getsize(os.path.join(dp, f))
            for dp, _, fs in os.walk(m.data_dir)
            for f in fs
            if os.path.isfile(os.path.join(dp, f))
        )
        R["scale"] = {
            "jobs": stored,
            "trees": stored // (per + 1),
            "fill_s": fill_s,
            "fill_per_s": stored / fill_s,
            "lat": lat,
            "rss_mb": rss_kb(m.pid) / 1024,
            "hwm_mb": rss_kb(m.pid, "VmHWM") / 1024,
            "data_mb": du / 1e6,
        }
        log(f"  scale: {json.dumps(R['scale'])}")

        # kill -9 with exec jobs in flight, then restart on the same data dir.
        n = q["crash_jobs"]
        spec = {"name": "crash", "children": children_spec(n, {"exec": ["true"]})}
        tid = m.api.submit(spec)
        time.sleep(q["crash_after_s"])
        t_kill = time.time()
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait()
        # The supervisors keep running (own sessions); only the server died.
        t_restart = time.time()
        up_ms, ready_ms = m.start()
        restart_rss = rss_kb(m.pid) / 1024
        # Done later from timestamps: first job that started after the restart.
        root = m.api.wait_done(tid, q["crash_budget_s"], poll=0.05)
        tree = m.api.tree(tid)
        jobs = list(walk(tree))
        starts = sorted(ts(j["started_at"]) for j in jobs if j.get("started_at"))
        new_starts = [s for s in starts if s >= t_restart]
        before = [s for s in starts if s < t_kill]
        states = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        errors = {}
        for j in jobs:
            if j.get("error"):
                errors[j["error"]] = errors.get(j["error"], 0) + 1
        R["crash"] = {
            "jobs": n,
            "started_before_kill": len(before),
            "restart_up_ms": up_ms,
            "restart_ready_ms": ready_ms,
            "first_new_start_ms": (new_starts[0] - t_restart) * 1000 if new_starts else None,
            "tree_state": root["state"],
            "job_states": states,
            "errors": errors,
            "stored_jobs": stored,
            "rss_at_ready_mb": restart_rss,
            "rss_after_mb": rss_kb(m.pid) / 1024,
        }
        log(f"  crash: {json.dumps(R['crash'])}")
        R["anomalies"] += m.api.anomalies
    finally:
        m.stop()


# ---------------------------------------------------------------------------------------------
# Celery


class Peer:
    def __init__(self, tmp, redis_url):
        self.tmp = tmp
        self.url = redis_url
        self.worker = None

    def start(self):
        env = dict(os.environ)
        env["BENCH_REDIS_URL"] = self.url
        env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        self.worker = subprocess.Popen(
            [celery, "-A", "bench_celery_tasks", "worker", "--concurrency", "2", "--pool",
             "prefork", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"bench{os.getpid()}@%h"],
            stdout=open(os.path.join(self.tmp, "celery.log"), "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp,
        )
        os.environ["BENCH_REDIS_URL"] = self.url
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_celery_tasks as t

        self.t = t
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError("the celery worker exited; see celery.log")
            if t.app.control.ping(timeout=0.5):
                return
        raise RuntimeError("the celery worker did not answer ping")

    def purge(self):
        self.t.app.control.purge()
        self.t._redis().delete("b3:started", "b3:failed_at")

    def stop(self):
        if self.worker and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        for p in descendants():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"bench_celery_tasks" in f.read():
                        os.kill(p, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        reap()


def part_celery(tmp, R, q, redis_url):
    from celery import chord, group

    p = Peer(tmp, redis_url)
    p.start()
    t = p.t
    try:
        group(t.noop.s() for _ in range(50)).apply_async().get(timeout=60)
        n = q["celery_n"]
        for key, task in (("c_noop", t.noop), ("c_exec", t.exec_true)):
            p.purge()
            c0 = machine_cpu_s()
            t0 = time.perf_counter()
            res = group(task.s() for _ in range(n)).apply_async()
            t_sub = time.perf_counter()
            res.get(timeout=600)
            dt = time.perf_counter() - t0
            R[key] = {"n": n, "wall_s": dt, "submit_s": t_sub - t0, "per_s": n / dt,
                      "us_per_job": dt / n * 1e6,
                      "cpu_ms_per_job": (machine_cpu_s() - c0) / n * 1000}
            log(f"  celery {key}: {n / dt:.0f} tasks/s ({dt:.2f} s, submit {t_sub - t0:.2f} s)")

        # B2: chord of chords, width 10, depth 3: 1,000 noop leaves, 111 collect bodies.
        spans = []
        for i in range(q["c_b2_runs"]):
            p.purge()
            c = chord(
                [
                    chord(
                        [chord([t.noop.s() for _ in range(10)], t.collect.s()) for _ in range(10)],
                        t.collect.s(),
                    )
                    for _ in range(10)
                ],
                t.collect.s(),
            )
            t0 = time.perf_counter()
            r = c.apply_async()
            v = r.get(timeout=120)
            spans.append(time.perf_counter() - t0)
            assert v == 10, v
        R["c_b2"] = {"makespan_s": statistics.median(spans), "makespans": spans}
        log(f"  celery B2 nested chord: {[round(x * 1000) for x in spans]} ms")

        # B3: a chord with 20 sleepers and one task raising after 0.5 s.
        p.purge()
        s = q["c_sleep"]
        c = chord([t.failer.s(0.5)] + [t.sleeper.s(s) for _ in range(20)], t.collect.s())
        t0 = time.time()
        r = c.apply_async()
        deadline = t0 + q["c_b3_budget_s"]
        reported = None
        while time.time() < deadline:
            if r.ready():
                reported = time.time()
                break
            time.sleep(0.01)
        rd = t._redis()
        failed_at = rd.get("b3:failed_at")
        failed_at = float(failed_at) if failed_at else None
        started = [float(x) for x in rd.lrange("b3:started", 0, -1)]
        R["c_b3"] = {
            "sleep_s": s,
            "failed_at_rel_s": failed_at - t0 if failed_at else None,
            "report_ms": (reported - failed_at) * 1000 if reported and failed_at else None,
            "reported": reported is not None,
            "budget_s": q["c_b3_budget_s"],
            "state": r.state,
            "sleepers_started": len(started),
            "started_after": sum(1 for x in started if failed_at and x > failed_at),
        }
        log(f"  celery B3: {json.dumps(R['c_b3'])}")
        p.purge()
    finally:
        p.stop()


# ---------------------------------------------------------------------------------------------
# Report


def ratio(a, b):
    return a / b if a and b else float("nan")


def report(R, q):
    rows = []

    def row(name, muster, peer, rat, target, ok):
        rows.append((name, muster, peer, rat, target, "yes" if ok else "NO"))

    def f(x, d=0):
        return "n/a" if x is None else f"{x:,.{d}f}"

    b = R.get("b1_noop")
    c = R.get("c_noop")
    if b:
        r = ratio(b["per_s"], c and c["per_s"])
        row(f"B1 noop, {b['n']:,} jobs: jobs/s", f(b["per_s"]), f(c and c["per_s"]),
            f"{r:.1f}x", ">= 20,000/s and >= 25x", b["per_s"] >= 20000 and r >= 25)
        row("B1 noop: us per job", f(b["us_per_job"], 1), f(c and c["us_per_job"], 1), "", "", True)
    b = R.get("b1_exec16")
    c = R.get("c_exec")
    bare = R.get("bare")
    if b:
        r = ratio(b["per_s"], c and c["per_s"])
        rb = ratio(b["per_s"], bare and bare["per_s"])
        row(f"B1 exec true, {b['n']:,} jobs, 16 slots: jobs/s", f(b["per_s"]),
            f(c and c["per_s"]), f"{r:.1f}x", ">= 2.5x Celery", r >= 2.5)
        row("B1 exec: us per job", f(b["us_per_job"], 1), f(c and c["us_per_job"], 1), "", "", True)
        row("B1 exec / bare posix_spawn loop", f"{rb:.2f}", "", f"bare {bare['per_s']:,.0f}/s",
            ">= 0.5", rb >= 0.5)
        row("B1 exec: machine CPU ms per job (bare loop in Ratio)", f(b["cpu_ms_per_job"], 2),
            f(c and c["cpu_ms_per_job"], 2), f"bare {bare['cpu_ms_per_job']:.2f}", "(info)", True)
    b = R.get("b1_exec_default")
    if b:
        r = ratio(b["per_s"], c and c["per_s"])
        row("B1 exec true, default slots (4): jobs/s", f(b["per_s"]), f(c and c["per_s"]),
            f"{r:.1f}x", "(info)", True)
    b = R.get("b2_noop")
    c = R.get("c_b2")
    if b:
        r = ratio(c and c["makespan_s"], b["makespan_s"])
        row("B2 tree 10x3 (1,111 noop jobs): makespan ms", f(b["makespan_s"] * 1000, 1),
            f(c and c["makespan_s"] * 1000, 1), f"{r:.1f}x faster", "<= 100 ms",
            b["makespan_s"] <= 0.1)
        row("B2 child-done -> parent-start p50 / p99 ms",
            f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}", "", "", "(ms timestamps)", True)
    b = R.get("b2_group")
    if b:
        row("B2 same, inner 111 as grouping jobs: makespan ms", f(b["makespan_s"] * 1000, 1),
            "", "", "<= 100 ms", b["makespan_s"] <= 0.1)
        row("B2 grouping: parent-resolve p50 / p99 ms", f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}",
            "", "", "", True)
    b = R.get("b3")
    c = R.get("c_b3")
    if b:
        worst = max(x for x in (b["abort_ms"], b["tree_failed_ms"]) if x is not None)
        row("B3 fail-fast: failure -> all aborted + tree failed, ms", f(worst, 0),
            (f(c["report_ms"], 0) if c and c["report_ms"] is not None
             else (f"> {c['budget_s']} s" if c else "n/a")),
            "", "<= 100 ms", worst <= 100)
        row("B3 jobs started after the failure", str(b["started_after"]),
            f"{c['started_after']} of 20" if c else "n/a", "", "0", b["started_after"] == 0)
    b = R.get("footprint")
    if b:
        row("Idle RSS MB", f(b["idle_rss_mb"], 1), "", "", "<= 40 MB", b["idle_rss_mb"] <= 40)
        row("Start to /readyz 200, ms", f(b["ready_ms"], 0), "", "", "<= 500 ms",
            b["ready_ms"] <= 500)
    b = R.get("scale")
    if b:
        for k, lbl in (("list", "?limit=50"), ("list_app", "?limit=50&application=x")):
            l = b["lat"][k]
            row(f"{b['jobs']:,} jobs stored: GET /api/v1/jobs{lbl} p99 ms (p50)",
                f"{l['p99']:.1f} ({l['p50']:.1f})", "", "", "<= 20 ms", l["p99"] <= 20)
        row(f"Server RSS with {b['jobs']:,} jobs stored, MB", f(b["rss_mb"], 1), "", "",
            "<= 100 MB", b["rss_mb"] <= 100)
    b = R.get("crash")
    if b:
        fs = b["first_new_start_ms"]
        row(f"kill -9, {b['jobs']:,} exec jobs in flight: restart to /readyz ms",
            f(b["restart_ready_ms"], 0), "", "", "<= 2,000 ms", b["restart_ready_ms"] <= 2000)
        row("kill -9: restart to first new job start ms", f(fs, 0), "", "", "<= 2,000 ms",
            fs is not None and fs <= 2000)

    w = [max(len(str(r[i])) for r in rows + [("Figure", "muster", "Celery 5", "Ratio",
                                                  "Target", "Met")]) for i in range(6)]
    hdr = ("Figure", "muster", "Celery 5", "Ratio", "Target", "Met")
    print()
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(str(v).ljust(w[i]) for i, v in enumerate(r)) + " |")
    print()
    if R["anomalies"]:
        print("Unexpected server answers:")
        for a in R["anomalies"]:
            print("  " + a)


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench jobs")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    ap.add_argument("--only", default="", help="comma list: b1,b23,celery,footprint,scale")
    ap.add_argument("--json", default=os.path.join(ROOT, ".bench", "jobs-results.json"))
    a = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    become_subreaper()
    if a.quick:
        q = dict(n=2000, runs=1, exec_runs=1, bare=500, b2_runs=3, celery_n=1000, c_b2_runs=1, c_sleep=2,
                 c_b3_budget_s=30, scale_trees=10, scale_per=10000, scale_budget_s=60,
                 list_reqs=200, crash_jobs=2000, crash_after_s=1.0, crash_budget_s=60)
    else:
        q = dict(n=10000, runs=3, exec_runs=1, bare=2000, b2_runs=5, celery_n=10000, c_b2_runs=3, c_sleep=5,
                 c_b3_budget_s=75, scale_trees=100, scale_per=10000, scale_budget_s=150,
                 list_reqs=200, crash_jobs=10000, crash_after_s=2.0, crash_budget_s=90)
    only = set(filter(None, a.only.split(",")))
    want = lambda p: not only or p in only  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="muster-bench-")
    R = {"anomalies": [], "quick": a.quick, "sizes": q}
    redis_proc = None
    t_all = time.perf_counter()
    try:
        if want("b1"):
            log("B1 muster: flat throughput")
            part_b1_muster(tmp, R, q)
        if want("b23"):
            log("B2/B3 muster: tree latency, fail-fast")
            part_b2_b3_muster(tmp, R, q)
        if want("footprint"):
            log("footprint: idle RSS, start to ready")
            part_footprint(tmp, R, q)
        if want("scale"):
            log("scale: store with many jobs, kill -9 and restart")
            part_scale(tmp, R, q)
        if want("celery"):
            port = free_port()
            rdir = os.path.join(tmp, "redis")
            os.makedirs(rdir)
            redis_proc = subprocess.Popen(
                ["/usr/bin/redis-server", "--port", str(port), "--save", "", "--appendonly",
                 "no", "--bind", "127.0.0.1", "--dir", rdir, "--daemonize", "no"],
                stdout=open(os.path.join(tmp, "redis.log"), "ab"),
                stderr=subprocess.STDOUT,
                cwd=rdir,
            )
            for _ in range(500):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.01)
            log(f"Celery 5 peer: redis-server on 127.0.0.1:{port}, 2 prefork workers")
            part_celery(tmp, R, q, f"redis://127.0.0.1:{port}")
    except Stop as e:
        log(f"stopped by {e}")
        R["stopped"] = str(e)
        raise SystemExit(130)
    finally:
        R["total_s"] = time.perf_counter() - t_all
        kill_all_descendants()
        left = descendants()
        if left:
            log(f"WARNING: processes left: {left}")
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(R, f, indent=1)
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    report(R, q)
    log(f"done in {R['total_s']:.0f} s; raw numbers in {a.json}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    sys.stdout.flush()
    # Skip interpreter teardown: Celery's AsyncResult.__del__ talks to redis, which is gone.
    os._exit(0)
