"""The simulation's 1F1B pipeline schedule and its executor over micro-batches (test harness).

`one_f_one_b(pp, M, s)` is stage s's op list: min(pp-s-1, M) warm-up forwards, then alternating
one forward / one backward, then the remaining backwards (Megatron's non-interleaved 1F1B);
stage s holds at most pp-s activations in flight. The compiled pipeline's
order is qwen3moe.parallel.pipeline_step.lifo. `run_schedule` executes every stage's list in
dependency order (F(m) on s needs F(m) on s-1; B(m) needs B(m) on s+1, or F(m) on the last
stage) and returns the global event order, so the schedule is observable and testable.
"""
from __future__ import annotations


def one_f_one_b(pp: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    warm = min(pp - stage - 1, micro_batches)
    ops = [("F", m) for m in range(warm)]
    for i in range(micro_batches - warm):
        ops += [("F", warm + i), ("B", i)]
    ops += [("B", m) for m in range(micro_batches - warm, micro_batches)]
    return ops


def run_schedule(pp: int, micro_batches: int, do, schedule=one_f_one_b) -> list[tuple[int, str, int]]:
    """Execute the op lists of all stages (`schedule(pp, M, s)`, default 1F1B); `do(stage, op, m)`
    performs one op. Returns the executed (stage, op, m) events in order. Stages advance
    round-robin, one op per turn, which is how independent devices would interleave."""
    lists = [schedule(pp, micro_batches, s) for s in range(pp)]
    pos = [0] * pp
    done: set[tuple[int, str, int]] = set()
    events = []
    while any(pos[s] < len(lists[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            if pos[s] == len(lists[s]):
                continue
            op, m = lists[s][pos[s]]
            if op == "F":
                ready = s == 0 or (s - 1, "F", m) in done
            else:
                ready = (s + 1, "B", m) in done if s < pp - 1 else (s, "F", m) in done
            if ready:
                do(s, op, m)
                done.add((s, op, m))
                events.append((s, op, m))
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule deadlocked at positions {pos}")
    return events
