"""Shared pytest fixtures: quiet MindSpore, CPU device, a scratch cwd (paths and helpers: helpers.py)."""
from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings

from helpers import clear_kernel_caches

os.environ.setdefault("GLOG_v", "3")
# `pytest --hypothesis-profile fail-fast`: report the first failing example without shrinking
# (for checking that a property catches a deliberately broken implementation)
settings.register_profile("fail-fast", phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    """MindSpore may drop rank_*/ and rewritten_network/ into cwd: keep them out of the repo."""
    import mindspore as ms

    ms.set_device("CPU")
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture
def composite(monkeypatch):
    """Models built inside use the composite MindSpore path (QWEN3MOE_KERNELS=0)."""
    monkeypatch.setenv("QWEN3MOE_KERNELS", "0")
    clear_kernel_caches()
    yield
    monkeypatch.delenv("QWEN3MOE_KERNELS")
    clear_kernel_caches()
