"""One-process side of bench/parallel.py: the compiled forward and LossGrad (forward + backward)
of the unmodified model on the whole batch; prints one JSON line of median seconds."""
from __future__ import annotations

import json
import sys

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.parallel.distcheck import data, timed
from qwen3moe.parallel.objectives import LossGrad

folder, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = Qwen3MoeForCausalLM.from_pretrained(folder)
ids = data(model.config.vocab_size, batch, seq)
_, fwd = timed(lambda: model(ids, labels=ids, output_router_logits=True), steps)
t = prepare_inputs(model.config, ids, labels=ids)
fn = LossGrad(model)
_, grad = timed(lambda: fn(t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels), steps)
print(json.dumps({"forward_s": fwd, "grad_s": grad}))
