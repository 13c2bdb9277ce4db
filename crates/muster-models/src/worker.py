"""muster's model worker. muster writes this file into each Python environment; do not edit it.

Started by a muster pool as

    python -u muster_worker.py FD BUNDLE_DIR ENTRY_FILE CLASS

it imports ENTRY_FILE (relative to BUNDLE_DIR, which becomes the working directory and the head of
sys.path) once, makes one CLASS() and answers its execute(data) calls, one at a time, on the unix
socket at file descriptor FD. Every message is a frame: a 4-byte big-endian length, then that
many bytes.

    worker -> pool, once:  b"R" + JSON {"pid": N}            the model is loaded
                           b"F" + JSON {"type", "message"}   it failed to load (the worker exits)
    pool -> worker:        the JSON of `data`
    worker -> pool:        b"O" + the JSON of execute's result
                           b"E" + JSON {"type", "message"}   execute raised (traceback to stderr)

stdout and stderr go to the model's log. The worker ends when the socket closes.
"""

import importlib.util
import json
import math
import os
import socket
import struct
import sys
import traceback


def _jsonable(o):
    """What json.dumps calls for values it does not know: numpy and pandas without importing them."""
    if hasattr(o, "columns") and hasattr(o, "to_dict"):  # a DataFrame: columns as lists
        return {str(k): v for k, v in o.to_dict(orient="list").items()}
    for name in ("tolist", "to_list"):  # numpy arrays and scalars, pandas Series
        f = getattr(o, name, None)
        if callable(f):
            return f()
    item = getattr(o, "item", None)
    if callable(item):
        return item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", "replace")
    raise TypeError("%s is not JSON-able" % type(o).__name__)


def _finite(o):
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _dumps(result):
    try:
        return json.dumps(result, default=_jsonable, separators=(",", ":"), allow_nan=False)
    except ValueError:
        plain = json.loads(json.dumps(result, default=_jsonable))
        return json.dumps(_finite(plain), separators=(",", ":"), allow_nan=False)


def _error(e):
    message = str(e)
    if len(message) > 2000:
        message = message[:2000] + "..."
    return json.dumps({"type": type(e).__name__, "message": message}).encode()


def main():
    fd, bundle_dir, entry_file, class_name = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    sock = socket.socket(fileno=fd)
    rfile = sock.makefile("rb", buffering=1 << 16)

    def send(kind, payload):
        sock.sendall(struct.pack(">I", len(payload) + 1) + kind + payload)

    try:
        os.chdir(bundle_dir)
        sys.path.insert(0, bundle_dir)
        path = os.path.join(bundle_dir, entry_file)
        name = os.path.splitext(entry_file)[0].replace(os.sep, ".")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        cls = getattr(module, class_name, None)
        if cls is None:
            raise AttributeError("%s defines no %s" % (entry_file, class_name))
        execute = cls().execute
    except BaseException as e:
        traceback.print_exc()
        send(b"F", _error(e))
        sys.exit(1)
    send(b"R", json.dumps({"pid": os.getpid()}).encode())

    while True:
        head = rfile.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack(">I", head)
        body = rfile.read(n)
        if len(body) < n:
            return
        try:
            data = json.loads(body)
        except ValueError as e:
            send(b"E", _error(ValueError("the request is not JSON: %s" % e)))
            continue
        try:
            result = execute(data)
            out = _dumps(result).encode()
        except Exception as e:
            traceback.print_exc()
            sys.stderr.flush()
            send(b"E", _error(e))
            continue
        send(b"O", out)


if __name__ == "__main__":
    main()
