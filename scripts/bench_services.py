#!/usr/bin/env python3
"""Services benchmarks (issue 15): the real `muster up` ($MUSTER_BIN, a release build) on loopback,
real git, real action processes.

- plan: a generated HQ of 1,000 services (10 node-like parent services standing in for 10 nodes,
  each with 10 databases under it, and 890 apps each consuming one database through interface
  `db`): POST /api/v1/services/plan, its round trip on loopback (an upper bound of the server's
  time: it includes storing the 1,000-step plan and its JSON answer), 5 times after the first
  (reported apart: the first plan at a new commit reads HQ's files from git, later ones at the
  same commit reuse that snapshot).
  The nodes are parent services, not real agents (one embedded node runs everything).
- apply: 100 independent services whose only action is `install` = `true`: POST apply -> the
  tree succeeded (polled every 10 ms), wall time. In the same run, Ansible (ansible-core from
  PyPI in a cached venv, .bench/ansible-venv) runs a playbook of 100 `command: true` tasks with
  `connection: local`; the ratio is printed.
Usage: bench_services.py [--quick]. Writes .bench/services-results.json.
"""
import json, os, shutil, statistics, subprocess, sys, tempfile, time, urllib.request

BIN = os.environ.get("MUSTER_BIN", "target/release/muster")
QUICK = "--quick" in sys.argv
PASSWORD = "correct horse battery"
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
procs = []


def git(cwd, *args):
    p = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"git {args}: {p.stderr}")
    return p.stdout.strip()


class Up:
    def __init__(self, tmp, name):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.p = subprocess.Popen([BIN, "up", "--listen", "127.0.0.1:0", "--data-dir", self.dir],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(self.p)
        for line in self.p.stdout:
            if line.startswith("muster is up at "):
                self.url = "/".join(line.split()[4].split("/")[:3])
                break
        code = open(os.path.join(self.dir, "setup-code")).read().strip()
        self.token = self.call("POST", "/api/v1/setup", {"setup_code": code, "username": "admin", "password": PASSWORD})["token"]
        self.hq = os.path.join(self.dir, "hq")
        deadline = time.time() + 60
        while not os.path.isdir(os.path.join(self.hq, ".git")):
            assert time.time() < deadline, "HQ never appeared"
            time.sleep(0.05)

    def call(self, method, path, body=None):
        # A POST without a body sends none (a route that reads no body would leave it unread
        # and the server's close would reset the connection under the answer).
        data = (None if method == "GET" else b"") if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if getattr(self, "token", None):
            req.add_header("authorization", "Bearer " + self.token)
        with urllib.request.urlopen(req, timeout=120) as r:
            t = r.read()
            return json.loads(t) if t[:1] in (b"{", b"[") else t.decode()

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def write(root, rel, text, exe=False):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, 0o755 if exe else 0o644)


def svc(domain, name, inst, extra=""):
    return f'domain = "{domain}"\nname = "{name}"\ninstance = "{inst}"\nversion = "1"\n{extra}'


TRUE = "#!/bin/sh\ntrue\n"


def bench_plan(tmp, runs):
    up = Up(tmp, "plan")
    write(up.hq, "interfaces/db.toml", 'description = "a database"\n[keys]\nhost = "string"\n')
    n = 0
    for i in range(10):
        node = f"bench__node__n{i:02d}"
        write(up.hq, f"services/{node}/service.toml", svc("bench", "node", f"n{i:02d}"))
        n += 1
        for j in range(10):
            d = f"d{i * 10 + j:03d}"
            write(up.hq, f"services/{node}/bench__db__{d}/service.toml",
                  svc("bench", "db", d, f'[params]\nport = {5000 + i * 10 + j}\n[provides.db]\ninterface = "db"\ndata = {{ host = "h{d}:${{params.port}}" }}\n'))
            write(up.hq, f"services/{node}/bench__db__{d}/actions/install", TRUE, True)
            n += 1
    for a in range(890):
        d = f"d{a % 100:03d}"
        write(up.hq, f"services/bench__app__a{a:03d}/service.toml",
              svc("bench", "app", f"a{a:03d}", f'[params]\nurl = "db://${{consumes.db.host}}/a{a}"\n[consumes.db]\ninterface = "db"\ninstance = "{d}"\n'))
        write(up.hq, f"services/bench__app__a{a:03d}/actions/install", TRUE, True)
        n += 1
    assert n == 1000
    git(up.hq, "add", "-A")
    git(up.hq, "commit", "-qm", "1,000 services")
    times = []
    for r in range(runs + 1):
        t0 = time.perf_counter()
        p = up.call("POST", "/api/v1/services/plan")
        dt = time.perf_counter() - t0
        assert len(p["steps"]) == 1000, len(p["steps"])
        if r > 0:
            times.append(dt * 1000)
        else:
            first = dt * 1000
    # A commit that changes one app's params: the planner reads only the changed blob from git.
    changed = []
    for r in range(runs):
        write(up.hq, "services/bench__app__a000/service.toml",
              svc("bench", "app", "a000", f'[params]\nurl = "db://${{consumes.db.host}}/a0-{r}"\n[consumes.db]\ninterface = "db"\ninstance = "d000"\n'))
        git(up.hq, "commit", "-qam", f"change {r}")
        t0 = time.perf_counter()
        p = up.call("POST", "/api/v1/services/plan")
        changed.append((time.perf_counter() - t0) * 1000)
        assert len(p["steps"]) == 1000, len(p["steps"])
    up.stop()
    return {"services": 1000, "first_ms": round(first, 1), "runs_ms": [round(t, 1) for t in times],
            "median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "one_changed_ms": [round(t, 1) for t in changed],
            "one_changed_median_ms": round(statistics.median(changed), 1)}


def bench_apply(tmp, count):
    up = Up(tmp, "apply")
    for i in range(count):
        write(up.hq, f"services/bench__t__s{i:03d}/service.toml", svc("bench", "t", f"s{i:03d}"))
        write(up.hq, f"services/bench__t__s{i:03d}/actions/install", TRUE, True)
    git(up.hq, "add", "-A")
    git(up.hq, "commit", "-qm", f"{count} services")
    p = up.call("POST", "/api/v1/services/plan")
    assert len(p["steps"]) == count
    t0 = time.perf_counter()
    a = up.call("POST", "/api/v1/services/apply", {"plan": p["id"]})
    tree = a["tree"]
    while True:
        t = up.call("GET", f"/api/v1/jobs/{tree}")
        if t.get("tree_state", t.get("state")) not in ("running", "pending", "waiting"):
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    state = t.get("tree_state", t.get("state"))
    up.stop()
    assert state == "succeeded", t
    return {"services": count, "wall_s": round(wall, 3)}


def ansible(count):
    venv = os.path.abspath(".bench/ansible-venv")
    exe = os.path.join(venv, "bin", "ansible-playbook")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "ansible-core"], check=True)
    d = tempfile.mkdtemp(prefix="muster-bench-ansible-")
    tasks = "".join(f"    - name: t{i}\n      command: \"true\"\n" for i in range(count))
    play = f"- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n{tasks}"
    with open(os.path.join(d, "play.yml"), "w") as f:
        f.write(play)
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write("localhost ansible_connection=local ansible_python_interpreter=" + sys.executable + "\n")
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0")
    t0 = time.perf_counter()
    subprocess.run([exe, "-i", os.path.join(d, "hosts"), os.path.join(d, "play.yml")], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    return {"tasks": count, "wall_s": round(wall, 3)}


def main():
    os.makedirs(".bench", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="muster-bench-services-")
    res = {"bin": BIN}
    try:
        res["plan"] = bench_plan(tmp, 2 if QUICK else 5)
        print(f"plan of 1,000 services: median {res['plan']['median_ms']} ms, min {res['plan']['min_ms']} ms "
              f"(round trip on loopback; target <= 100 ms server time); the first at a new commit "
              f"{res['plan']['first_ms']} ms (every file read from git); after a commit changing one file: "
              f"median {res['plan']['one_changed_median_ms']} ms", flush=True)
        res["apply"] = bench_apply(tmp, 100)
        print(f"apply of 100 services (install = true): {res['apply']['wall_s']} s wall (target <= 2 s)", flush=True)
        res["ansible"] = ansible(100)
        ratio = res["ansible"]["wall_s"] / res["apply"]["wall_s"]
        res["ratio"] = round(ratio, 2)
        print(f"ansible-playbook, 100 command: true tasks, connection local: {res['ansible']['wall_s']} s wall", flush=True)
        print(f"muster is {ratio:.2f}x faster than Ansible (target >= 5x)", flush=True)
        json.dump(res, open(".bench/services-results.json", "w"), indent=2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
