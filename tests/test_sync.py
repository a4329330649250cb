"""training/sync.py: graph outputs read on the low-priority helper thread equal asnumpy(), the
helper (only) runs at SCHED_IDLE, and errors reach the caller."""
from __future__ import annotations

import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.training import sync


@ms.jit
def _graph(x, y):
    return ops.matmul(x, y), (x * 2.0).sum()


def test_fetch_equals_asnumpy():
    r = np.random.default_rng(0)
    x, y = Tensor(r.standard_normal((64, 32)).astype(np.float32)), Tensor(r.standard_normal((32, 8)).astype(np.float32))
    out = _graph(x, y)
    got = sync.fetch(*out)
    ref = _graph(x, y)
    assert len(got) == 2
    np.testing.assert_array_equal(got[0], ref[0].asnumpy())
    np.testing.assert_array_equal(got[1], ref[1].asnumpy())


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no SCHED_IDLE on this platform")
def test_only_the_helper_thread_is_idle_priority():
    before = os.sched_getscheduler(0)
    sync.fetch(Tensor(np.ones(3, np.float32)))
    assert sync.policy_of_helper() == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before  # the caller keeps its policy


def test_errors_propagate_to_the_caller():
    with pytest.raises(AttributeError):
        sync.fetch(object())
