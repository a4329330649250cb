"""Issue 15 part A: nothing lost, nothing silent (saving, exporting, converting, validating).

One test (or parametrised group) per BAD item and POOR group of the adversarial pass; each was
seen failing against the code before the fix. All in-process and fast (tiny models).
"""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from helpers import cli_error

from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from qwen3moe.cli import main
from qwen3moe.io.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from qwen3moe.layers.dtypes import set_init_seed
from qwen3moe.models.config import ConfigError


def tiny(**kw) -> Qwen3MoeForCausalLM:
    set_init_seed(kw.pop("seed", 0))
    return Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=128, **kw))


@pytest.fixture(scope="module")
def model():
    return tiny()


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


# ---- BAD 1: save_pretrained / export never destroy the target folder -------------------------
def test_save_pretrained_keeps_unrelated_files(model, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x01\x02")
    model.save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x01\x02"
    Qwen3MoeForCausalLM.from_pretrained(out)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp file left


def test_save_pretrained_into_cwd_deletes_nothing(model, tmp_path, monkeypatch):
    (tmp_path / "keep.py").write_text("print(1)")
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(".")
    assert (tmp_path / "keep.py").read_text() == "print(1)" and (tmp_path / "config.json").is_file()


def test_resave_removes_stale_shards_only(model, tmp_path):
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="20KB")
    old_shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(old_shards) > 2
    (out / "model-notes.txt").write_text("unrelated")
    model.save_pretrained(out)  # one file now: the old index and shards are stale
    files = set(os.listdir(out))
    assert "model.safetensors" in files and not files & old_shards
    assert "model.safetensors.index.json" not in files and "model-notes.txt" in files
    model.save_pretrained(out, max_shard_size="40KB")  # sharded again: the single file is stale
    files = set(os.listdir(out))
    new_shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert "model.safetensors" not in files and new_shards <= files
    assert {f for f in files if f.endswith(".safetensors")} == new_shards
    Qwen3MoeForCausalLM.from_pretrained(out)


def test_save_pretrained_onto_a_file_is_an_error(model, tmp_path):
    from qwen3moe.io.atomic import OutputError

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        model.save_pretrained(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


@pytest.fixture
def train_ckpt(model, tmp_path):
    from qwen3moe.training import AdamW
    from qwen3moe.training.checkpoint import save_training_checkpoint

    root = tmp_path / "run" / "checkpoint"
    opt = AdamW(model.trainable_params(), lr=1e-3)
    for s in (1, 2):
        save_training_checkpoint(str(root), s, model, opt, extra={"model_config": model.config.to_dict()})
    return root


@pytest.mark.parametrize("where", ["root", "inside_root", "step", "inside_step"])
def test_export_refuses_output_in_the_checkpoint_tree(train_ckpt, capsys, where):
    before = _tree(train_ckpt)
    out = {"root": train_ckpt, "inside_root": train_ckpt / "hf", "step": train_ckpt / "step_00000002",
           "inside_step": train_ckpt / "step_00000002" / "hf"}[where]
    assert "--output" in cli_error(["export", "--checkpoint", str(train_ckpt), "--output", str(out), "--dtype",
                                    "float32"], capsys)
    assert _tree(train_ckpt) == before


def test_export_keeps_unrelated_files(train_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    assert main(["export", "--checkpoint", str(train_ckpt), "--output", str(out), "--dtype", "float32"]) == 0
    assert (out / "README.md").read_text() == "my notes"
    Qwen3MoeForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_export_refuses_non_finite_training_weights(train_ckpt, tmp_path, capsys, bad):
    """BAD 5 on the export path: a NaN/Inf weight in the training checkpoint is named, nothing written."""
    from qwen3moe.io.safetensors_io import SafetensorsFile

    victim, f = "model.layers.0.self_attn.k_proj.weight", train_ckpt / "step_00000002" / "model.safetensors"
    st = SafetensorsFile(str(f))
    tensors = {k: st.read(k).copy() for k in st.keys()}
    st.close()
    tensors[victim][0, 1] = bad
    write_safetensors(str(f), [(k, a, "F32") for k, a in tensors.items()])
    out = tmp_path / "hf"
    err = cli_error(["export", "--checkpoint", str(train_ckpt), "--output", str(out), "--dtype", "float32"], capsys)
    assert victim in err and "non-finite" in err and str(f) in err, err
    assert not out.exists()


# ---- BAD 2: wikitext-to-jsonl leaves the output untouched on any error -------------------------
GOOD_WIKI = " = Valkyria = \n\n Senjō no Valkyria 3 @-@ a game .\n"


@pytest.mark.parametrize("content, words", [
    (b"", "no ' = Title = '"),
    (b"\n  \n\n", "no ' = Title = '"),
    (b"just some text\nand more\n", "no ' = Title = '"),
    (b" = Title = \n\n ok line\n bad \xff\xfe line\n", "line 4"),
])
def test_wikitext_error_leaves_output_untouched(tmp_path, capsys, content, words):
    src, out = tmp_path / "wiki.tokens", tmp_path / "out.jsonl"
    src.write_bytes(content)
    out.write_text('{"title": "precious"}\n')
    assert words in cli_error(["wikitext-to-jsonl", "--input", str(src), "--output", str(out)], capsys)
    assert out.read_text() == '{"title": "precious"}\n'
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "wiki.tokens"]  # no temp file survives


def test_wikitext_same_file_refused(tmp_path, capsys):
    src = tmp_path / "wiki.tokens"
    src.write_text(GOOD_WIKI, encoding="utf-8")
    os.link(src, tmp_path / "alias.tokens")
    for out in (src, tmp_path / "alias.tokens"):
        assert "same file" in cli_error(["wikitext-to-jsonl", "--input", str(src), "--output", str(out)], capsys)
    assert src.read_text(encoding="utf-8") == GOOD_WIKI


def test_wikitext_good_input_still_converts(tmp_path):
    src, out = tmp_path / "wiki.tokens", tmp_path / "out.jsonl"
    src.write_text(GOOD_WIKI, encoding="utf-8")
    assert main(["wikitext-to-jsonl", "--input", str(src), "--output", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["title"] == "Valkyria"


# ---- BAD 8: modes follow the umask; unwritable targets refused before any work ---------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_atomic_writes_use_the_umask(tmp_path, umask_027, model):
    from qwen3moe.io.atomic import atomic_directory, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640
    with atomic_directory(tmp_path / "d") as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o750
    model.save_pretrained(tmp_path / "hf")
    for f in os.listdir(tmp_path / "hf"):
        assert stat.S_IMODE(os.stat(tmp_path / "hf" / f).st_mode) == 0o640, f
    os.chmod(tmp_path / "a.txt", 0o604)  # replacing keeps the file's own mode
    atomic_write_text(tmp_path / "a.txt", "y")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o604


def test_atomic_write_refuses_read_only_targets(tmp_path):
    from qwen3moe.io.atomic import OutputError, atomic_write_text

    ro = tmp_path / "ro.txt"
    ro.write_text("keep")
    ro.chmod(0o444)
    with pytest.raises(OutputError, match="ro.txt.*not writable"):
        atomic_write_text(ro, "new")
    assert ro.read_text() == "keep"
    (tmp_path / "rodir").mkdir()
    (tmp_path / "rodir").chmod(0o555)
    try:
        with pytest.raises(OutputError, match="rodir.*not writable"):
            atomic_write_text(tmp_path / "rodir" / "x.txt", "new")
    finally:
        (tmp_path / "rodir").chmod(0o755)
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_text(tmp_path / "rodir", "new")


@pytest.mark.parametrize("target", ["dir", "ro_file", "ro_dir"])
def test_generate_checks_output_before_loading(tmp_path, capsys, monkeypatch, target):
    import qwen3moe.generation.batch as gen
    from helpers import HF_FIXTURES

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --output check")

    monkeypatch.setattr(gen, "load", no_load)  # generate imports it at call time: the patch is seen
    (tmp_path / "d").mkdir()
    (tmp_path / "ro.txt").write_text("old")
    (tmp_path / "ro.txt").chmod(0o444)
    (tmp_path / "rodir").mkdir(mode=0o555)
    out = {"dir": tmp_path / "d", "ro_file": tmp_path / "ro.txt", "ro_dir": tmp_path / "rodir" / "r.txt"}[target]
    try:
        err = cli_error(["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data",
                         "hi", "--output", str(out)], capsys)
    finally:
        (tmp_path / "rodir").chmod(0o755)
    assert "--output" in err
    assert (tmp_path / "ro.txt").read_text() == "old"


# ---- BAD 5 + POOR: config values validated per key, non-finite / wrongly typed weights ------
@pytest.mark.parametrize("change, key", [
    ({"num_experts": "8"}, "num_experts"),
    ({"num_experts": True}, "num_experts"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"moe_intermediate_size": -32}, "moe_intermediate_size"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"initializer_range": -0.1}, "initializer_range"),
    ({"router_aux_loss_coef": "big"}, "router_aux_loss_coef"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"norm_topk_prob": 1}, "norm_topk_prob"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id"),
    ({"bos_token_id": -3}, "bos_token_id"),
    ({"mlp_only_layers": ["0"]}, "mlp_only_layers"),
    ({"max_window_layers": -1}, "max_window_layers"),
    ({"sliding_window": "4k"}, "sliding_window"),
])
def test_config_value_errors_name_the_key(tmp_path, change, key):
    d = {**Qwen3MoeConfig.from_preset("tiny").to_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as exc:
        Qwen3MoeConfig.from_pretrained(tmp_path)
    msg = str(exc.value)
    assert key in msg and "config.json" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("text", ["[1, 2]", '"config"', "null"])
def test_config_json_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        Qwen3MoeConfig.from_pretrained(tmp_path)


def test_config_accepts_valid_edge_values():
    c = Qwen3MoeConfig.from_preset("tiny", rms_norm_eps=1, rope_theta=1e6, eos_token_id=[1, 2],
                                   attention_dropout=0.0, sliding_window=None)
    assert c.rms_norm_eps == 1 and c.eos_token_id == [1, 2]


def _write_hf(model, out, edit):
    """The model as an HF folder whose tensors pass through edit(name, array, tag)."""
    from qwen3moe.io.hf_checkpoint import hf_tensors

    out.mkdir()
    model.config.save_pretrained(out)
    write_safetensors(str(out / "model.safetensors"), [edit(n, a, t) for n, a, t in hf_tensors(model, "float32")])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_named_at_load(model, tmp_path, bad):
    victim = "model.layers.0.mlp.experts.1.up_proj.weight"

    def poison(n, a, t):
        if n == victim:
            a = a.copy()
            a[3, 5] = bad
        return n, a, t

    _write_hf(model, tmp_path / "m", poison)
    with pytest.raises(CheckpointError) as exc:
        Qwen3MoeForCausalLM.from_pretrained(tmp_path / "m")
    msg = str(exc.value)
    assert victim in msg and "model.safetensors" in msg and "non-finite" in msg and "\n" not in msg


def test_integer_tensor_where_a_float_weight_belongs(model, tmp_path):
    victim = "model.norm.weight"
    _write_hf(model, tmp_path / "m", lambda n, a, t: (n, a.astype(np.int32), "I32") if n == victim else (n, a, t))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has dtype I32"):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F32", "shape": [2]}, "data_offsets"),
    ({"dtype": "F32", "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "data_offsets"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "data_offsets"),
    ("not a dict", "entry"),
])
def test_malformed_safetensors_header_entry(tmp_path, entry, words):
    import struct

    header = json.dumps({"w": entry}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(str(tmp_path / "x.safetensors"))
    msg = str(exc.value)
    assert "x.safetensors" in msg and "'w'" in msg and words in msg, msg


def test_finite_check_is_cheap():
    """The non-finite scan is min+max per tensor (no temporary); see bench/RESULTS.md for load cost."""
    from qwen3moe.io.safetensors_io import check_finite

    check_finite(np.ones((4, 4), np.float32), "w", "f")
    check_finite(np.zeros(0, np.float32), "w", "f")
    with pytest.raises(CheckpointError, match="'w'.*non-finite"):
        check_finite(np.array([1.0, np.nan], np.float32), "w", "f")


# ---- BAD 9 + POOR: empty batches and bad logits_to_keep are input errors ---------------------
def test_empty_batch_is_an_input_error(model):
    from qwen3moe.generation.generate import generate

    with pytest.raises(ValueError, match="input_ids has batch size 0"):
        model(np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match="input_ids has batch size 0"):
        generate(model, np.zeros((0, 4), np.int64), max_new_tokens=1)


@pytest.mark.parametrize("keep", [1.5, "1", True, None])
def test_logits_to_keep_must_be_an_int(model, keep):
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        model(np.ones((1, 4), np.int64), logits_to_keep=keep)


# ---- POOR: preprocess names the line with invalid UTF-8 ---------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_invalid_utf8_names_the_line(tmp_path, capsys, workers):
    from helpers import REPO

    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "bad \xff byte"}\n')
    err = cli_error(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"), "--workers",
                     str(workers), "--tokenizer-dir", str(REPO / "qwen3moe" / "assets" / "tiny-tokenizer")], capsys)
    assert "in.jsonl" in err and "line 3" in err and "UTF-8" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("index", ['{"weight_map": ["a"]}', '{"weight_map": {"w": 3}}', "[]", "{bad"])
def test_malformed_index(model, tmp_path, index):
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path / "m")
