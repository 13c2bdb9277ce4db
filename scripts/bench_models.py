#!/usr/bin/env python3
"""`scripts/bench models`: B6 (issue 16) — model serving next to its peers, in the same run.

- b6: the iris LogisticRegression (scikit-learn, the bundle of muster-models' tests), 1 row per
  request, wrk at c=1 and c=32 after a warm-up, through muster's `POST
  /api/v1/models/{ws}/{model}/predict` (one replica, 2 workers), Flask + gunicorn `-w 2` (the
  same pickle) and MLServer + mlserver-sklearn (its own venv, the model trained there and saved
  with joblib): req/s, p50, p99 and the ratios; RSS of the muster server during the load, of
  the replica (predictor + workers) against gunicorn's (master + workers) and MLServer's.
- deploy: submit -> live for a cold deploy (new environment, wheel cache warm) and a warm one
  (same requirements: the environment reused), and a redeploy under wrk c=32: failed requests
  (must be 0) and the latency (p99, max) of that window.

Run through `scripts/bench models [--quick]` (which builds muster and installs wrk). It makes
`.bench/models-venv` (scikit-learn, flask, gunicorn) and `.bench/mlserver-venv` once, keeps
muster's wheel cache in `.bench/models-wheels`, and kills everything it started on the way out.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fleet as bf  # noqa: E402
import bench_jobs as bj  # noqa: E402
from bench_jobs import log, rss_kb  # noqa: E402

ROOT = bj.ROOT
IRIS = os.path.join(ROOT, "crates", "muster-models", "tests", "data", "iris")
SKLEARN = "scikit-learn==1.9.1"
ROW = [5.1, 3.5, 1.4, 0.2]
BENCH = os.path.join(ROOT, ".bench")


def venv(path, packages):
    """A venv at `path` with `packages` (made once)."""
    py = os.path.join(path, "bin", "python")
    mark = os.path.join(path, ".complete")
    if os.path.exists(mark):
        return py
    log(f"  making {path} ({', '.join(packages)})")
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *packages], check=True)
    open(mark, "w").close()
    return py


def tree_rss_kb(pid):
    """RSS of a process and all its descendants."""
    total = rss_kb(pid) or 0
    for p in bj.descendants(pid):
        total += rss_kb(p) or 0
    return total


def post_lua(path, body, token=None):
    lua = ["wrk.method = \"POST\"", f"wrk.body = {json.dumps(body)}",
           "wrk.headers[\"Content-Type\"] = \"application/json\""]
    if token:
        lua.append(f"wrk.headers[\"Authorization\"] = \"Bearer {token}\"")
    with open(path, "w") as f:
        f.write("\n".join(lua) + "\n")
    return path


def wrk(url, script, seconds, conns):
    threads = 1 if conns == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            "-s", script, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    r = {"conns": conns, "seconds": seconds}
    import re
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)
        r[f"p{p}_ms"] = bf._dur_ms(m.group(1)) if m else None
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    r["max_ms"] = bf._dur_ms(m.group(3)) if m else None
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    r["socket_errors"] = m.group(1) if m else None
    if r["rps"] is None:
        raise RuntimeError("wrk printed no result:\n" + out)
    return r


def fmt(r):
    s = f"{r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
    if r["non2xx"]:
        s += f", {r['non2xx']} non-2xx"
    if r["socket_errors"]:
        s += f", socket errors {r['socket_errors']}"
    return s


def measure(name, url, script, q, rss_of=None):
    """wrk at c=1 and c=32 after a warm-up; RSS sampled during the c=32 run."""
    out = {}
    wrk(url, script, q["warm_s"], 8)
    for c in (1, 32):
        box = {}
        if rss_of and c == 32:
            def sample():
                time.sleep(q["wrk_s"] / 2)
                box["rss"] = {k: round(f() / 1024, 1) for k, f in rss_of.items()}
            t = threading.Thread(target=sample)
            t.start()
        r = wrk(url, script, q["wrk_s"], c)
        if rss_of and c == 32:
            t.join()
            r["rss_mb"] = box.get("rss")
        out[f"c{c}"] = r
        log(f"  {name} c={c}: {fmt(r)}" + (f"; RSS {r['rss_mb']}" if r.get("rss_mb") else ""))
    return out


def wait_http(port, path="/", timeout=60, method="GET", body=None):
    import http.client
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request(method, path, body=body, headers={"content-type": "application/json"})
            st = c.getresponse().status
            c.close()
            if st < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def deploy(m, bundle, timeout=900, name="Iris"):
    """Uploads `bundle` (a directory) and waits for it to be live: (version, seconds)."""
    archive = bundle.rstrip("/") + ".tar.gz"
    subprocess.run(["tar", "czf", archive, "-C", bundle, "."], check=True)
    with open(archive, "rb") as f:
        data = f.read()
    import http.client
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", m.port, timeout=120)
    c.request("POST", f"/api/v1/models/admin/{name}", body=data,
              headers={"content-type": "application/gzip", "authorization": "Bearer " + m.api.token})
    r = c.getresponse()
    body = json.loads(r.read())
    if r.status != 202:
        raise RuntimeError(f"deploy -> {r.status} {body}")
    v = body["version"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        mm = m.api.call("GET", f"/api/v1/models/admin/{name}")
        st = next(x for x in mm["versions"] if x["version"] == v)
        if st["state"] == "live" and all(x["state"] != "draining" for x in mm["versions"]):
            t = m.api.call("GET", f"/api/v1/jobs/{body['tree']}/tree")
            if t["tree_state"] != "running":
                return v, time.perf_counter() - t0
        if st["state"] == "failed":
            raise RuntimeError(f"deploy v{v} failed: {st['error']}")
        time.sleep(0.05)
    raise RuntimeError(f"v{v} not live after {timeout} s")


def part_muster(tmp, R, q, py):
    bundle = os.path.join(tmp, "iris")
    os.makedirs(bundle)
    for f in ("bundle.json", "model.py"):
        shutil.copy(os.path.join(IRIS, f), bundle)
    subprocess.run([py, os.path.join(IRIS, "train.py"), os.path.join(bundle, "model.pkl")], check=True)
    envs = os.path.join(tmp, "envs")  # new every run: the first deploy builds its environment
    wheels = os.path.join(BENCH, "models-wheels")
    m = bf.Server(tmp, "muster", {
        "MUSTER_MODELS__ENVS_DIR": envs, "MUSTER_MODELS__WHEELS_DIR": wheels,
        "MUSTER_MODELS__PREDICTOR_HOST": "127.0.0.1"}, mode="up")
    m.start()
    m.setup()
    v, cold = deploy(m, bundle)
    log(f"  deploy v{v}, cold (a new environment, from the wheel cache): {cold:.1f} s")
    with open(os.path.join(bundle, "model.py"), "a") as f:
        f.write("\n# v2\n")
    v, warm = deploy(m, bundle)
    log(f"  deploy v{v}, warm (same requirements): {warm:.1f} s")
    R["deploy"] = {"cold_s": round(cold, 2), "warm_s": round(warm, 2)}
    script = post_lua(os.path.join(tmp, "muster.lua"), json.dumps({"data": [ROW]}), m.api.token)
    url = f"http://127.0.0.1:{m.port}/api/v1/models/admin/Iris/predict"
    mm = m.api.call("GET", "/api/v1/models/admin/Iris")
    live = next(x for x in mm["versions"] if x["state"] == "live")
    replica = m.api.call("GET", f"/api/v1/processes/{live['processes'][0]}")["pid"]
    R["b6"]["muster"] = measure("muster", url, script, q, rss_of={
        "server": lambda: rss_kb(m.pid) or 0, "replica": lambda: tree_rss_kb(replica)})
    # A redeploy under load: every request must succeed.
    with open(os.path.join(bundle, "model.py"), "a") as f:
        f.write("\n# v3\n")
    box = {}
    t = threading.Thread(target=lambda: box.update(r=wrk(url, script, q["redeploy_s"], 32)))
    t.start()
    time.sleep(2)
    v, took = deploy(m, bundle)
    t.join()
    r = box["r"]
    R["redeploy"] = {"version": v, "deploy_s": round(took, 2), **r}
    log(f"  redeploy v{v} under wrk c=32 ({took:.1f} s): {fmt(r)}, max {r['max_ms']:.0f} ms, "
        f"failed {r['non2xx']} (must be 0)")
    m.stop()


def part_flask(tmp, R, q, py):
    d = os.path.join(tmp, "flask")
    os.makedirs(d)
    pkl = os.path.join(d, "model.pkl")
    subprocess.run([py, os.path.join(IRIS, "train.py"), pkl], check=True)
    with open(os.path.join(d, "app.py"), "w") as f:
        f.write(f"""import pickle
import flask

with open({pkl!r}, "rb") as f:
    model = pickle.load(f)
app = flask.Flask(__name__)


@app.post("/predict")
def predict():
    return flask.jsonify(result=model.predict(flask.request.get_json()["data"]).tolist())
""")
    port = bj.free_port()
    gunicorn = os.path.join(os.path.dirname(py), "gunicorn")
    env = dict(os.environ, HOME=d)
    p = subprocess.Popen([gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "app:app"], cwd=d,
                         env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "ab"))
    wait_http(port, "/predict", method="POST", body=json.dumps({"data": [ROW]}))
    script = post_lua(os.path.join(tmp, "flask.lua"), json.dumps({"data": [ROW]}))
    R["b6"]["flask"] = measure("flask+gunicorn -w 2", f"http://127.0.0.1:{port}/predict", script, q,
                               rss_of={"all": lambda: tree_rss_kb(p.pid),
                                       "worker": lambda: rss_kb(bj.descendants(p.pid)[0]) or 0})
    p.terminate()
    p.wait(10)


def part_mlserver(tmp, R, q, py):
    d = os.path.join(tmp, "mlserver")
    model_dir = os.path.join(d, "iris")
    os.makedirs(model_dir)
    subprocess.run([py, "-c", "import joblib, sys\nfrom sklearn.datasets import load_iris\n"
                    "from sklearn.linear_model import LogisticRegression\n"
                    "X, y = load_iris(return_X_y=True)\n"
                    "joblib.dump(LogisticRegression(max_iter=1000).fit(X, y), sys.argv[1])",
                    os.path.join(model_dir, "model.joblib")], check=True)
    with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
        json.dump({"name": "iris", "implementation": "mlserver_sklearn.SKLearnModel",
                   "parameters": {"uri": "./model.joblib"}}, f)
    port = bj.free_port()
    with open(os.path.join(d, "settings.json"), "w") as f:
        json.dump({"http_port": port, "grpc_port": bj.free_port(),
                   "metrics_port": bj.free_port(), "debug": False}, f)
    mlserver = os.path.join(os.path.dirname(py), "mlserver")
    p = subprocess.Popen([mlserver, "start", d], cwd=d, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(d, "log"), "ab"))
    body = json.dumps({"inputs": [{"name": "predict", "shape": [1, 4], "datatype": "FP64",
                                   "data": ROW}]})
    wait_http(port, "/v2/models/iris/infer", timeout=120, method="POST", body=body)
    script = post_lua(os.path.join(tmp, "mlserver.lua"), body)
    R["b6"]["mlserver"] = measure("MLServer", f"http://127.0.0.1:{port}/v2/models/iris/infer",
                                  script, q, rss_of={"all": lambda: tree_rss_kb(p.pid)})
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()


ONNX_MAKE = """
import sys, numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from skl2onnx import to_onnx
X, y = load_iris(return_X_y=True)
lr = LogisticRegression(max_iter=1000).fit(X.astype(np.float32), y)
m = to_onnx(lr, X[:1].astype(np.float32), options={id(lr): {"zipmap": False}}, target_opset=15)
open(sys.argv[1], "wb").write(m.SerializeToString())
"""

PANDAS_SCORE = """
import pickle, sys, time
import pandas as pd
model = pickle.load(open(sys.argv[1], "rb"))
t0 = time.perf_counter()
df = pd.read_csv(sys.argv[2])
df["prediction"] = model.predict(df.values)
df.to_csv(sys.argv[3], index=False)
full = time.perf_counter() - t0
t0 = time.perf_counter()
first = True
with open(sys.argv[3], "w") as out:
    for chunk in pd.read_csv(sys.argv[2], chunksize=10000):
        chunk["prediction"] = model.predict(chunk.values)
        chunk.to_csv(out, index=False, header=first)
        first = False
print(full, time.perf_counter() - t0)
"""


def batch_run(m, name, csv_path, tmp):
    """A CSV through muster's batch route, end to end (upload -> result downloaded), with the
    server's RSS (with its embedded agent) sampled every 100 ms: (seconds, rows, max RSS MB)."""
    import http.client
    peak = {"kb": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            # `muster up`: the server and its embedded agent are this one process.
            peak["kb"] = max(peak["kb"], rss_kb(m.pid) or 0)
            time.sleep(0.1)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    size = os.path.getsize(csv_path)
    c = http.client.HTTPConnection("127.0.0.1", m.port, timeout=600)
    with open(csv_path, "rb") as f:
        c.request("POST", f"/api/v1/models/admin/{name}/batch", body=f,
                  headers={"content-type": "text/csv", "content-length": str(size),
                           "authorization": "Bearer " + m.api.token})
        r = c.getresponse()
        body = json.loads(r.read())
    if r.status != 202:
        raise RuntimeError(f"batch -> {r.status} {body}")
    tree = body["tree"]
    while True:
        tr = m.api.call("GET", f"/api/v1/jobs/{tree}/tree")
        if tr["tree_state"] != "running":
            break
        time.sleep(0.05)
    if tr["tree_state"] != "succeeded":
        raise RuntimeError(f"batch tree {tree} {tr['tree_state']}")
    c = http.client.HTTPConnection("127.0.0.1", m.port, timeout=600)
    c.request("GET", f"/api/v1/jobs/{tree}/result", headers={"authorization": "Bearer " + m.api.token})
    r = c.getresponse()
    rows = -1
    out = os.path.join(tmp, f"{name}-result.csv")
    with open(out, "wb") as f:
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            rows += b.count(b"\n")
            f.write(b)
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    return took, rows, round(peak["kb"] / 1024, 1)


def part_onnx(tmp, R, q, py):
    """B6 onnx and B7 batch: the iris LogisticRegression as ONNX (skl2onnx, ZipMap off) served
    natively, 1 row per request; then a 1M-row CSV through the ONNX and the Python model, and
    pandas on the same file."""
    bundle = os.path.join(tmp, "irisonnx")
    os.makedirs(bundle)
    subprocess.run([py, "-c", ONNX_MAKE, os.path.join(bundle, "model.onnx")], check=True)
    with open(os.path.join(bundle, "bundle.json"), "w") as f:
        json.dump({"name": "IrisOnnx", "runtime": "onnx", "model": "model.onnx", "workers": 2,
                   "example": {"data": [ROW]}}, f)
    pybundle = os.path.join(tmp, "irispy")
    os.makedirs(pybundle)
    for f in ("bundle.json", "model.py"):
        shutil.copy(os.path.join(IRIS, f), pybundle)
    subprocess.run([py, os.path.join(IRIS, "train.py"), os.path.join(pybundle, "model.pkl")], check=True)
    envs = os.path.join(BENCH, "models-envs-onnx")
    wheels = os.path.join(BENCH, "models-wheels")
    m = bf.Server(tmp, "muster-onnx", {
        "MUSTER_MODELS__ENVS_DIR": envs, "MUSTER_MODELS__WHEELS_DIR": wheels,
        "MUSTER_MODELS__PREDICTOR_HOST": "127.0.0.1"}, mode="up")
    m.start()
    m.setup()
    v, took = deploy(m, bundle, name="IrisOnnx")
    log(f"  deploy IrisOnnx v{v}: {took:.1f} s")
    script = post_lua(os.path.join(tmp, "onnx.lua"), json.dumps({"data": [ROW]}), m.api.token)
    url = f"http://127.0.0.1:{m.port}/api/v1/models/admin/IrisOnnx/predict"
    mm = m.api.call("GET", "/api/v1/models/admin/IrisOnnx")
    live = next(x for x in mm["versions"] if x["state"] == "live")
    proc = m.api.call("GET", f"/api/v1/processes/{live['processes'][0]}")
    R["b6"]["onnx"] = measure("muster onnx", url, script, q, rss_of={
        "server": lambda: rss_kb(m.pid) or 0, "replica": lambda: tree_rss_kb(proc["pid"])})
    # The predictor by itself (no server hop): its own per-call time.
    port = proc["ports"]["http"]
    direct = post_lua(os.path.join(tmp, "direct.lua"), json.dumps({"data": [ROW]}))
    R["b6"]["onnx_predictor_direct"] = measure("onnx predictor direct",
                                               f"http://127.0.0.1:{port}/predict", direct, q)
    # B7: 1M rows, 4 columns.
    v, took = deploy(m, pybundle, name="Iris")
    log(f"  deploy Iris (python) v{v}: {took:.1f} s")
    csv_path = os.path.join(tmp, "b7.csv")
    n = q["b7_rows"]
    import random
    rnd = random.Random(7)
    with open(csv_path, "w") as f:
        f.write("sepal_length,sepal_width,petal_length,petal_width\n")
        for _ in range(n):
            f.write(f"{rnd.uniform(4.3, 7.9):.1f},{rnd.uniform(2, 4.4):.1f},"
                    f"{rnd.uniform(1, 6.9):.1f},{rnd.uniform(0.1, 2.5):.1f}\n")
    mb = os.path.getsize(csv_path) / 1e6
    b7 = {"rows": n, "csv_mb": round(mb, 1)}
    for name in ("IrisOnnx", "Iris"):
        took, rows, rss = batch_run(m, name, csv_path, tmp)
        b7[name] = {"s": round(took, 2), "rows_per_s": round(n / took), "server_agent_rss_mb": rss,
                    "rows_back": rows}
        log(f"  B7 {name}: {n:,} rows ({mb:.0f} MB) end to end in {took:.1f} s = {n / took:,.0f} rows/s; "
            f"server+agent RSS max {rss} MB; {rows:,} rows back")
    out = subprocess.run([py, "-c", PANDAS_SCORE, os.path.join(pybundle, "model.pkl"), csv_path,
                          os.path.join(tmp, "pandas.csv")], check=True, capture_output=True, text=True)
    full, chunked = (float(x) for x in out.stdout.split())
    b7["pandas_full_s"], b7["pandas_10k_chunks_s"] = round(full, 2), round(chunked, 2)
    log(f"  B7 pandas: full frame {full:.1f} s ({n / full:,.0f} rows/s), 10k chunks {chunked:.1f} s "
        f"({n / chunked:,.0f} rows/s)")
    R["b7"] = b7
    m.stop()


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def report(R):
    b6 = R["b6"]
    if not {"muster", "flask"} <= b6.keys():
        return
    mu, fl = b6["muster"], b6["flask"]
    R["ratios"] = {
        "c32_rps_vs_flask": ratio(mu["c32"]["rps"], fl["c32"]["rps"]),
        "c32_p99_vs_flask": ratio(mu["c32"]["p99_ms"], fl["c32"]["p99_ms"]),
        "c1_rps_vs_flask": ratio(mu["c1"]["rps"], fl["c1"]["rps"]),
    }
    if "mlserver" in b6:
        ml = b6["mlserver"]
        R["ratios"]["c32_rps_vs_mlserver"] = ratio(mu["c32"]["rps"], ml["c32"]["rps"])
        R["ratios"]["c1_rps_vs_mlserver"] = ratio(mu["c1"]["rps"], ml["c1"]["rps"])
    log("")
    log("B6 (iris, 1 row per request)   c=1 req/s   p50    p99  |  c=32 req/s   p50    p99")
    for k, name in (("muster", "muster predict"), ("flask", "Flask + gunicorn -w 2"),
                    ("mlserver", "MLServer")):
        if k in b6:
            a, b = b6[k]["c1"], b6[k]["c32"]
            log(f"{name:30} {a['rps']:>10,.0f} {a['p50_ms']:6.2f} {a['p99_ms']:6.2f} | "
                f"{b['rps']:>10,.0f} {b['p50_ms']:6.2f} {b['p99_ms']:6.2f}")
    if "onnx" in b6:
        on = b6["onnx"]
        R["ratios"]["onnx_c32_rps_vs_flask"] = ratio(on["c32"]["rps"], fl["c32"]["rps"])
        for k, name in (("onnx", "muster predict (onnx)"), ("onnx_predictor_direct", "onnx predictor alone")):
            if k in b6:
                a, b = b6[k]["c1"], b6[k]["c32"]
                log(f"{name:30} {a['rps']:>10,.0f} {a['p50_ms']:6.2f} {a['p99_ms']:6.2f} | "
                    f"{b['rps']:>10,.0f} {b['p50_ms']:6.2f} {b['p99_ms']:6.2f}")
    log(f"ratios: {R['ratios']}")


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench models")
    ap.add_argument("--quick", action="store_true", help="shorter wrk runs")
    ap.add_argument("--only", default="", help="comma list of muster,flask,mlserver,onnx")
    ap.add_argument("--json", default=os.path.join(BENCH, "models-results.json"))
    a = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, bj._on_signal)
    bj.become_subreaper()
    q = dict(warm_s=2, wrk_s=5, redeploy_s=20, b7_rows=200_000) if a.quick else \
        dict(warm_s=3, wrk_s=15, redeploy_s=30, b7_rows=1_000_000)
    only = set(filter(None, a.only.split(",")))
    os.makedirs(BENCH, exist_ok=True)
    py = venv(os.path.join(BENCH, "models-venv"), [SKLEARN, "flask", "gunicorn"])
    opy = venv(os.path.join(BENCH, "onnx-venv"), [SKLEARN, "skl2onnx==1.20.0", "pandas"])
    tmp = tempfile.mkdtemp(prefix="muster-bench-models-")
    R = {"quick": a.quick, "sizes": q, "muster": bj.MUSTER, "cores": os.cpu_count(),
         "loadavg_before": bj.loadavg(), "b6": {}}
    t_all = time.perf_counter()
    try:
        for name, fn in (("muster", part_muster), ("onnx", part_onnx), ("flask", part_flask),
                         ("mlserver", part_mlserver)):
            if only and name not in only:
                continue
            log(name)
            try:
                if name == "mlserver":
                    mpy = venv(os.path.join(BENCH, "mlserver-venv"),
                               ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"])
                    fn(tmp, R, q, mpy)
                elif name == "onnx":
                    fn(tmp, R, q, opy)
                else:
                    fn(tmp, R, q, py)
            except bj.Stop:
                raise
            except Exception as e:  # noqa: BLE001
                log(f"  {name} FAILED: {e}")
                R.setdefault("errors", []).append(f"{name}: {e}")
                bj.kill_all_descendants()
        report(R)
    finally:
        R["total_s"] = round(time.perf_counter() - t_all, 1)
        R["loadavg_after"] = bj.loadavg()
        bj.kill_all_descendants()
        with open(a.json, "w") as f:
            json.dump(R, f, indent=2)
        log(f"results in {a.json}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
