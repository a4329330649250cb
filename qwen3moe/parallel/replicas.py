"""Pure data parallelism for generation: `generate --use_parallel` with only data_parallel > 1
runs the compiled single-process generation on prompts rank, rank + dp, ... and gathers the
results to rank 0. (Pure data-parallel training runs the compiled per-rank step, parallel/step.py.)
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops


# ---- generation -------------------------------------------------------------------------------
def gather_texts(text: str, size: int) -> list[str]:
    """Every rank's `text`, in rank order, on every rank (world AllGather of the UTF-8 bytes, as
    int32 and padded to the longest: MCCL on CPU gathers on the world group only)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    gather = ops.AllGather()
    lens = gather(Tensor(np.array([data.size], np.int32))).asnumpy()
    longest = max(int(lens.max()), 1)
    padded = np.zeros(longest, np.int32)
    padded[:data.size] = data
    rows = gather(Tensor(padded)).asnumpy().reshape(size, longest)
    return [bytes(rows[r, :lens[r]].astype(np.uint8)).decode("utf-8") for r in range(size)]


def generate(req, rank: int, dp: int) -> list[dict] | None:
    """`generate --use_parallel` for pure dp: the compiled single-process generation (sampling and
    batching included) on prompts rank, rank + dp, ...; the results in prompt order on rank 0,
    None on the other ranks."""
    import json

    from qwen3moe.generation.batch import generate_batch, load, read_prompts

    prompts = read_prompts(req.predict_data)
    mine = list(range(rank, len(prompts), dp))
    tok, model, cfg = load(req)
    done: dict[int, dict] = {}
    for i in range(0, len(mine), req.predict_batch_size):
        chunk = mine[i:i + req.predict_batch_size]
        results, _ = generate_batch(model, tok, cfg, [prompts[j] for j in chunk], req)
        done.update(zip(chunk, results))
    parts = gather_texts(json.dumps({str(k): v for k, v in done.items()}, ensure_ascii=False), dp)
    if rank:
        return None
    merged = {int(k): v for p in parts for k, v in json.loads(p).items()}
    return [merged[i] for i in range(len(prompts))]
