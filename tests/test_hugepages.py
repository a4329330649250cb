"""Loaded weights sit on 2 MB transparent huge pages (io/hugepages.py), read back from the kernel's
own accounting: /proc/self/smaps AnonHugePages of the mappings holding each weight.

The case that fails without io/hugepages.py: a bf16 load, whose lm_head and embedding MindSpore
allocates itself (a Tensor.view copy) on 4 KB pages, unlike the NumPy arrays NumPy madvises.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from helpers import HF_FIXTURES

from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from qwen3moe.io.hugepages import HUGE, MIN_BYTES, aligned_span

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    return sys.platform.startswith("linux") and THP.is_file() and "[never]" not in THP.read_text()


def _anon_huge_bytes(start: int, length: int) -> int:
    """AnonHugePages of the mappings overlapping [start, start + length)."""
    total, hit = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            hit = lo < start + length and start < hi
        elif hit and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def test_aligned_span_is_the_whole_2mb_pages_inside():
    assert aligned_span(HUGE, 3 * HUGE) == (HUGE, 3 * HUGE)
    assert aligned_span(HUGE + 16, 3 * HUGE) == (2 * HUGE, 2 * HUGE)  # the partial pages at both ends left out
    assert aligned_span(HUGE - 4096, HUGE) == (HUGE, 0)  # straddles a boundary: no whole page
    assert aligned_span(16, MIN_BYTES)[1] >= HUGE  # MIN_BYTES always holds one whole page


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages disabled on this kernel")
def test_bf16_load_puts_large_weights_on_huge_pages(tmp_path):
    # lm_head and embedding [300000, 64] bf16, 38 MB each: above glibc's largest mmap threshold (32 MB),
    # so MindSpore's copies get fresh mappings (smaller ones can reuse heap memory a NumPy array
    # madvised before, and pass by chance); one layer
    cfg = Qwen3MoeConfig.from_pretrained(HF_FIXTURES / "roundtrip-bf16").replace(vocab_size=300000, num_hidden_layers=1)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "m", dtype="bfloat16")
    model = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "m", dtype=None)
    large = [p for p in model.get_parameters() if int(p.size) * p.itemsize >= MIN_BYTES]
    assert {p.name for p in large} == {"model.embed_tokens.weight", "lm_head.weight"}
    for p in large:
        start, length = aligned_span(p.data_ptr(), int(p.size) * p.itemsize)
        assert _anon_huge_bytes(start, length) >= length, p.name
