"""GPTDataset goldens from megatron-core 0.16.1 (needs `pip install megatron-core==0.16.1 pybind11`
in .venv-ref):

    .venv-ref/bin/python tools/make_gpt_golden.py     # writes tests/fixtures/megatron_gpt/

Builds two small Megatron datasets with megatron-core's own IndexedDatasetBuilder (random docs
with EOD), then dumps GPTDataset / BlendedDataset lengths, index arrays and every sample for:
single prefix over several epochs (separate final epoch), a 0.3/0.7 blend, and
reset_position_ids + eod_mask_loss + attention mask with pad == eod (the seed's setting).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import megatron.core
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "megatron_gpt"
EOD = 1023


class Tok:  # the two attributes GPTDataset reads from a MegatronTokenizer
    def __init__(self, eod: int, pad: int) -> None:
        self.eod, self.pad, self.vocab_size = eod, pad, 1024
        self.unique_identifiers = {"class": "Tok", "eod": eod, "pad": pad}


def write_dataset(prefix: Path, seed: int, n_docs: int, dtype) -> None:
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for _ in range(n_docs):
        n = int(rng.integers(0, 30))
        doc = np.concatenate([rng.integers(0, 1000, n), [EOD]]) if n else np.array([], np.int64)
        import torch

        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)] if len(doc) else [])
    b.finalize(str(prefix) + ".idx")


def build(blend, n: int, seq: int, split: str = "1,0,0", **kw):
    flags = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                 create_attention_mask=False)
    flags.update(kw)
    pad = flags.pop("pad", -1)
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=blend, split=split,
                           tokenizer=Tok(EOD, pad), path_to_cache=tempfile.mkdtemp(), **flags)
    sizes = [n, None, None] if blend[1] is None else [n, 0, 0]  # weighted blends need every split sized
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()[0]


def dump(name: str, ds, arrays: dict, meta: dict) -> None:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    items = [ds[i] for i in range(len(ds))]
    for k in keys:
        arrays[f"{name}.{k}"] = np.stack([it[k].numpy() for it in items])
    if "attention_mask" in items[0]:
        arrays[f"{name}.attention_mask"] = np.stack([it["attention_mask"].numpy() for it in items])
    inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
    for k in ("document_index", "sample_index", "shuffle_index"):
        arrays[f"{name}.{k}"] = np.asarray(inner.__dict__[k])
    if hasattr(ds, "dataset_index"):
        arrays[f"{name}.dataset_index"] = np.asarray(ds.dataset_index)
        arrays[f"{name}.dataset_sample_index"] = np.asarray(ds.dataset_sample_index)
    meta[name]["len"] = len(ds)


def main() -> None:
    import socket

    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # BlendedDataset asks for the rank when caching: a one-process gloo group on loopback
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    OUT.mkdir(parents=True, exist_ok=True)
    write_dataset(OUT / "golden_a_text_document", 1, 40, np.uint16)
    write_dataset(OUT / "golden_b_text_document", 2, 25, np.int32)
    a, b = str(OUT / "golden_a_text_document"), str(OUT / "golden_b_text_document")
    cases = {
        "single": dict(blend=([a], None), n=120, seq=16),
        "single_w1": dict(blend=([a], [1.0]), n=50, seq=24),
        "split": dict(blend=([a], None), n=30, seq=16, split="8,1,1"),
        "blend": dict(blend=([a, b], [0.3, 0.7]), n=60, seq=16),
        "reset": dict(blend=([a], None), n=20, seq=32, reset_position_ids=True, eod_mask_loss=True,
                      create_attention_mask=True, pad=EOD),
        # three weights whose second normalisation (BlendedDataset) moves the last ulp and flips
        # greedy ties: catches a blend normalised only once
        "blend3": dict(blend=([a, b, a], [4.0, 3.0, 2.0]), n=100, seq=16),
        # reset_attention_mask alone: the attention blocks must not depend on reset_position_ids
        "reset_attn": dict(blend=([a], None), n=20, seq=32, reset_attention_mask=True,
                           create_attention_mask=True),
    }
    arrays, meta = {}, {"megatron_core_version": megatron.core.__version__, "eod": EOD, "cases": {}}
    for name, c in cases.items():
        c = dict(c)
        meta["cases"][name] = {k: v for k, v in c.items() if k != "blend"}
        meta["cases"][name]["blend"] = [[Path(p).name for p in c["blend"][0]], c["blend"][1]]
        ds = build(c.pop("blend"), c.pop("n"), c.pop("seq"), c.pop("split", "1,0,0"), **c)
        meta[name] = {}
        dump(name, ds, arrays, meta)
        meta["cases"][name]["len"] = meta.pop(name)["len"]
    np.savez_compressed(OUT / "gpt_golden.npz", **arrays)
    (OUT / "gpt_golden.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
