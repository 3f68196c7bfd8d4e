"""The tests' forked processes (tests/zygote.py) end as `python` ends: the same exit status,
output and error line for each way a program can end, without the interpreter's teardown."""

import os
import signal
import subprocess
import sys

import pytest

from zygote import python

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # a forked child's: see zygote.AT_RUN
THREAD = "import threading, time\ndef f():\n    time.sleep(0.3)\n    print('joined', flush=True)\nthreading.Thread(target=f).start()"


@pytest.mark.slow
@pytest.mark.parametrize("code, status", [
    ("pass", 0), ("raise SystemExit(3)", 3), ("raise SystemExit('bye')", 1), ("import sys; sys.exit()", 0),
    ("raise SystemExit(256 + 7)", 7), ("raise ValueError('x')", 1), ("raise KeyboardInterrupt", -signal.SIGINT),
    (THREAD, 0), ("import atexit; atexit.register(lambda: print('atexit ran'))", 0),
    ("import sys; sys.stdout.write('unflushed')", 0),
])
def test_a_forked_child_ends_as_python_ends(code, status):
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    forked = python(["-c", code], ENV, timeout=60)
    # Forked from the zygote, not started as a plain process: torch is already imported.
    assert python(["-c", "import sys; print('torch' in sys.modules)"], ENV).stdout == "True\n"
    assert forked.returncode == real.returncode == status
    assert forked.stdout == real.stdout
    assert forked.stderr.strip().splitlines()[-1:] == real.stderr.strip().splitlines()[-1:]
