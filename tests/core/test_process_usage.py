"""A run's usage counts every process of it, the grandchildren of a pool included."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from setlist.core.process_usage import TreeUsage

# A parent that starts a worker (as data-etl's pool does) and waits for it: the worker
# holds ~200 MiB and burns 1.5 s of CPU; the parent itself does nothing.
PARENT = textwrap.dedent(
    """
    import subprocess, sys
    worker = '''
    import time
    block = bytearray(200 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    while time.process_time() < 1.5:
        pass
    time.sleep(0.6)
    '''
    sys.stdin.readline()
    subprocess.run([sys.executable, "-c", worker], check=True)
    """
)


def test_the_tree_counts_its_children_cpu_and_memory():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, text=True)
    try:
        sampler = TreeUsage(parent.pid, interval_s=0.1).start()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        parent.wait(timeout=120)
        usage = sampler.stop()
    finally:
        parent.kill()
    assert parent.returncode == 0
    assert usage.cpu_s >= 1.4  # the worker's CPU, not just the idle parent's
    assert usage.max_rss_mib >= 200
    assert usage.processes >= 2


def test_a_tree_of_one_idle_process_uses_little():
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        sampler = TreeUsage(idle.pid, interval_s=0.1).start()
        time.sleep(0.5)
        usage = sampler.stop()
    finally:
        idle.kill()
    assert usage.processes == 1 and usage.cpu_s < 1.0 and usage.max_rss_mib < 100
