"""docs/config.md is generated from the dataclasses and must not drift."""
from __future__ import annotations

import dataclasses
import sys

from conftest import REPO


def test_every_config_field_is_documented():
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.models.config_docs import FIELD_DOCS

    assert {f.name for f in dataclasses.fields(Qwen3MoeConfig)} == set(FIELD_DOCS)


def test_config_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "tools"))
    from gen_docs import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: run python tools/gen_docs.py"
