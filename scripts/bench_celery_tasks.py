"""Celery 5 peer for `scripts/bench jobs`: the tasks the benchmark runs on a 2-process prefork worker.

The broker and result backend are the benchmark's own redis-server (BENCH_REDIS_URL); never the
machine's redis on 6379.
"""

import os
import subprocess
import time

import redis
from celery import Celery

URL = os.environ["BENCH_REDIS_URL"]  # redis://127.0.0.1:PORT

app = Celery("bench_celery_tasks", broker=URL + "/0", backend=URL + "/1")
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
)

_r = None


def _redis():
    global _r
    if _r is None:
        _r = redis.Redis.from_url(URL + "/2")
    return _r


@app.task
def noop():
    return None


@app.task
def exec_true():
    subprocess.run(["true"], check=True)
    return None


@app.task
def collect(results):
    """A chord body: the 'parent' that runs when its header is done."""
    return len(results)


@app.task
def sleeper(seconds):
    _redis().rpush("b3:started", repr(time.time()))
    time.sleep(seconds)
    return 1


@app.task
def failer(seconds):
    time.sleep(seconds)
    _redis().set("b3:failed_at", repr(time.time()))
    raise RuntimeError("fail-fast benchmark: this task fails on purpose")
