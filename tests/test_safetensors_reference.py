"""The hand-written safetensors reader (io/safetensors_io.py) against the reference library, on every
safetensors file under tests/fixtures: same tensor names, dtypes, shapes and values, bit for bit.

The `safetensors` package parses each file independently (`safe_open` for names, dtypes, shapes
and the metadata; numpy-representable tensors through `get_tensor`). numpy has no bfloat16, so
for BF16 tensors the reference is `safetensors.deserialize`'s raw bytes, widened here by the
definition of bfloat16 (the top 16 bits of a float32); F8_E4M3 bytes (tiny-fp8) through torch's
float8_e4m3fn decoding of the 256 codes, recorded by tools/make_fp8_fixture.py. Exact equality:
both sides widen exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import deserialize, safe_open

from helpers import FIXTURES
from qwen3moe.io.safetensors_io import SafetensorsFile

FILES = sorted(FIXTURES.rglob("*.safetensors"))
TORCH_E4M3 = np.load(FIXTURES / "hf" / "tiny-fp8" / "fp8_reference.npz")["e4m3_codes"]


def test_fixtures_include_bf16_fp32_and_fp8_files():
    dtypes = {SafetensorsFile(str(p)).dtype(n) for p in FILES for n in SafetensorsFile(str(p)).keys()}
    assert len(FILES) >= 5 and {"BF16", "F32", "F8_E4M3"} <= dtypes, (len(FILES), dtypes)


def reference_tensors(path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """{name: (dtype tag, shape, values as float32 / the integer dtype)} from the safetensors package."""
    raw = dict(deserialize(path.read_bytes()))
    out = {}
    with safe_open(str(path), "numpy") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            tag, shape = sl.get_dtype(), list(sl.get_shape())
            if tag == "BF16":
                u16 = np.frombuffer(bytes(raw[name]["data"]), "<u2").reshape(shape)
                values = (u16.astype(np.uint32) << 16).view(np.float32)
            elif tag == "F8_E4M3":
                values = TORCH_E4M3[np.frombuffer(bytes(raw[name]["data"]), np.uint8).reshape(shape)]
            else:
                values = f.get_tensor(name)
                values = values.astype(np.float32) if values.dtype.kind == "f" else values
            out[name] = (tag, shape, values)
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_hand_reader_equals_safetensors_library(path):
    want = reference_tensors(path)
    with safe_open(str(path), "numpy") as f:
        metadata = f.metadata() or {}
    ours = SafetensorsFile(str(path))
    try:
        assert sorted(ours.keys()) == sorted(want) and ours.metadata == metadata
        for name, (tag, shape, values) in want.items():
            assert (ours.dtype(name), list(ours.shape(name))) == (tag, shape), name
            got = ours.read(name)
            assert got.dtype == values.dtype and got.shape == values.shape, name
            np.testing.assert_array_equal(got, values, err_msg=name)
            if shape and shape[0] > 1:  # partial reads (sharded loading) hit the same bytes
                r0, r1 = 1, shape[0]
                np.testing.assert_array_equal(ours.read(name, rows=(r0, r1)), values[r0:r1], err_msg=name)
                index = (slice(0, shape[0] // 2),) + tuple(slice(1, n) for n in shape[1:2])
                np.testing.assert_array_equal(ours.read_slice(name, index), values[index], err_msg=name)
    finally:
        ours.close()
