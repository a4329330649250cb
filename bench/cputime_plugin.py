"""pytest plugin: per-test wall time and CPU time, for measuring the suite on a shared machine.

    PYTHONPATH=bench CPUTIME_OUT=/tmp/cputime.tsv python -m pytest -p cputime_plugin -m "not slow" tests

Appends one line per test to $CPUTIME_OUT: node id, wall s, CPU s of pytest itself, CPU s of
its waited-for child processes (subprocess CLI runs, msrun and its workers), 1-min load. Under
load the wall time stretches but the CPU time does not, so CPU is what compares across runs.
"""
from __future__ import annotations

import os
import resource
import time

import pytest


def _cpu() -> tuple[float, float]:
    own, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall0, (own0, kids0) = time.time(), _cpu()
    yield
    wall1, (own1, kids1) = time.time(), _cpu()
    with open(os.environ.get("CPUTIME_OUT", "cputime.tsv"), "a") as f:
        f.write(f"{item.nodeid}\t{wall1 - wall0:.2f}\t{own1 - own0:.2f}\t{kids1 - kids0:.2f}\t"
                f"{os.getloadavg()[0]:.1f}\n")
