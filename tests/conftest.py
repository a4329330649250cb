"""Shared test setup: quiet MindSpore, CPU device, a scratch cwd, reference-data locations."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_v", "3")

REPO = Path(__file__).resolve().parent.parent
# shared/ sits beside the checkout (developer machines and CI); override with QWEN3MOE_SHARED
SHARED = Path(os.environ.get("QWEN3MOE_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURES = REPO / "tests" / "fixtures"
HF_FIXTURES = FIXTURES / "hf"


def reference_dir(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_dir():  # a missing cross-check is an error, never a silent skip
        raise FileNotFoundError(f"reference data {path} not found; set QWEN3MOE_SHARED to the shared/ folder")
    return path


def parity_dirs() -> list[Path]:
    """tiny-a (independent cross-check) plus every committed fixture with a reference npz."""
    dirs = [REFERENCE / "tiny-a"]
    if HF_FIXTURES.is_dir():
        dirs += sorted(p for p in HF_FIXTURES.iterdir() if (p / "ref_outputs.npz").is_file())
    return dirs


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    """MindSpore may drop rank_*/ and rewritten_network/ into cwd: keep them out of the repo."""
    import mindspore as ms

    ms.set_device("CPU")
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
