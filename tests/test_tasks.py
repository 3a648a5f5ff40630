"""pipeline.tasks: the dashboard's background tasks (start, progress, results, failures, stop)."""

from __future__ import annotations

import threading

import pytest

from geohier.errors import GeohierError, InputError
from pipeline import tasks


def test_a_task_reports_progress_and_its_result():
    runner = tasks.TaskRunner()
    go = threading.Event()

    def body(task, n):
        task.progress(1, n)
        go.wait(30)
        task.progress(n, n)
        return f"{n} things"

    t = runner.start("ws:demo", "demo", body, 4)
    assert t.thread.name == "geohier-demo" and t.running
    # a second start while it runs is the same task
    assert runner.start("ws:demo", "demo", body, 9) is t
    assert runner.recent("ws:") == [t] and runner.recent("other:") == []
    go.set()
    assert t.join(30)
    assert (t.state, t.result, t.fraction, t.label()) == ("done", "4 things", 1.0, "demo: 4 / 4")
    # once it ended, a start starts anew
    again = runner.start("ws:demo", "demo", lambda task: "again")
    assert again is not t and again.join(30) and again.result == "again"


def test_failures_end_the_task_with_a_message():
    runner = tasks.TaskRunner()

    def refused(task):
        raise InputError("images must be between 1 and 2,000,000, got 0")

    def bug(task):
        return {}["missing"]

    a = runner.start("ws:a", "demo", refused)
    b = runner.start("ws:b", "demo", bug)
    assert a.join(30) and b.join(30)
    assert (a.state, a.error) == ("failed", "images must be between 1 and 2,000,000, got 0")
    assert b.state == "failed" and b.error == "KeyError: 'missing'"
    assert tasks.Task("fetch").label() == "fetch: starting ..."  # before the first progress


def test_a_cancelled_task_ends_stopped():
    runner = tasks.TaskRunner()

    def body(task):
        assert task.stop.wait(30)
        return "stopped early"

    t = runner.start("ws:fetch", "fetch", body)
    t.cancel()
    assert t.join(30) and t.state == "stopped" and t.result == "stopped early"


@pytest.mark.slow
def test_demo_task_builds_the_workspace(ws):
    t = tasks.start_demo(tasks.TaskRunner(), ws, 5, 1)
    assert t.join(120), t
    assert t.state == "done", t.error
    assert t.result == "demo world: 5 images added, 0 already there" and (t.done, t.total) == (5, 5)
    with ws.manifest() as m:
        assert m.count() == 5


def test_fetch_options_are_checked_before_a_thread_starts(ws, monkeypatch):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    runner = tasks.TaskRunner()
    with pytest.raises(GeohierError):
        tasks.start_fetch(runner, ws, "land", 8, 10, "https://graph.mapillary.com", token="")
    with pytest.raises(GeohierError):
        tasks.start_fetch(runner, ws, "not-a-cell", 8, 10, "https://graph.mapillary.com", token="MLY|1|x")
    assert runner.get(tasks.task_key(ws, "fetch")) is None
