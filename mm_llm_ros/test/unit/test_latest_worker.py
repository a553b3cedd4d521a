"""LatestWorker: freshest item only, rate limited, failures contained, prompt stop."""
import threading

import pytest

from mm_llm_ros.core.latest_worker import LatestWorker

WAIT_S = 10.0   # upper bound for the worker thread to react; tests finish as soon as it does


class Recorder:
    """A `handle` that records items, fails on 'bad', and signals each handled item."""

    def __init__(self):
        self.items = []
        self.handled = threading.Semaphore(0)

    def __call__(self, item):
        try:
            if item == 'bad':
                raise RuntimeError('broken item')
            self.items.append(item)
        finally:
            self.handled.release()

    def wait(self, count=1):
        for _ in range(count):
            assert self.handled.acquire(timeout=WAIT_S), 'the worker did not handle an item in time'


def test_only_the_freshest_item_is_handled_and_replaced_ones_count_as_dropped():
    recorder = Recorder()
    worker = LatestWorker('test', recorder, max_rate_hz=0)
    for item in range(3):
        worker.offer(item)
    assert worker.run_pending() is True
    assert worker.run_pending() is False   # nothing waiting any more
    assert recorder.items == [2]
    stats = worker.snapshot()
    assert (stats['received'], stats['dropped'], stats['runs']) == (3, 2, 1)


def test_counters_are_reported_with_the_stats():
    worker = LatestWorker('test', lambda item: None, max_rate_hz=0)
    worker.count('empty')
    worker.count('rejected_bad_data', 2)
    stats = worker.snapshot()
    assert stats['empty'] == 1 and stats['rejected_bad_data'] == 2 and stats['failures'] == 0


def test_the_thread_handles_offers_and_survives_a_failing_item(caplog):
    recorder = Recorder()
    worker = LatestWorker('test', recorder, max_rate_hz=0)
    worker.start()
    try:
        worker.offer('bad')
        recorder.wait()
        worker.offer('good')
        recorder.wait()
    finally:
        worker.stop()
    assert recorder.items == ['good']
    assert worker.failures == 1 and worker.snapshot()['runs'] == 2
    assert 'broken item' in caplog.text


def test_rate_limit_holds_the_next_item_and_stop_does_not_wait_for_it():
    recorder = Recorder()
    worker = LatestWorker('test', recorder, max_rate_hz=0.001)   # one item every 1000 s
    worker.start()
    worker.offer('first')
    recorder.wait()
    worker.offer('second')
    worker.stop(timeout_s=WAIT_S)
    assert not worker.running   # the rate-limit wait ends on stop
    assert recorder.items == ['first']
    assert worker.slot   # 'second' is still waiting: it was never handled early


def test_stop_of_an_idle_worker_returns():
    worker = LatestWorker('test', lambda item: None, max_rate_hz=1.0)
    worker.start()
    worker.stop(timeout_s=WAIT_S)
    assert not worker.running


@pytest.mark.parametrize('rate', [0.0, -1.0])
def test_zero_or_negative_rate_means_unlimited(rate):
    worker = LatestWorker('test', lambda item: None, max_rate_hz=rate)
    worker.offer(1)
    worker.run_pending()
    assert worker.limiter.ready()
