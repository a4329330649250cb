"""Sharded generation with --dtype / --quantize (parallel/quantized.py, parallelize(...,
param_dtype=, quantization=)): each rank quantizes its own float slices while reading them.

Fast (one process, no collectives; ranks built one after another): every rank's tensors against
the single-process model loaded with the same options — exactly equal (quantization is
deterministic, so a rank's column / vocab / expert block is the single-process tensor's, and a
row-parallel slice whose width is a multiple of the group size holds the whole tensor's groups,
a per-channel one the whole rows' scales). One-line refusals before any launch.
Real processes (`slow`, ~40-60 s a launch): greedy tokens of `generate --use_parallel` equal one
process generating with the same options.
"""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import HF_FIXTURES

GQA = HF_FIXTURES / "tiny-fp32-gqa"   # every layer sparse; H 64, heads*dim 128, expert ffn 32
MQA = HF_FIXTURES / "tiny-mqa-dense"  # dense and sparse layers, one kv head (replicated over tp 2)


def _f32(p) -> np.ndarray:
    from qwen3moe.io.hf_checkpoint import param_f32

    return param_f32(p)


@pytest.fixture(params=[None, 2048], ids=["whole", "blocks"])
def read_blocks(request, monkeypatch):
    """Row blocks of the slices read (ranks.row_blocks) and quantized: the default (whole
    fixture slices), or 2048 values (the embedding and lm_head slices read in 16-64 blocks, q/k/v
    in 2-4: the path a real [V/tp, H] slice takes)."""
    if request.param:
        from qwen3moe.io import hf_checkpoint, quantized
        from qwen3moe.parallel import ranks

        for module in (ranks, quantized, hf_checkpoint):  # reads, quantizer blocks, bf16 rounding
            monkeypatch.setattr(module, "ROW_BLOCK_ELEMENTS", request.param)
    return request.param


def _ranks(folder, mesh, **build):
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.parallelize import parallelize

    cfg = Qwen3MoeConfig.from_pretrained(folder)
    return [parallelize(cfg, mesh, r, str(folder), coll=SimpleNamespace(groups={}), **build)
            for r in range(mesh.world_size)]


@pytest.mark.parametrize("layout", [dict(tp=2, ep=2), dict(pp=2, micro_batch_num=2)], ids=["tp2ep2", "pp2"])
def test_tp_ep_int4_bf16_rank_tensors_are_slices_of_the_single_process_model(layout, read_blocks):
    """tp2 x ep2 (2 ranks: tp split attention, each rank 4 of 8 experts), int4 group 32, bf16
    embeddings / norms / router: every tensor of every rank (qweight, scales, qzeros of q/k/v
    (column), o_proj (row, 64 columns a rank = 2 groups), the lm_head (int8 per channel, vocab
    rows), the expert stacks (ep block); bf16 plain weights) equals the slice of the single-process
    `from_pretrained(dtype="bfloat16", quantization="int4", group_size=32)` tensor. pp2: each
    stage holds its layers' tensors whole (embedding on the first, lm_head on the last)."""
    import mindspore as ms

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.layers.quant import QuantizationConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.ranks import slice_for

    one = Qwen3MoeForCausalLM.from_pretrained(GQA, dtype="bfloat16", quantization="int4", group_size=32)
    full = {p.name: p for p in one.get_parameters()}
    qc = QuantizationConfig.from_name("int4", 32)
    ranks = _ranks(GQA, Mesh(**layout), param_dtype=ms.bfloat16, quantization=qc)
    assert set().union(*({p.name for p, _ in rm.entries} for rm in ranks)) == set(full)
    for r, rm in enumerate(ranks):
        names = {p.name for p, _ in rm.entries}
        assert names == set(full) or "pp" in layout, (r, names ^ set(full))
        styles = set()
        for p, info in rm.entries:
            want = full[p.name]
            assert p.dtype == want.dtype, (r, p.name)
            if want.dtype in (ms.uint8, ms.float16):
                got, ref = p.asnumpy(), want.asnumpy()
            else:
                got, ref = _f32(p), _f32(want)
            np.testing.assert_array_equal(got, slice_for(info, ref), err_msg=f"rank {r} {p.name}")
            if p.name.endswith(".qweight"):
                styles.add(info.style + ("/ep" if info.ep_size > 1 else ""))
        if "pp" not in layout:
            assert styles == {"column", "row", "vocab", "gate_up/ep", "expert_row/ep"}, styles


@pytest.mark.parametrize("folder,layout", [(MQA, dict(tp=2)), (GQA, dict(dp=2, ep=2)), (GQA, dict(tp=2, ep=2))],
                         ids=["mqa-tp2", "gqa-dp2ep2", "gqa-tp2ep2"])
def test_bf16_rank_tensors_are_slices_of_the_single_process_bf16_model(folder, layout, read_blocks):
    """--dtype bfloat16 alone: every rank tensor (expert stacks as bf16 bits, read one expert at
    a time, split over etp or ep; attention, dense MLP, norms, router, embedding, lm_head) is the
    slice of `from_pretrained(dtype="bfloat16")`'s, in the same storage dtype."""
    import mindspore as ms

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.ranks import slice_for

    full = {p.name: p for p in Qwen3MoeForCausalLM.from_pretrained(folder, dtype="bfloat16").get_parameters()}
    for r, rm in enumerate(_ranks(folder, Mesh(**layout), param_dtype=ms.bfloat16)):
        assert {p.name for p, _ in rm.entries} == set(full)
        for p, info in rm.entries:
            assert p.dtype == full[p.name].dtype and p.dtype != ms.float32, (r, p.name, p.dtype)
            np.testing.assert_array_equal(_f32(p), slice_for(info, _f32(full[p.name])), err_msg=f"rank {r} {p.name}")


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_tp_per_channel_row_slices_are_the_single_process_tensors(bits, read_blocks):
    """tp2 (experts' ffn split too, etp 2) on the dense + sparse fixture, per channel (group_size
    -1): every quantized tensor of every rank is the single-process model's: column / vocab rows
    (q, k, v with the one kv head replicated, gate, up, expert gate_up, lm_head); a row-parallel
    slice (o_proj, dense and expert down_proj) holds its input columns of qweight and the WHOLE
    per-row scales / zeros (each rank quantizes the whole rows, as one process; before: one scale
    per row of the rank's columns, which fails here), and its cell dequantizes to the slice of
    the single-process weight."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.layers.quant import QuantizationConfig, QuantizedWeight, dequantize
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.ranks import slice_for

    one = Qwen3MoeForCausalLM.from_pretrained(MQA, quantization=f"int{bits}", group_size=-1)
    full = {p.name: p.asnumpy() for p in one.get_parameters()}
    ranks = _ranks(MQA, Mesh(tp=2), quantization=QuantizationConfig.from_name(f"int{bits}", -1))
    checked = set()
    for r, rm in enumerate(ranks):
        for _, cell in rm.model.cells_and_names():
            if not isinstance(cell, QuantizedWeight):
                continue
            base = cell.qweight.name[:-len(".qweight")]
            info = rm.info(cell.qweight.name)
            lm_bits = 8 if base == "lm_head" else bits
            rows = info.style in ("row", "expert_row")
            got = [getattr(cell, k).asnumpy() for k in ("qweight", "scales", "qzeros")]
            want = [full[f"{base}.{k}"] for k in ("qweight", "scales", "qzeros")]
            per_row = replace(info, style="replicate") if rows else info  # [O, 1]: the whole row's scale
            for k, g, w in zip(("qweight", "scales", "qzeros"), got, want):
                np.testing.assert_array_equal(g, slice_for(info if k == "qweight" else per_row, w),
                                              err_msg=f"rank {r} {base}.{k}")
            assert got[1].shape[-1] == 1, (base, got[1].shape)
            np.testing.assert_array_equal(dequantize(*got, lm_bits), slice_for(info, dequantize(*want, lm_bits)),
                                          err_msg=f"rank {r} {base} dequantized")
            checked.add((info.style, info.sync))
    assert {("column", "kv2"), ("column", "dp"), ("row", "dp"), ("vocab", "dp"), ("gate_up", "edp"),
            ("expert_row", "edp")} <= checked, checked


def _request(folder, **kw):
    from qwen3moe.generation.batch import GenerateRequest

    return GenerateRequest(str(folder), "hello", **kw)


@pytest.mark.parametrize("layout,kw,match", [
    (dict(pp=2, tp=2), dict(quantize="int4", group_size=128),
     r"group_size 128 does not divide the per-rank input dimension 64 of self_attn\.o_proj"),
    (dict(tp=2), dict(quantize="int4", group_size=32),
     r"group_size 32 does not divide the per-rank input dimension 16 of mlp\.experts\.down_proj "
     r"\(moe_intermediate_size 32 / etp 2\)"),
    (dict(tp=2, ep=2), dict(quantize="int4", group_size=128),
     r"group_size 128 does not divide the per-rank input dimension 64 of self_attn\.o_proj "
     r"\(num_attention_heads\*head_dim 128 / tp 2\)"),
    (dict(tp=2, ep=2), dict(quantize="int4", group_size=32, activations="int8"),
     r"--activations int8: the per-rank input dimension 64 of self_attn\.o_proj \(num_attention_heads\*head_dim 128 "
     r"/ tp 2\) is not a multiple of 128, the int4 chunk of the int8-activation kernels"),
], ids=["pp2tp2-int4-g128", "tp2-int4-g32", "tp2ep2-int4-g128", "tp2ep2-int4-act8"])
def test_sharded_generation_refusals_are_one_line(layout, kw, match):
    """One-line refusals before any launch; int8 activations are accepted where every rank's
    slices hold whole activation blocks and kernel chunks (before: refused on every sharded
    layout; pp2: its stages run the fused step, before: refused)."""
    from qwen3moe.generation.errors import GenerationError
    from qwen3moe.parallel.generate import check_request
    from qwen3moe.parallel.mesh import Mesh

    mesh = Mesh(**layout)
    with pytest.raises(GenerationError, match=match) as exc:
        check_request(_request(GQA, **kw), mesh, mesh.world_size)
    assert "\n" not in str(exc.value)
    for ok, kw in ((Mesh(tp=2, ep=2), dict(quantize="int8", group_size=32, activations="int8")),
                   (Mesh(dp=2, ep=2), dict(quantize="int4", group_size=32, activations="int8")),
                   (Mesh(pp=2), dict(quantize="int8", activations="int8"))):
        check_request(_request(GQA, **kw), ok, ok.world_size)


def _wide_fixture(tmp_path):
    """The GQA fixture with expert ffn 64 (random weights): its experts' down_proj splits over
    etp 2 into 32 columns a rank, a whole act-order group 32, so pure tp2 can load a GPTQ folder
    of it (the GQA fixture's 16 columns a rank are refused: test_sharded_gptq_refusals)."""
    import mindspore as ms

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.models.config import Qwen3MoeConfig

    ms.set_seed(5)
    cfg = replace(Qwen3MoeConfig.from_pretrained(GQA), moe_intermediate_size=64)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def _gptq_cases(tmp_path, case: str):
    """A GPTQ folder of the GQA fixture: ours (io/gptq.quantize_folder: sym, v1 zero points),
    or third-party (tools/gptq_unpack.pack: asym, act-order g_idx; blocks 2: each half of a
    row's inputs grouped within itself, 1: groups mixing the halves, as real act-order
    quantizers produce), or an AWQ folder ("awq": tools/awq_unpack.pack, asym, groups of 32);
    "...+wide": of _wide_fixture."""
    from helpers import third_party_gptq_folder
    from qwen3moe.io.gptq import quantize_folder
    from qwen3moe.layers.quant import QuantizationConfig

    case, _, wide = case.partition("+")
    src = _wide_fixture(tmp_path) if wide else GQA
    kind, *rest = case.split("_")
    if kind == "awq":  # tools/awq_unpack.pack: asym, contiguous groups of 32
        from helpers import awq_folder

        return awq_folder(tmp_path / "q", src)[0]
    if kind == "ours":
        bits, g = int(rest[0]), int(rest[1])
        quantize_folder(str(src), str(tmp_path / "q"), QuantizationConfig(bits, g))
        return tmp_path / "q"
    return third_party_gptq_folder(tmp_path / "q", src, 4, rest[0] == "v1", blocks=int(rest[1]))[0]


def _as_stored(arrays: dict, bits: int) -> dict:
    """A single-process load's tensors with each act-order weight as the ranks hold it: the
    columns back in HF order and the group map g_idx [..., R, I] (one process holds them sorted
    by group with an input order perm: io/act_order.sort_by_group)."""
    from qwen3moe.layers.quant import pack, unpack

    out = dict(arrays)
    for name in [n for n in arrays if n.endswith(".perm")]:
        base = name[:-len(".perm")]
        inv = np.argsort(out.pop(name), -1)  # HF column k is stored column inv[k]
        u = unpack(out[f"{base}.qweight"], bits if base != "lm_head" else 8)
        out[f"{base}.qweight"] = pack(np.take_along_axis(u, np.broadcast_to(inv[..., None, :], u.shape), -1), bits)
        g = u.shape[-1] // out[f"{base}.scales"].shape[-1]
        R = 2 if base.endswith("gate_up_proj") else 1
        out[f"{base}.g_idx"] = np.repeat((inv // g)[..., None, :], R, -2).astype(np.int32)
    return out


def _assert_gptq_rank_cells(rm, full: dict, bits: int, r: int) -> set:
    """Every quantized cell of rank model `rm` against the single-process tensors `full`:
    qweight is their slice; scales / qzeros too, except on an input-column split of an
    act-order or per-channel cell, which keeps all the row's groups; g_idx (act-order) the
    whole map for an output-row split, the rank's columns of it (group numbers kept) for an
    input split; and the cell dequantizes (NumPy and its own composite graph) to the slice of
    the single-process weight. Returns (style, whole groups kept) seen."""
    from qwen3moe.layers.quant import QuantizedWeight, dequantize
    from qwen3moe.parallel.ranks import slice_for

    seen = set()
    for _, cell in rm.model.cells_and_names():
        if not isinstance(cell, QuantizedWeight):
            continue
        base = cell.qweight.name[:-len(".qweight")]
        info = rm.info(cell.qweight.name)
        cols = info.style in ("row", "expert_row") and info.tp_size > 1
        got = {k: getattr(cell, k).asnumpy() for k in ("qweight", "scales", "qzeros")}
        want = {k: full[f"{base}.{k}"] for k in ("qweight", "scales", "qzeros")}
        all_groups = cols and (cell.g_idx is not None or want["scales"].shape[-1] == 1)
        groups = replace(info, style="replicate") if all_groups else info  # the ep block of experts
        for k in got:
            np.testing.assert_array_equal(got[k], slice_for(info if k == "qweight" else groups, want[k]),
                                          err_msg=f"rank {r} {base}.{k}")
        g_got = g_want = None
        if cell.g_idx is not None:
            g_got, g_want = cell.g_idx.asnumpy(), full[f"{base}.g_idx"]
            whole = slice_for(replace(info, style="replicate"), g_want)
            if cols:
                n = g_got.shape[-1]
                whole = whole[..., info.tp_rank * n:(info.tp_rank + 1) * n]
            np.testing.assert_array_equal(g_got, whole, err_msg=f"rank {r} {base}.g_idx")
        ref = slice_for(info, dequantize(*want.values(), bits if base != "lm_head" else 8, g_want))
        np.testing.assert_array_equal(dequantize(*got.values(), bits if base != "lm_head" else 8, g_got), ref,
                                      err_msg=f"rank {r} {base} dequantized")
        np.testing.assert_array_equal(cell.dequant().asnumpy(), ref, err_msg=f"rank {r} {base} composite dequant")
        seen.add((info.style + ("/ep" if info.ep_size > 1 else ""), all_groups))
    return seen


@pytest.mark.parametrize("case,layout", [
    ("ours_4_32", dict(tp=2, ep=2)), ("ours_8_-1", dict(dp=2, ep=2)), ("ours_4_32", dict(pp=2, micro_batch_num=2)),
    ("third_v1_2", dict(tp=2, ep=2)), ("third_v2_1", dict(dp=2, ep=2)),
    ("ours_8_-1", dict(tp=2, ep=2)), ("ours_8_-1", dict(tp=2)), ("third_v1_1", dict(tp=2, ep=2)),
    ("third_v2_1+wide", dict(tp=2)), ("awq", dict(tp=2, ep=2)),
], ids=["ours-int4-g32-tp2ep2", "ours-int8-pc-dp2ep2", "ours-int4-g32-pp2", "asym-actorder-halves-v1-tp2ep2",
        "asym-actorder-v2-dp2ep2", "ours-int8-pc-tp2ep2", "ours-int8-pc-tp2", "asym-actorder-mixed-v1-tp2ep2",
        "asym-actorder-mixed-v2-wide-tp2", "awq-int4-g32-tp2ep2"])
def test_gptq_rank_cells_are_slices_of_the_single_process_load(tmp_path, case, layout):
    """A GPTQ folder under tp / ep / pp (parallelize with the folder as weights): every rank
    tensor equals the slice of `from_pretrained(folder, dtype="bfloat16")`'s: the quantized cells
    (_assert_gptq_rank_cells: q/k/v and expert gate_up output rows, o_proj input columns = 2 of 4
    groups, expert stacks by ep block; the act-order maps), the int8 lm_head (quantized from the
    float tensor, vocab rows) and the bf16 embeddings / norms / router. Row splits of per-channel
    folders and of act-order maps mixing the halves (o_proj over tp; "wide" tp2: the experts'
    down_proj over etp too) keep all the row's groups (before: refused, the per-channel one
    before the launch, the act-order one naming the g_idx tensor)."""
    import mindspore as ms

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.ranks import slice_for

    folder = _gptq_cases(tmp_path, case)
    one = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="bfloat16")
    bits = 8 if "_8_" in case else 4
    full = {p.name.replace(".perm", ".g_idx"): p for p in one.get_parameters()}
    arrays = _as_stored({p.name: p.asnumpy() for p in one.get_parameters()
                         if p.dtype in (ms.uint8, ms.float16, ms.int32)}, bits)
    seen = set()
    for r, rm in enumerate(_ranks(folder, Mesh(**layout), param_dtype=ms.bfloat16)):
        names = {p.name for p, _ in rm.entries}
        assert names == set(full) or "pp" in layout, (r, names ^ set(full))
        for p, info in rm.entries:
            assert p.dtype == full[p.name].dtype, (r, p.name)
            if p.name not in arrays:  # bf16 plain weights
                want = slice_for(info, _f32(full[p.name]))
                np.testing.assert_array_equal(_f32(p), want, err_msg=f"rank {r} {p.name}")
        seen |= _assert_gptq_rank_cells(rm, arrays, bits, r)
    ep = "" if "pp" in layout or layout.get("ep", 1) == 1 else "/ep"
    assert {style for style, _ in seen} == {"column", "row", "vocab", "gate_up" + ep, "expert_row" + ep}, seen
    whole = {style for style, kept in seen if kept}  # row splits keeping all the row's groups
    if layout.get("tp", 1) > 1 and ("third" in case or "-1" in case):
        assert whole == ({"row", "expert_row"} if layout.get("ep", 1) == 1 else {"row"}), seen
    if "third" in case:
        assert any(n.endswith(".g_idx") for n in full)  # the act-order maps were compared
    if case.startswith("third_v1_1"):  # the maps do mix the halves: the old per-rank block could not hold them
        g = arrays["model.layers.0.self_attn.o_proj.g_idx"][0]
        assert g[:g.shape[0] // 2].max() >= g.max() // 2 + 1 and g[g.shape[0] // 2:].min() < g.max() // 2 + 1


def test_parallelize_refuses_what_a_gptq_folder_cannot_split(tmp_path):
    """The library entry (parallelize with the folder as weights) refuses as generate does:
    quantization= on a GPTQ folder, and a group size not dividing a per-rank input dim."""
    from qwen3moe.layers.quant import QuantizationConfig, QuantizationError
    from qwen3moe.parallel.mesh import Mesh

    folder = _gptq_cases(tmp_path, "ours_4_32")
    for mesh, build, match in ((Mesh(tp=2, ep=2), dict(quantization=QuantizationConfig(4, 32)), "already quantized"),
                               (Mesh(tp=2), {}, r"group_size 32 does not divide the per-rank input dimension 16")):
        with pytest.raises(QuantizationError, match=match):
            _ranks(folder, mesh, **build)


@pytest.mark.parametrize("case,layout,kw,match", [
    ("ours_4_32", dict(tp=2), {}, r"GPTQ folder: its group_size 32 does not divide the per-rank input dimension 16 "
                                  r"of mlp\.experts\.down_proj \(moe_intermediate_size 32 / etp 2\)"),
    ("third_v1_1", dict(tp=2), {}, r"GPTQ folder: its group_size 32 does not divide the per-rank input dimension "
                                   r"16 of mlp\.experts\.down_proj"),
    ("ours_4_32", dict(tp=2, ep=2), dict(quantize="int8"), r"already quantized \(4-bit GPTQ\); generate without "
                                                           r"--quantize"),
    ("ours_4_32", dict(tp=2, ep=2), dict(group_size=64), r"--group_size needs --quantize int8/int4"),
    ("ours_4_32", dict(tp=2, ep=2), dict(activations="int8"), r"--activations with a GPTQ folder is not supported "
                                                              r"under --use_parallel"),
    ("ours_4_32", dict(tp=2, ep=2), dict(lm_head_bits=6), r"--lm_head_bits with a GPTQ folder is not supported "
                                                          r"under --use_parallel"),
], ids=["int4-g32-tp2", "asym-actorder-tp2", "quantize", "group_size", "activations", "lm_head_bits"])
def test_sharded_gptq_refusals_are_one_line(tmp_path, case, layout, kw, match):
    """What a GPTQ folder cannot do sharded, refused before any launch, naming the folder /
    projection / option; the same folder on a layout that splits whole groups is accepted."""
    from qwen3moe.generation.errors import GenerationError
    from qwen3moe.parallel.generate import check_request
    from qwen3moe.parallel.mesh import Mesh

    folder = _gptq_cases(tmp_path, case)
    mesh = Mesh(**layout)
    with pytest.raises(GenerationError, match=match) as exc:
        check_request(_request(folder, **kw), mesh, mesh.world_size)
    assert "\n" not in str(exc.value)
    accepted = Mesh(dp=2, ep=2)  # ep splits no group
    check_request(_request(folder), accepted, accepted.world_size)


def _generate_both(tmp_path, layout: list[str], *options: str, folder=GQA):
    """Greedy `generate` of 3 prompts (batch 2: a left-padded pair, then one row) of `folder`
    with `options` under `launch --nproc 2 ... --use_parallel True` and as one process (and the
    float GQA fixture without options, which must give other tokens)."""
    import os
    import subprocess
    import sys

    from helpers import REPO, launch

    (tmp_path / "prompts.txt").write_text("hello world\nthe quick brown fox jumps over\nonce upon a time\n")

    def args(model, *opts):
        return ["generate", "--pretrained_model_dir", str(model), "--predict_data", str(tmp_path / "prompts.txt"),
                "--max_new_tokens", "8", "--do_sample", "false", "--predict_batch_size", "2", *opts]

    common = args(folder, *options)
    rc, err, _ = launch(tmp_path, *common, "--use_parallel", "True", *layout, "--output", str(tmp_path / "par.jsonl"))
    assert rc == 0, err[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name, args in (("one", common), ("fp32", args(GQA))):
        single = subprocess.run([sys.executable, "-m", "qwen3moe.cli", *args, "--output",
                                 str(tmp_path / f"{name}.jsonl")], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=240)
        assert single.returncode == 0, single.stderr[-2000:]
    par, one, fp32 = ([json.loads(line) for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
                      for f in ("par", "one", "fp32"))
    assert len(par) == 3
    assert [(p["completion"], p["completion_tokens"]) for p in par] == \
        [(o["completion"], o["completion_tokens"]) for o in one]
    # the options change this fixture's greedy tokens: a rank model ignoring them would fail above
    assert [o["completion"] for o in one] != [f["completion"] for f in fp32]
    return (tmp_path / "logs" / "worker_0.log").read_text()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout,options", [
    (["--parallel_config.model_parallel", "2", "--parallel_config.expert_parallel", "2"],
     ["--quantize", "int4", "--group_size", "32", "--dtype", "bfloat16"]),
    (["--parallel_config.model_parallel", "2"], ["--quantize", "int8", "--dtype", "bfloat16"]),
    (["--parallel_config.pipeline_stage", "2"], ["--quantize", "int8"]),
    (["--parallel_config.model_parallel", "2", "--parallel_config.expert_parallel", "2"],
     ["--quantize", "int8", "--group_size", "32", "--activations", "int8"]),
    (["--parallel_config.pipeline_stage", "2"], ["--quantize", "int8", "--activations", "int8"]),
], ids=["tp2ep2-int4-g32-bf16", "tp2-int8-bf16", "pp2-int8", "tp2ep2-int8-g32-act8", "pp2-int8-act8"])
def test_generate_use_parallel_quantized_and_bf16_match_single_process(tmp_path, layout, options):
    """The rank models decode with the fused kernels on their quantized / bf16 slices (partial
    outputs, the plan's collectives) and pick the tokens one process picks with the same options
    (greedy: identical tokens; before: the one-line "--quantize / --dtype apply to single-process
    ... only" refusal). tp2 int8 per channel: o_proj and the experts' down_proj (etp 2) split by
    input columns, each rank quantizing the whole rows (one process's scales; before: per rank
    columns, documented as possibly other tokens). pp2: each stage quantizes its layers (int8 per
    channel, no row split) and runs the fused cached step, micro-batches of one
    row overlapped across the stages. int8 activations (before: refused on ranks): o_proj's 64
    input columns a rank are whole activation blocks and one int8 chunk of the kernels, so the
    ranks quantize the activations as one process does; pp2 (before: refused, its stages ran
    the composite step): each stage's fused step with the flag on its whole rows."""
    log0 = _generate_both(tmp_path, layout, *options)
    assert "(fused step)" in log0


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("case", ["ours_4_32", "third_v1_1", "awq"], ids=["ours-int4-g32", "asym-actorder-mixed", "awq"])
def test_generate_use_parallel_gptq_matches_single_process(tmp_path, case):
    """A GPTQ folder generated under tp2 x ep2 (--dtype bfloat16 for its float tensors) picks the
    tokens one process picks from it (greedy: identical; before: the one-line "a GPTQ
    (pre-quantized) folder generates in one process" refusal). Ours: the fused decode kernels on
    the ranks' slices; asym act-order with groups mixing o_proj's halves (each rank its columns'
    g_idx and all the row's groups; before: refused naming the g_idx): the composite step. AWQ
    (tools/awq_unpack.pack): converted at load, the fused decode kernels as ours."""
    import shutil

    folder = _gptq_cases(tmp_path, case)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        if not (folder / name).exists():  # the independent packer writes weights and config only
            shutil.copy(GQA / name, folder / name)
    log0 = _generate_both(tmp_path, ["--parallel_config.model_parallel", "2", "--parallel_config.expert_parallel",
                                     "2"], "--dtype", "bfloat16", folder=folder)
    assert ("(composite step)" if "third" in case else "(fused step)") in log0
