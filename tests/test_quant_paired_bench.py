"""bench/quant.py --paired (bench/quant_paired.py): the pure part of the paired decode-b1 A/B with
fake decode timings (no model is loaded): ABBA order, one ratio per round from the two decodes of
that round, their median and the verdict, the memory gate, and the driver's argument handling."""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import quant  # noqa: E402
import quant_paired  # noqa: E402


def test_round_order_is_abba():
    assert [quant_paired.round_order(i, "int8") for i in range(4)] == [
        ("fp32", "int8"), ("int8", "fp32"), ("fp32", "int8"), ("int8", "fp32")]


def test_run_pairs_ratio_per_round_cancels_the_streaming_window():
    # the machine's streaming rate per round (a fast and a slow window): both decodes of a round
    # share it, so every paired ratio is exactly the formats' 1.875 (exact in binary)
    window = [1.0, 0.5, 0.5, 1.0, 0.5]
    calls = []

    def decode(name, seed):
        calls.append((name, seed))
        return {"fp32": 32.0, "bf16": 60.0}[name] * window[seed - 100]

    loads = iter([0.5, 1.0, 1.5, 2.0, 2.5])
    rounds = quant_paired.run_pairs(decode, "bf16", 5, load=lambda: next(loads))
    assert calls == [("fp32", 100), ("bf16", 100), ("bf16", 101), ("fp32", 101), ("fp32", 102),
                     ("bf16", 102), ("bf16", 103), ("fp32", 103), ("fp32", 104), ("bf16", 104)]
    assert [r["first"] for r in rounds] == ["fp32", "bf16", "fp32", "bf16", "fp32"]
    assert [r["load"] for r in rounds] == [0.5, 1.0, 1.5, 2.0, 2.5]
    s = quant_paired.summarize("bf16", rounds)
    assert s["ratios"] == [1.875] * 5 and s["median"] == 1.875 and s["met"] is True
    assert (s["fp32"], s["bf16"]) == (16.0, 30.0)


def test_summarize_median_drops_a_window_switch_and_verdicts():
    # round 3: the window switched between the two decodes (ratio 1.20); the median ignores it
    rounds = [{"fp32": 26.7, "bf16": 26.7 * q} for q in (1.88, 1.92, 1.20, 1.83, 1.87)]
    s = quant_paired.summarize("bf16", rounds)
    assert s["median"] == pytest.approx(1.87) and s["met"] is True and s["target"] == 1.8
    assert s["fp32"] == pytest.approx(26.7)
    assert s["bf16"] == pytest.approx(statistics.median(26.7 * q for q in (1.88, 1.92, 1.20, 1.83, 1.87)))
    low = quant_paired.summarize("int8", [{"fp32": 10.0, "int8": 29.9}] * 3)
    assert low["median"] == pytest.approx(2.99) and low["met"] is False  # target 3.0


def test_paired_lines_text():
    rounds = [{"fp32": 26.7, "bf16": 50.2, "first": "fp32", "load": 1.2},
              {"fp32": 26.5, "bf16": 50.4, "first": "bf16", "load": 1.3},
              {"fp32": 27.0, "bf16": 40.0, "first": "fp32", "load": 1.4}]
    lines = quant_paired.paired_lines("bf16", {"rounds": rounds, "load_before": 0.9, "peak_rss_mb": 14200,
                                                  "rss_mb": 12000, "huge_mb": 11000})
    assert len(lines) == 4
    assert lines[1] == ("  bf16 paired round 2 (bf16 first): fp32 26.5 tok/s, bf16 50.4 tok/s, ratio 1.90, "
                        "1-min load 1.3")
    assert lines[-1] == ("bf16 vs our fp32, paired in one process (3 rounds, ABBA): decode_b1 ratios 1.88 1.90 "
                         "1.48 median 1.88x (fp32 26.7 tok/s, bf16 50.2 tok/s medians) (target >= 1.8x: met); "
                         "1-min load 0.9 before, peak RSS 14200 MB, RSS 12000 MB of which 11000 MB on huge pages")
    short = [dict(r, int4=r["fp32"] * 4.0) for r in rounds]
    lines = quant_paired.paired_lines("int4", {"rounds": short, "load_before": 0, "peak_rss_mb": 0,
                                                  "rss_mb": 0, "huge_mb": 0, "bytes_ratio": 4.5625})
    assert " median 4.00x " in lines[-1] and "(target >= 4.5x: NOT met); weight bytes a token, fp32 / int4: 4.56x;" in lines[-1]
    skip = quant_paired.paired_lines("int8", {"skipped": "MemAvailable 3.0 GiB < 16 GiB"})
    assert skip == ["int8 vs our fp32, paired in one process: SKIPPED: MemAvailable 3.0 GiB < 16 GiB"]


def test_memory_gate():
    text = "MemTotal:       24591140 kB\nMemFree:         1000 kB\nMemAvailable:   16252928 kB\n"
    assert quant_paired.mem_available_gib(text) == pytest.approx(15.5)
    why = quant_paired.skip_reason(15.5)
    assert why and "MemAvailable 15.5 GiB < 16 GiB" in why and "not started" in why
    assert quant_paired.skip_reason(16.0) is None
    assert quant_paired.mem_available_gib() > 0  # this machine's /proc/meminfo parses


def test_driver_paired_only_skips_without_memory(monkeypatch, capsys):
    """`--modes '' --llama '' --paired bf16,int4`: nothing else runs; with too little memory no
    worker starts and the report says why, once per mode."""
    def no_process(*a, **k):
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(quant_paired, "mem_available_gib", lambda meminfo=None: 3.0)
    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(sys, "argv", ["quant.py", "--modes", "", "--llama", "", "--paired", "bf16,int4",
                                      "--no-results"])
    quant.main()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and all("SKIPPED: MemAvailable 3.0 GiB < 16 GiB" in line for line in out)
    assert out[0].startswith("bf16 vs our fp32") and out[1].startswith("int4 vs our fp32")


@pytest.mark.parametrize("args,msg", [(["--paired", "fp32"], "--paired: 'fp32' is not a non-fp32 mode"),
                                      (["--paired", "bf8"], "--paired: 'bf8' is not a non-fp32 mode"),
                                      (["--paired", "bf16", "--pairs", "0"], "--pairs must be >= 1"),
                                      (["--llama", "Q5"], "--llama: unknown 'Q5'")])
def test_driver_bad_arguments(monkeypatch, args, msg):
    monkeypatch.setattr(sys, "argv", ["quant.py", "--modes", "", "--no-results", *args])
    with pytest.raises(SystemExit) as e:
        quant.main()
    assert msg in str(e.value)
