"""One-process rank simulation: a TEST HARNESS, not library code (no command uses it).

Every rank of a dp x tp x pp (x ep, + sp) mesh runs in this one process, so tests can compare
logits, gradients after the data-parallel all-reduce, AdamW / ZeRO-1 steps, sharded saves and
re-sharding against the single-device model for many layouts in seconds, without msrun.

Why it has its own forward (engine.py) instead of running `qwen3moe.parallel.parallelize`'s
rank models: those are compiled per-rank graphs whose collectives (shared-memory or MCCL ops
inside the graph) block until every member of the group arrives; one process cannot run N of
them, since the first graph would wait forever for its peers. The engine is written per rank
over "streams" ({stage-local rank: tensor}) with `SimCollectives`, whose backward rules come
from stop-gradient constructions, so ordinary autodiff of the sum of all ranks' losses yields
each rank's Megatron gradient. Its shards are the library's: the same `ShardInfo`, slicing and
loading (`qwen3moe.parallel.ranks`), the same checkpoint format (`qwen3moe.parallel.checkpoint`);
tests/test_parallelize.py checks parallelize's parameters against `ranks.build_stage`
parameter by parameter, and the real-process tests check the compiled path itself.

engine.py      per-rank forward of a stage (TP / SP / EP / vocab-parallel CE) over streams
trainer.py     ParallelLM: logits, loss + gradients through the 1F1B pipeline, full views
collectives.py SimCollectives: Megatron's collectives and their backward rules, all ranks here
ranks.py       the per-rank shard cells (RankStage) built from the model's layer classes
schedule.py    1F1B and its dependency-order executor
dp.py          bucketed gradient all-reduce over the simulated ranks, ShardedAdamW (ZeRO-1)
aux.py         SimComm and the global-batch aux terms over simulated dp ranks
"""
