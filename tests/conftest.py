"""Shared pytest fixtures: quiet MindSpore, CPU device, a scratch cwd (paths and helpers: helpers.py)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    """MindSpore may drop rank_*/ and rewritten_network/ into cwd: keep them out of the repo."""
    import mindspore as ms

    ms.set_device("CPU")
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
