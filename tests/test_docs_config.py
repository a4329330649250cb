"""docs/config.md is generated from the dataclasses and must not drift."""
from __future__ import annotations

import dataclasses
import sys

from helpers import REPO


def test_every_config_field_is_documented():
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.models.config_docs import FIELD_DOCS

    assert {f.name for f in dataclasses.fields(Qwen3MoeConfig)} == set(FIELD_DOCS)


def test_config_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "tools"))
    from gen_docs import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: run python tools/gen_docs.py"


def _task_dataclasses():
    import dataclasses as dc

    from qwen3moe.training.task_config import TaskConfig

    seen, queue = [], [TaskConfig]
    while queue:
        cls = queue.pop(0)
        seen.append(cls)
        for f in dc.fields(cls):
            if f.default_factory is not dc.MISSING and dc.is_dataclass(f.default_factory()):
                queue.append(type(f.default_factory()))
    return seen


def test_every_task_config_key_is_documented():
    from qwen3moe.training.task_config_docs import TASK_FIELD_DOCS

    keys = {f"{cls.__name__}.{f.name}" for cls in _task_dataclasses() for f in dataclasses.fields(cls)}
    assert keys - set(TASK_FIELD_DOCS) == set(), "undocumented task-config keys"
    assert set(TASK_FIELD_DOCS) - keys == set(), "documented keys that no longer exist"
    assert all(v.strip() for v in TASK_FIELD_DOCS.values())


def test_task_config_reference_lists_every_yaml_path():
    sys.path.insert(0, str(REPO / "tools"))
    from gen_docs import config_reference

    text = config_reference()
    for path in ("`seed`", "`runner_config.batch_size`", "`train_dataset.data_loader.config.seq_length`",
                 "`parallel_config.expert_parallel`", "`recompute_config.recompute`", "`model.model_config`"):
        assert path in text, path
