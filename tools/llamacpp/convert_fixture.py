"""Convert the quality fixture (tests/fixtures/quality/model) with llama.cpp's convert_hf_to_gguf.py.

    /work/data/refvenv/bin/python tools/llamacpp/convert_fixture.py SRC_DIR/convert_hf_to_gguf.py \
        tests/fixtures/quality/model --outtype f32 --outfile /work/data/gguf/quality-F32.gguf

The converter recognises a BPE pre-tokenizer by hashing the ids it gives a probe text, so the
demo's own 1024-token BPE is unknown to it ("BPE pre-tokenizer was not recognized"). Its
pre-tokenizer is the Qwen2 split regex + byte-level, exactly llama.cpp's "qwen2" pre-tokenizer,
so this wrapper answers "qwen2" for that lookup and runs the converter unchanged otherwise.
Reference tooling only.
"""
import runpy
import sys
from pathlib import Path

script = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(script.parent))
sys.argv = [str(script), *sys.argv[2:]]
from conversion import base  # noqa: E402  (llama.cpp's conversion package beside the script)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
runpy.run_path(str(script), run_name="__main__")
