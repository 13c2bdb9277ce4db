#!/usr/bin/env python3
"""`scripts/bench api|nodes|redis`: the benchmark figures of the API (B4, login), the nodes and
agents (B5 discovery, log follow latency, B1 over 3 agents, agent RSS) and Redis mode (B1 next to
Celery 5 on the same redis-server, B4 on Redis).

Run through `scripts/bench api|nodes|redis [--quick]`, which builds muster, installs redis-server
and wrk if missing and makes the venv with Celery. Like `bench_jobs.py` (whose helpers this file
uses), it starts everything it measures on loopback (muster servers and agents, its own
redis-server on a free port, a Celery worker, wrk) and kills all of it on the way out, also on
errors and signals: it makes itself a child subreaper.
"""

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_jobs as bj  # noqa: E402
from bench_jobs import log, pct, rss_kb, ts  # noqa: E402

ROOT = bj.ROOT
MUSTER = bj.MUSTER
PASSWORD = bj.PASSWORD
UP_RE = re.compile(rb"muster is up at http://127\.0\.0\.1:(\d+)/")


# ---------------------------------------------------------------------------------------------
# Processes


class Server(bj.Muster):
    """`muster up` or `muster server` (optionally `--store URL`) on its own data dir."""

    def __init__(self, tmp, name, env=None, mode="up", store=None):
        super().__init__(tmp, name, env)
        self.mode = mode
        self.store = store

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        logf = open(self.logpath, "ab")
        argv = [MUSTER, self.mode, "--data-dir", self.data_dir, "--listen", "127.0.0.1:0"]
        if self.store:
            argv += ["--store", self.store]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, env=self.env)
        box, got = {}, threading.Event()

        def read():
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                m = UP_RE.search(line)
                if m and not got.is_set():
                    box["port"] = int(m.group(1))
                    got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(30):
            raise RuntimeError(f"muster {self.mode} did not come up; see {self.logpath}")
        self.port = box["port"]
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                ok = c.getresponse().status == 200
                c.close()
                if ok:
                    break
            except OSError:
                pass
            time.sleep(0.005)
        else:
            raise RuntimeError(f"muster {self.mode} never answered /readyz 200; see {self.logpath}")
        self.api = bj.Api(self.port, self.api.token if self.api else None)
        return (time.perf_counter() - t0) * 1000

    def setup(self):
        super().setup()
        self.t_ready = time.time()
        self.node_wait_ms = None
        if self.mode == "up":
            # The embedded agent joins over the agent protocol; in some builds /readyz answers
            # 200 before it has joined, and a tree submitted then fails with "no node has
            # joined the cluster". Wait for the node (and record how long that took).
            deadline = time.time() + 15
            while time.time() < deadline:
                if any(x["state"] == "ready" for x in nodes(self.api).values()):
                    self.node_wait_ms = (time.time() - self.t_ready) * 1000
                    return
                time.sleep(0.005)
            raise RuntimeError(f"the embedded agent never became ready; see {self.logpath}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def join_token(self, uses):
        return self.api.call("POST", "/api/v1/nodes/join-token", {"uses": uses})["token"]


class Agent:
    """One `muster agent` process: its own data dir and name."""

    def __init__(self, tmp, name, token, server=None, env=None, labels=()):
        self.name = name
        self.data_dir = os.path.join(tmp, "agent-" + name)
        self.logpath = os.path.join(tmp, "agent-" + name + ".log")
        self.argv = [MUSTER, "agent", "--join-token", token, "--data-dir", self.data_dir,
                     "--name", name]
        if server:
            self.argv += ["--server", server]
        for lb in labels:
            self.argv += ["--label", lb]
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.proc = None
        self.t_start = None
        self.t_running = None

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        logf = open(self.logpath, "ab")
        self.t_start = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=logf, env=self.env)

        def read():
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                if self.t_running is None and b" is running" in line:
                    self.t_running = time.time()

        threading.Thread(target=read, daemon=True).start()

    def wait_running(self, timeout=30):
        deadline = time.time() + timeout
        while self.t_running is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited; see {self.logpath}")
            if time.time() > deadline:
                raise RuntimeError(f"agent {self.name} not running after {timeout} s")
            time.sleep(0.005)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self):
        return self.proc.pid


def nodes(api):
    return {n["name"]: n for n in api.call("GET", "/api/v1/nodes")["items"]}


def wait_ready(api, names, timeout):
    """Polls GET /api/v1/nodes every 5 ms; returns {name: time first seen ready}."""
    seen = {}
    deadline = time.time() + timeout
    while len(seen) < len(names) and time.time() < deadline:
        now = time.time()
        for n, x in nodes(api).items():
            if n in names and n not in seen and x["state"] == "ready":
                seen[n] = now
        time.sleep(0.005)
    return seen


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_redis(tmp):
    port = bj.free_port()
    rdir = os.path.join(tmp, "redis")
    os.makedirs(rdir, exist_ok=True)
    proc = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
         "--bind", "127.0.0.1", "--dir", rdir, "--daemonize", "no"],
        stdout=open(os.path.join(tmp, "redis.log"), "ab"),
        stderr=subprocess.STDOUT,
        cwd=rdir,
    )
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


# ---------------------------------------------------------------------------------------------
# wrk


def _dur_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s.strip())
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[u]


def wrk(url, token, seconds, conns=64, threads=2):
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            "-H", f"Authorization: Bearer {token}", url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = {"conns": conns, "threads": threads, "seconds": seconds,
         "wrk_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    for p in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)
        r[f"p{p}_ms"] = _dur_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    r["socket_errors"] = m.group(1) if m else None
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["max_ms"] = _dur_ms(m.group(3))
    if r["rps"] is None:
        raise RuntimeError("wrk printed no result:\n" + out)
    return r


def fmt_wrk(r):
    s = f"{r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
    if r["non2xx"]:
        s += f", {r['non2xx']} non-2xx"
    if r["socket_errors"]:
        s += f", socket errors {r['socket_errors']}"
    return s


def a_job(srv, kind="noop"):
    """A finished one-child tree; returns the id of the child (a plain job row to GET)."""
    tid = srv.api.submit({"name": "b4", "children": [{"name": "c", kind: True}]})
    root = srv.api.wait_done(tid, 30)
    if root["state"] != "succeeded":
        raise RuntimeError(f"the B4 job tree ended {root['state']}: {root.get('error')}")
    return srv.api.tree(tid)["children"][0]["id"]


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# api: B4 and login


def part_api(tmp, R, q):
    secs = q["wrk_s"]
    srv = {}
    for key, env in (("off", {}), ("on", {"MUSTER_PERF__ENABLED": "true"})):
        s = Server(tmp, f"api-perf-{key}", env)
        s.start()
        s.setup()
        srv[key] = (s, a_job(s))
    runs = {"off": [], "on": []}
    try:
        # Alternate off/on so that a change of load on the machine hits both alike.
        for i in range(q["b4_rounds"]):
            for key in ("off", "on"):
                s, jid = srv[key]
                c0 = cpu_s(s.pid)
                r = wrk(f"{s.url}/api/v1/jobs/{jid}", s.api.token, secs)
                r["server_cpu_s"] = cpu_s(s.pid) - c0
                runs[key].append(r)
                log(f"  B4 perf logs {key}, round {i + 1}: {fmt_wrk(r)}; server CPU "
                    f"{r['server_cpu_s']:.1f} s, wrk {r['wrk_cpu_s']:.1f} s in {secs} s")
        s_on = srv["on"][0]
        perf_dir = os.path.join(s_on.data_dir, "perf", "logs")
        lines = 0
        for dp, _, fs in os.walk(perf_dir):
            for f in fs:
                with open(os.path.join(dp, f), "rb") as fh:
                    lines += sum(1 for _ in fh)
        R["b4_perf_lines"] = lines
        for key in ("off", "on"):
            rs = runs[key]
            R[f"b4_{key}"] = {
                "rps": statistics.median(r["rps"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "runs": rs,
            }
        # Ceiling of the HTTP stack on this machine: /healthz (no auth, no store), same server.
        s_off = srv["off"][0]
        c0 = cpu_s(s_off.pid)
        r = wrk(f"{s_off.url}/healthz", s_off.api.token, secs)
        r["server_cpu_s"] = cpu_s(s_off.pid) - c0
        R["healthz"] = r
        log(f"  /healthz (no auth, no store): {fmt_wrk(r)}; server CPU {r['server_cpu_s']:.1f} s")
        for key in ("off", "on"):
            rs = runs[key]
            R[f"b4_{key}_cpu_us_per_req"] = statistics.median(
                x["server_cpu_s"] / x["requests"] * 1e6 for x in rs)
        R["healthz_cpu_us_per_req"] = r["server_cpu_s"] / r["requests"] * 1e6
        log(f"  server CPU per request: jobs/{{id}} {R['b4_off_cpu_us_per_req']:.0f} us (perf on "
            f"{R['b4_on_cpu_us_per_req']:.0f} us), /healthz {R['healthz_cpu_us_per_req']:.0f} us")
        R["b4_perf_slowdown"] = 1 - R["b4_on"]["rps"] / R["b4_off"]["rps"]
        log(f"  perf logs on wrote {lines:,} lines; slowdown {R['b4_perf_slowdown'] * 100:.1f} %")
        srv["on"][0].stop()

        # Login: argon2id with the default parameters.
        s, jid = srv["off"]
        a = bj.Api(s.port)
        ms = []
        for _ in range(q["logins"]):
            t0 = time.perf_counter()
            a.call("POST", "/api/v1/login", {"username": "admin", "password": PASSWORD})
            ms.append((time.perf_counter() - t0) * 1000)
        R["login"] = {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
                      "max_ms": max(ms), "all_ms": ms}
        log(f"  login: p50 {pct(ms, 50):.1f} ms, max {max(ms):.1f} ms over {len(ms)}")

        # B4 while 10 logins/s run in the background (one client, a login every 100 ms).
        stop = threading.Event()
        bg = {"ok": 0, "bad": [], "ms": []}

        def logins():
            la = bj.Api(s.port)
            nxt = time.perf_counter()
            while not stop.is_set():
                t0 = time.perf_counter()
                st, data = la.raw("POST", "/api/v1/login",
                                  {"username": "admin", "password": PASSWORD})
                if st == 200:
                    bg["ok"] += 1
                    bg["ms"].append((time.perf_counter() - t0) * 1000)
                else:
                    bg["bad"].append(f"{st} {data[:200]!r}")
                nxt += 0.1
                time.sleep(max(0.0, nxt - time.perf_counter()))

        base, under = [], []
        for i in range(q["login_rounds"]):
            r = wrk(f"{s.url}/api/v1/jobs/{jid}", s.api.token, secs)
            base.append(r)
            log(f"  B4 quiet, round {i + 1}: {fmt_wrk(r)}")
            stop.clear()
            th = threading.Thread(target=logins, daemon=True)
            th.start()
            r = wrk(f"{s.url}/api/v1/jobs/{jid}", s.api.token, secs)
            stop.set()
            th.join()
            under.append(r)
            log(f"  B4 with 10 logins/s, round {i + 1}: {fmt_wrk(r)}; logins so far "
                f"{bg['ok']} ok, {len(bg['bad'])} refused")
        # Control: another process burns the same CPU as the logins (busy for one login's time,
        # 10 times a second), with no request to the server. If B4's p99 rises as much as with
        # the logins, it is the CPU the hashing takes on 2 cores, not requests stalled by it.
        busy_ms = R["login"]["p50_ms"]
        burner = subprocess.Popen([sys.executable, "-c", (
            "import time\n"
            "n = time.perf_counter()\n"
            "while True:\n"
            f"    e = time.perf_counter() + {busy_ms / 1000:.4f}\n"
            "    while time.perf_counter() < e: pass\n"
            "    n += 0.1\n"
            "    time.sleep(max(0.0, n - time.perf_counter()))\n")])
        try:
            ctl = wrk(f"{s.url}/api/v1/jobs/{jid}", s.api.token, secs)
        finally:
            burner.kill()
            burner.wait()
        log(f"  B4 while another process burns {busy_ms:.0f} ms of CPU 10 times a second: "
            f"{fmt_wrk(ctl)}")
        R["b4_burner"] = dict(ctl, busy_ms=busy_ms)
        R["b4_logins"] = {
            "quiet_rps": statistics.median(r["rps"] for r in base),
            "quiet_p99_ms": statistics.median(r["p99_ms"] for r in base),
            "rps": statistics.median(r["rps"] for r in under),
            "p99_ms": statistics.median(r["p99_ms"] for r in under),
            "logins_ok": bg["ok"],
            "logins_refused": bg["bad"][:5],
            "logins_refused_n": len(bg["bad"]),
            "login_ms_p50": pct(bg["ms"], 50) if bg["ms"] else None,
            "login_ms_p99": pct(bg["ms"], 99) if bg["ms"] else None,
            "quiet": base,
            "under": under,
        }
        if bg["bad"]:
            R["anomalies"].append(f"background POST /api/v1/login refused: {bg['bad'][:3]}")
        R["anomalies"] += s.api.anomalies
    finally:
        for s, _ in srv.values():
            s.stop()


# ---------------------------------------------------------------------------------------------
# nodes: B5 discovery, log follow, B1 over 3 agents, agent RSS


def part_discovery(tmp, R, q):
    n = q["agents"]
    interval_ms = q["interval_ms"]
    uport = free_udp_port()
    denv = {
        "MUSTER_DISCOVERY__ENABLED": "true",
        "MUSTER_DISCOVERY__PORT": str(uport),
        "MUSTER_DISCOVERY__BROADCAST": "127.255.255.255",
        "MUSTER_DISCOVERY__INTERVAL": f"{interval_ms}ms",
    }
    s = Server(tmp, "b5", denv, mode="server")
    s.start()
    s.setup()
    agents = []
    try:
        token = s.join_token(n + 5)
        # Let the server's beacon loop run once before the agents come.
        time.sleep(interval_ms / 1000)
        names = [f"b5-{i:02d}" for i in range(n)]
        agents = [Agent(tmp, nm, token, env=denv) for nm in names]
        t0 = time.time()
        for a in agents:
            a.start()
        t_spawned = time.time()
        ready = wait_ready(s.api, set(names), timeout=10 + interval_ms / 1000 * 5)
        lat = [(ready[a.name] - a.t_start) * 1000 for a in agents if a.name in ready]
        run_lat = [(a.t_running - a.t_start) * 1000 for a in agents if a.t_running]
        R["b5_ready"] = {
            "agents": n,
            "interval_ms": interval_ms,
            "udp_port": uport,
            "ready": len(ready),
            "spawn_all_ms": (t_spawned - t0) * 1000,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "all_ready_from_first_start_ms": (max(ready.values()) - t0) * 1000 if ready else None,
            "running_line_p50_ms": pct(run_lat, 50),
            "running_line_max_ms": max(run_lat) if run_lat else None,
            "target_ms": interval_ms + 200,
        }
        log(f"  B5: {len(ready)}/{n} ready; start->ready p50 {pct(lat, 50):.0f} ms, max "
            f"{max(lat):.0f} ms (target {interval_ms + 200} ms); spawning all took "
            f"{(t_spawned - t0) * 1000:.0f} ms")
        time.sleep(1.0)
        rss = [rss_kb(a.pid) / 1024 for a in agents[:10]]
        R["b5_agent_rss_mb"] = {"p50": statistics.median(rss), "max": max(rss)}
        R["b5_server_rss_mb"] = rss_kb(s.pid) / 1024

        # A killed agent: SIGKILL closes its connection at once (the kernel sends FIN/RST).
        downs = {}
        for sig, label in ((signal.SIGKILL, "kill"), (signal.SIGSTOP, "stop")):
            xs = []
            for k in range(q["down_tries"]):
                a = agents.pop()
                t_k = time.time()
                os.kill(a.pid, sig)
                seen = None
                deadline = t_k + interval_ms / 1000 * 6 + 2
                last_seen = None
                while time.time() < deadline:
                    x = nodes(s.api)[a.name]
                    if x["state"] != "ready":
                        now = time.time()
                        # last_seen: the server's record of the agent's last heartbeat.
                        ls = ts(x.get("last_seen"))
                        seen = (now - t_k) * 1000, x["state"], (now - ls) * 1000 if ls else None
                        break
                    time.sleep(0.005)
                if sig == signal.SIGSTOP:
                    os.kill(a.pid, signal.SIGKILL)
                    os.kill(a.pid, signal.SIGCONT)
                xs.append(seen)
            downs[label] = xs
            ok = [x[0] for x in xs if x]
            log(f"  B5 agent {label}: not ready after {[round(x) for x in ok]} ms (after the "
                f"last heartbeat: {[round(x[2]) for x in xs if x and x[2] is not None]} ms), "
                f"states {sorted({x[1] for x in xs if x})} (target {3 * interval_ms + 200} ms)")
        R["b5_down"] = {
            "kill_ms": [x[0] if x else None for x in downs["kill"]],
            "stop_ms": [x[0] if x else None for x in downs["stop"]],
            "stop_since_last_seen_ms": [x[2] if x else None for x in downs["stop"]],
            "states": sorted({x[1] for v in downs.values() for x in v if x}),
            "target_ms": 3 * interval_ms + 200,
        }
        R["anomalies"] += s.api.anomalies
    finally:
        for a in agents:
            a.stop()
        s.stop()


def part_follow(tmp, R, q):
    s = Server(tmp, "follow", {}, mode="server")
    s.start()
    s.setup()
    a = Agent(tmp, "remote", s.join_token(1), server=s.url)
    a.start()
    try:
        a.wait_running()
        wait_ready(s.api, {"remote"}, 10)
        lines = int(q["follow_s"] / 0.05)
        # Each line is the job's own clock when it prints (`date` runs in the job).
        script = f"for i in $(seq {lines}); do date +%s.%N; sleep 0.05; done"
        tid = s.api.submit({"name": "follow", "children": [
            {"name": "printer", "shell": script, "node": "remote"}]})
        cid = None
        for _ in range(200):
            kids = s.api.tree(tid).get("children") or []
            if kids:
                cid = kids[0]["id"]
                break
            time.sleep(0.005)
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        c.request("GET", f"/api/v1/jobs/{cid}/log?follow=true",
                  headers={"authorization": "Bearer " + s.api.token})
        r = c.getresponse()
        t_open = time.time()
        if r.status != 200:
            raise RuntimeError(f"GET /api/v1/jobs/{cid}/log?follow=true -> {r.status} "
                               f"{r.read()[:300]!r}")
        lat, backlog, other = [], 0, 0
        while True:
            line = r.readline()
            if not line:
                break
            now = time.time()
            m = re.match(rb"\S+ out (\d+\.\d+)", line)
            if not m:
                other += 1
                continue
            printed = float(m.group(1))
            if printed < t_open:
                backlog += 1  # printed before the follower was connected
                continue
            lat.append((now - printed) * 1000)
        c.close()
        job = s.api.call("GET", f"/api/v1/jobs/{cid}")
        # Which path the live log took: the agent's own TLS endpoint, or its connection.
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        c.request("GET", "/metrics", headers={"authorization": "Bearer " + s.api.token})
        metrics = c.getresponse().read().decode()
        c.close()
        via = {m.group(1): int(m.group(2)) for m in re.finditer(
            r'muster_remote_log_streams_total\{via="(\w+)"\} (\d+)', metrics)}
        R["follow"] = {
            "via": via,
            "lines_expected": lines,
            "lines_live": len(lat),
            "lines_backlog": backlog,
            "other_lines": other,
            "p50_ms": pct(lat, 50),
            "p90_ms": pct(lat, 90),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "job_state": job["state"],
            "job_node": job.get("node"),
        }
        log(f"  follow: {len(lat)} live lines from node {job.get('node')}: p50 "
            f"{pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms "
            f"(+{backlog} backlog); streams by path {via}")
        R["agent_idle_rss_mb"] = rss_kb(a.pid) / 1024
        R["anomalies"] += s.api.anomalies
    finally:
        a.stop()
        s.stop()


def part_agent_rss(tmp, R, q):
    s = Server(tmp, "rss", {}, mode="server")
    s.start()
    s.setup()
    token = s.join_token(3)
    xs = []
    try:
        for i in range(3):
            a = Agent(tmp, f"idle{i}", token, server=s.url)
            a.start()
            a.wait_running()
            time.sleep(1.0)
            xs.append((rss_kb(a.pid) / 1024, rss_kb(a.pid, "VmHWM") / 1024))
            a.stop()
        R["agent_rss"] = {"rss_mb": statistics.median(x[0] for x in xs),
                          "hwm_mb": statistics.median(x[1] for x in xs), "all": xs}
        log(f"  idle agent RSS {[round(x[0], 1) for x in xs]} MB (1 s after 'is running')")
    finally:
        s.stop()


def b1_runs(srv, q, R, key):
    out = {}
    bj.flat_run(srv, 500, {"noop": True}, "warmup", 60)
    res = [bj.flat_run(srv, q["n"], {"noop": True}, f"{key}-noop-{i}", 120)
           for i in range(q["runs"])]
    out["noop"] = sorted(res, key=lambda r: r["wall_s"])[len(res) // 2]
    out["noop"]["runs"] = [r["per_s"] for r in res]
    r = bj.flat_run(srv, q["exec_n"], {"exec": ["true"]}, f"{key}-exec", 300)
    out["exec"] = r
    log(f"  {key}: noop {', '.join(f'{x:,.0f}' for x in out['noop']['runs'])} jobs/s; "
        f"exec true {r['per_s']:,.0f} jobs/s ({r['n']:,} jobs)")
    R[key] = out


def spread(srv, tid):
    per = {}
    for j in srv.api.tree(tid).get("children") or []:
        per[j.get("node")] = per.get(j.get("node"), 0) + 1
    return per


def part_b1_agents(tmp, R, q):
    # The embedded figure, same sizes, same run.
    m = Server(tmp, "b1-embedded", {}, mode="up")
    m.start()
    m.setup()
    R["embedded_node_ready_after_setup_ms"] = m.node_wait_ms
    log(f"  embedded agent ready {m.node_wait_ms:.0f} ms after setup")
    try:
        b1_runs(m, q, R, "b1_embedded")
    finally:
        m.stop()
    s = Server(tmp, "b1-3agents", {}, mode="server")
    s.start()
    s.setup()
    token = s.join_token(3)
    agents = [Agent(tmp, f"w{i}", token, server=s.url) for i in range(3)]
    try:
        for a in agents:
            a.start()
        for a in agents:
            a.wait_running()
        wait_ready(s.api, {a.name for a in agents}, 10)
        b1_runs(s, q, R, "b1_3agents")
        # Where did the jobs go? One more small exec tree, then count by node.
        tid = s.api.submit({"name": "spread", "children": bj.children_spec(60, {"exec": ["true"]})})
        s.api.wait_done(tid, 60)
        R["b1_3agents"]["exec_spread"] = spread(s, tid)
        tid = s.api.submit({"name": "spread", "children": bj.children_spec(60, {"noop": True})})
        s.api.wait_done(tid, 60)
        R["b1_3agents"]["noop_spread"] = spread(s, tid)
        log(f"  3 agents: 60 exec jobs by node {R['b1_3agents']['exec_spread']}, 60 noop jobs "
            f"by node {R['b1_3agents']['noop_spread']}")
        R["anomalies"] += s.api.anomalies
    finally:
        for a in agents:
            a.stop()
        s.stop()


# ---------------------------------------------------------------------------------------------
# redis: B1 next to Celery on the same redis-server, B4 on Redis


def part_redis(tmp, R, q, redis_port):
    url = f"redis://127.0.0.1:{redis_port}"
    # Celery uses db 0 (broker), 1 (results), 2 (bench keys); muster gets db 3.
    s = Server(tmp, "redis-srv", {}, mode="server", store=f"{url}/3")
    s.start()
    s.setup()
    a = Agent(tmp, "r1", s.join_token(1), server=s.url)
    a.start()
    try:
        a.wait_running()
        wait_ready(s.api, {"r1"}, 10)
        bj.flat_run(s, 500, {"noop": True}, "warmup", 60)
        res = []
        for i in range(q["runs"]):
            c0 = (cpu_s(s.pid), cpu_s(redis_pid[0]))
            r = bj.flat_run(s, q["n"], {"noop": True}, f"redis-noop-{i}", 180)
            r["server_cpu_s"] = cpu_s(s.pid) - c0[0]
            r["redis_cpu_s"] = cpu_s(redis_pid[0]) - c0[1]
            res.append(r)
            log(f"  muster on redis: noop {r['per_s']:,.0f} jobs/s (submit {r['submit_s']:.2f} s, "
                f"server {r['server_s']:.2f} s, wall {r['wall_s']:.2f} s; CPU server "
                f"{r['server_cpu_s']:.1f} s, redis {r['redis_cpu_s']:.1f} s)")
        R["redis_b1"] = sorted(res, key=lambda r: r["wall_s"])[len(res) // 2]
        R["redis_b1"]["runs"] = [r["per_s"] for r in res]
        r = bj.flat_run(s, q["exec_n"], {"exec": ["true"]}, "redis-exec", 300)
        R["redis_b1_exec"] = r
        log(f"  muster on redis: exec true {r['per_s']:,.0f} jobs/s ({r['n']:,} jobs, one agent)")
        jid = a_job(s)
        import redis as redis_py

        rc = redis_py.Redis(host="127.0.0.1", port=redis_port)
        rs = []
        for i in range(q["b4_rounds"]):
            c0 = (cpu_s(s.pid), cpu_s(redis_pid[0]))
            k0 = redis_calls(rc)
            n0 = rc.info("stats")["total_connections_received"]
            r = wrk(f"{s.url}/api/v1/jobs/{jid}", s.api.token, q["wrk_s"])
            r["server_cpu_s"] = cpu_s(s.pid) - c0[0]
            r["redis_cpu_s"] = cpu_s(redis_pid[0]) - c0[1]
            k1 = redis_calls(rc)
            # Redis commands per request, by command (INFO commandstats before and after).
            r["redis_cmds_per_req"] = {c: round((k1[c] - k0.get(c, 0)) / r["requests"], 2)
                                       for c in k1 if k1[c] - k0.get(c, 0) > r["requests"] / 20}
            n1 = rc.info("stats")["total_connections_received"]
            r["redis_new_conns_per_req"] = round((n1 - n0) / r["requests"], 3)
            log(f"  redis commands per GET: {r['redis_cmds_per_req']}; new redis connections "
                f"per GET: {r['redis_new_conns_per_req']}")
            rs.append(r)
            log(f"  B4 on redis, round {i + 1}: {fmt_wrk(r)}; CPU server "
                f"{r['server_cpu_s']:.1f} s, redis {r['redis_cpu_s']:.1f} s, wrk "
                f"{r['wrk_cpu_s']:.1f} s")
        R["redis_b4"] = {"rps": statistics.median(r["rps"] for r in rs),
                         "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                         "p50_ms": statistics.median(r["p50_ms"] for r in rs), "runs": rs}
        R["anomalies"] += s.api.anomalies
    finally:
        a.stop()
        s.stop()

    # The same figure with the SQLite store (`muster up`), same run, for comparison.
    m = Server(tmp, "sqlite-b4", {}, mode="up")
    m.start()
    m.setup()
    try:
        jid = a_job(m)
        r = wrk(f"{m.url}/api/v1/jobs/{jid}", m.api.token, q["wrk_s"])
        R["sqlite_b4"] = r
        log(f"  B4 on SQLite (muster up), same run: {fmt_wrk(r)}")
    finally:
        m.stop()

    # Celery 5 on the same redis-server.
    from celery import group

    p = bj.Peer(tmp, url)
    p.start()
    t = p.t
    try:
        group(t.noop.s() for _ in range(50)).apply_async().get(timeout=60)
        p.purge()
        n = q["celery_n"]
        t0 = time.perf_counter()
        res = group(t.noop.s() for _ in range(n)).apply_async()
        t_sub = time.perf_counter()
        res.get(timeout=600)
        dt = time.perf_counter() - t0
        _keep.append(res)
        R["celery_noop"] = {"n": n, "wall_s": dt, "submit_s": t_sub - t0, "per_s": n / dt}
        log(f"  celery noop: {n / dt:,.0f} tasks/s ({dt:.2f} s, submit {t_sub - t0:.2f} s)")
        p.purge()
    finally:
        p.stop()


redis_pid = [None]
_keep = []  # Celery results: their __del__ talks to redis; let them live until os._exit


def redis_calls(rc):
    return {k[len("cmdstat_"):]: v["calls"] for k, v in rc.info("commandstats").items()}


# ---------------------------------------------------------------------------------------------
# Report


def table(rows):
    hdr = ("Figure", "Value", "Target", "Met")
    w = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(4)]
    print()
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(str(v).ljust(w[i]) for i, v in enumerate(r)) + " |")
    print()


def report(cmd, R):
    rows = []

    def row(name, value, target="", ok=None):
        rows.append((name, value, target, "" if ok is None else ("yes" if ok else "NO")))

    if "b4_off" in R:
        b, o = R["b4_off"], R["b4_on"]
        row("B4 GET /api/v1/jobs/{id}, 64 conns, perf logs off: req/s", f"{b['rps']:,.0f}",
            ">= 30,000", b["rps"] >= 30000)
        row("B4 perf logs off: p99 ms (p50)", f"{b['p99_ms']:.2f} ({b['p50_ms']:.2f})", "<= 10 ms",
            b["p99_ms"] <= 10)
        row("B4 perf logs on: req/s", f"{o['rps']:,.0f}", "", None)
        row("B4 perf logs on: p99 ms (p50)", f"{o['p99_ms']:.2f} ({o['p50_ms']:.2f})", "", None)
        if "healthz" in R:
            h = R["healthz"]
            row("GET /healthz (no auth, no store), same server: req/s, p99 ms",
                f"{h['rps']:,.0f}, {h['p99_ms']:.2f}", "(ceiling)", None)
            row("Server CPU per request, us: jobs/{id} off / on / healthz",
                f"{R['b4_off_cpu_us_per_req']:.0f} / {R['b4_on_cpu_us_per_req']:.0f} / "
                f"{R['healthz_cpu_us_per_req']:.0f}", "", None)
        sl = R["b4_perf_slowdown"]
        row("B4 perf logs on: slower by", f"{sl * 100:.1f} %", "<= 10 %", sl <= 0.10)
    if "login" in R:
        lg = R["login"]
        row(f"Login (argon2id default), p50 / max ms over {lg['n']}",
            f"{lg['p50_ms']:.1f} / {lg['max_ms']:.1f}", "<= 100 ms", lg["max_ms"] <= 100)
        b = R["b4_logins"]
        row("B4 quiet (same server, same rounds): req/s, p99 ms",
            f"{b['quiet_rps']:,.0f}, {b['quiet_p99_ms']:.2f}", "", None)
        row("B4 while 10 logins/s: req/s, p99 ms", f"{b['rps']:,.0f}, {b['p99_ms']:.2f}",
            "p99 unchanged", b["p99_ms"] <= b["quiet_p99_ms"] * 1.2)
        c = R.get("b4_burner")
        if c:
            row(f"Control: B4 while a process burns {c['busy_ms']:.0f} ms CPU 10x/s: req/s, p99",
                f"{c['rps']:,.0f}, {c['p99_ms']:.2f}", "", None)
        row("Background logins ok / refused; login p50 / p99 ms under load",
            f"{b['logins_ok']} / {b['logins_refused_n']}; "
            f"{b['login_ms_p50'] or 0:.1f} / {b['login_ms_p99'] or 0:.1f}", "", None)
    if "b5_ready" in R:
        b = R["b5_ready"]
        row(f"B5 {b['agents']} agents by discovery (interval {b['interval_ms']} ms): ready",
            f"{b['ready']}/{b['agents']}", "all", b["ready"] == b["agents"])
        row("B5 start -> ready, p50 / max ms", f"{b['p50_ms']:.0f} / {b['max_ms']:.0f}",
            f"<= {b['target_ms']} ms", b["max_ms"] <= b["target_ms"])
        d = R["b5_down"]
        k = [x for x in d["kill_ms"] if x is not None]
        st = [x for x in d["stop_ms"] if x is not None]
        row("B5 agent SIGKILL -> node down, ms", ", ".join(f"{x:.0f}" for x in k) or "never",
            f"<= {d['target_ms']} ms", bool(k) and max(k) <= d["target_ms"]
            and len(k) == len(d["kill_ms"]))
        row("B5 agent SIGSTOP (silent) -> node down, ms", ", ".join(f"{x:.0f}" for x in st)
            or "never", f"<= {d['target_ms']} ms", bool(st) and max(st) <= d["target_ms"]
            and len(st) == len(d["stop_ms"]))
    if "follow" in R:
        f = R["follow"]
        row(f"Log follow, remote agent ({'endpoint' if f['via'].get('endpoint') else 'relayed'}), "
            f"{f['lines_live']} lines: p50 / p99 / max ms",
            f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f} / {f['max_ms']:.1f}", "p99 <= 100 ms",
            f["p99_ms"] <= 100)
    if "b1_3agents" in R:
        e, g = R["b1_embedded"], R["b1_3agents"]
        row(f"B1 noop {g['noop']['n']:,} jobs: 3 agents / embedded, jobs/s",
            f"{g['noop']['per_s']:,.0f} / {e['noop']['per_s']:,.0f}", "(info)", None)
        row(f"B1 exec true {g['exec']['n']:,} jobs: 3 agents / embedded, jobs/s",
            f"{g['exec']['per_s']:,.0f} / {e['exec']['per_s']:,.0f}", "(info)", None)
    if "agent_rss" in R:
        b = R["agent_rss"]
        row("Idle RSS of one agent, MB (1 s after start)", f"{b['rss_mb']:.1f}", "<= 15 MB",
            b["rss_mb"] <= 15)
    if "redis_b1" in R:
        b = R["redis_b1"]
        c = R.get("celery_noop")
        rat = b["per_s"] / c["per_s"] if c else float("nan")
        row(f"Redis mode B1 noop {b['n']:,} jobs: muster jobs/s", f"{b['per_s']:,.0f}", "", None)
        if c:
            row(f"Celery 5 noop {c['n']:,} tasks, same redis-server: tasks/s",
                f"{c['per_s']:,.0f}", "", None)
        row("Redis mode B1 : Celery", f"{rat:.1f}x", ">= 10x", rat >= 10)
        b = R.get("redis_b1_exec")
        if b:
            row(f"Redis mode B1 exec true {b['n']:,} jobs, one agent: jobs/s",
                f"{b['per_s']:,.0f}", "(info)", None)
        b = R["redis_b4"]
        row("Redis mode B4, 64 conns: req/s, p99 ms (p50)",
            f"{b['rps']:,.0f}, {b['p99_ms']:.2f} ({b['p50_ms']:.2f})", "(info)", None)
        b = R.get("sqlite_b4")
        if b:
            row("SQLite B4, same run: req/s, p99 ms", f"{b['rps']:,.0f}, {b['p99_ms']:.2f}", "",
                None)
    table(rows)
    for e in R.get("errors", []):
        print("FAILED part: " + e)
    if R["anomalies"]:
        print("Unexpected server answers:")
        for a in R["anomalies"]:
            print("  " + a)


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench api|nodes|redis")
    ap.add_argument("cmd", choices=["api", "nodes", "redis"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", default="",
                    help="nodes: comma list of discovery,follow,b1,rss")
    ap.add_argument("--agents", type=int, default=None, help="nodes: how many agents for B5")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, bj._on_signal)
    bj.become_subreaper()
    if a.quick:
        q = dict(wrk_s=5, b4_rounds=1, logins=10, login_rounds=1, agents=20, interval_ms=500,
                 down_tries=2, follow_s=3, n=2000, runs=1, exec_n=500, celery_n=1000)
    else:
        q = dict(wrk_s=10, b4_rounds=2, logins=30, login_rounds=2, agents=50, interval_ms=500,
                 down_tries=5, follow_s=5, n=10000, runs=3, exec_n=2000, celery_n=10000)
    if a.agents:
        q["agents"] = a.agents
    only = set(filter(None, a.only.split(",")))
    want = lambda p: not only or p in only  # noqa: E731
    json_path = a.json or os.path.join(ROOT, ".bench", f"{a.cmd}-results.json")
    tmp = tempfile.mkdtemp(prefix=f"muster-bench-{a.cmd}-")
    R = {"anomalies": [], "quick": a.quick, "sizes": q, "muster": MUSTER,
         "cores": os.cpu_count()}
    t_all = time.perf_counter()
    try:
        def run(name, fn, *args):
            """One part; an error is reported and the next part still runs."""
            try:
                fn(tmp, R, q, *args)
            except bj.Stop:
                raise
            except Exception as e:  # noqa: BLE001
                log(f"  {name} FAILED: {e}")
                R.setdefault("errors", []).append(f"{name}: {e}")
                for p in bj.descendants():
                    if p != (redis_pid[0] or -1):
                        try:
                            os.kill(p, signal.SIGCONT)
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                bj.reap()

        if a.cmd == "api":
            log(f"B4 and login: wrk -t2 -c64 -d{q['wrk_s']}s on GET /api/v1/jobs/{{id}}")
            run("api", part_api)
        elif a.cmd == "nodes":
            if want("discovery"):
                log(f"B5: {q['agents']} agents find the server by its beacon")
                run("discovery", part_discovery)
            if want("follow"):
                log("log follow latency: a job on a remote agent, followed on the server")
                run("follow", part_follow)
            if want("rss"):
                log("idle RSS of one agent")
                run("rss", part_agent_rss)
            if want("b1"):
                log("B1 with the jobs spread over 3 agents, next to the embedded agent")
                run("b1", part_b1_agents)
        else:
            proc, port = start_redis(tmp)
            redis_pid[0] = proc.pid
            log(f"Redis mode: redis-server on 127.0.0.1:{port}; muster server + 1 agent, then "
                "Celery 5 (2 prefork workers) on the same redis-server")
            run("redis", part_redis, port)
    except bj.Stop as e:
        log(f"stopped by {e}")
        R["stopped"] = str(e)
        raise SystemExit(130)
    finally:
        R["total_s"] = time.perf_counter() - t_all
        # SIGCONT first: a SIGSTOPped agent would not die of SIGTERM.
        for p in bj.descendants():
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        bj.kill_all_descendants()
        left = bj.descendants()
        if left:
            log(f"WARNING: processes left: {left}")
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(R, f, indent=1)
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    report(a.cmd, R)
    log(f"done in {R['total_s']:.0f} s; raw numbers in {json_path}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    sys.stdout.flush()
    os._exit(0)
