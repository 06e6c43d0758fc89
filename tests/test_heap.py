"""proto.heap: with its malloc settings, memory a stream message frees is reused by the next one
instead of faulted in afresh (counted in page faults, in a process of its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proto import heap

# Allocates and touches four 4 MiB blocks, then frees them, 20 times on a thread (as gRPC's receive
# threads do with messages):
# prints the minor page faults of the last 10 rounds.
_ROUNDS = """
import json, resource, sys, threading
from proto import heap
if sys.argv[1] == "1":
    assert heap.keep_freed_memory(512 << 20, 32 << 20)
def rounds():
    for i in range(20):
        if i == 10:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [bytearray(4 << 20) for _ in range(4)]  # messages in flight, then all freed
        for block in blocks:
            block[::4096] = b"x" * len(block[::4096])
        del blocks, block
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps(out[0]))
"""


def _faults(keep: bool) -> int:
    done = subprocess.run([sys.executable, "-c", _ROUNDS, "1" if keep else "0"],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = (16 << 20) // 4096 * 10
    assert _faults(keep=False) >= pages // 2  # each round maps and faults in fresh pages
    assert _faults(keep=True) < pages // 10


def test_settings_apply_once_per_process():
    applied = heap.keep_freed_memory(1 << 20, 1 << 20)
    assert heap.keep_freed_memory(2 << 20, 2 << 20) == applied
    if applied:
        assert heap._applied is not None
