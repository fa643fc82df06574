"""Celery against the broker: a real worker process (kombu + py-amqp, Celery's own AMQP stack)
consumes tasks from the default queue, and results come back through the rpc:// backend, so
both the task queue and the reply path run through the broker as a Celery deployment uses
them. The worker is a separate process, stopped with SIGTERM (Celery's warm shutdown)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import WAIT

APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("warren_celery_test", broker=os.environ["BROKER_URL"], backend="rpc://")
    app.conf.broker_connection_retry_on_startup = True
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 4

    @app.task
    def add(x, y):
        return x + y

    @app.task(bind=True, max_retries=3)
    def flaky(self, attempt_file):
        # Fails on the first run, succeeds on the retry: exercises requeue through the broker.
        if not os.path.exists(attempt_file):
            open(attempt_file, "w").close()
            raise self.retry(countdown=0)
        return "recovered"
    """
)


@pytest.fixture(scope="module")
def celery_app(broker, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("celery")
    url = f"amqp://{broker.user}:{broker.password}@{broker.host}:{broker.port}//"
    (tmp_path / "celery_tasks.py").write_text(APP)
    os.environ["BROKER_URL"] = url
    sys.path.insert(0, str(tmp_path))
    env = dict(os.environ, BROKER_URL=url, PYTHONPATH=str(tmp_path))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=solo",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    import celery_tasks

    try:
        yield celery_tasks, tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        celery_tasks.app.close()
        worker.send_signal(signal.SIGTERM)
        try:
            out, _ = worker.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
        assert "Traceback" not in out, out


def test_tasks_round_trip_through_a_worker(celery_app):
    tasks, _ = celery_app
    started = time.monotonic()
    results = [tasks.add.delay(i, i) for i in range(50)]
    assert [r.get(timeout=WAIT) for r in results] == [2 * i for i in range(50)]
    assert time.monotonic() - started < WAIT


def test_a_retried_task_is_redelivered_and_completes(celery_app):
    tasks, tmp = celery_app
    result = tasks.flaky.delay(str(tmp / "attempted"))
    assert result.get(timeout=WAIT) == "recovered"
