"""What a killed hncl process leaves in the temp folder is removed by the next one on the host,
and nothing a running process (or another host) uses is touched."""

import os
import signal
import subprocess
import sys

from hncl import tempfiles

MAKE = """
import os, sys, time
from hncl import tempfiles
folder = tempfiles.mkdtemp("ckpt", dir=sys.argv[1])
open(os.path.join(folder, "model.safetensors"), "wb").write(b"x" * 1000)
fd, part = tempfiles.mkstemp("upload", suffix=".part", dir=sys.argv[1])
print(os.path.basename(folder), os.path.basename(part), flush=True)
time.sleep(600)
"""


def _start(folder):
    proc = subprocess.Popen([sys.executable, "-c", MAKE, str(folder)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().split()


def test_a_killed_process_leftovers_are_swept_and_nothing_in_use_is(tmp_path):
    alive, alive_names = _start(tmp_path)
    killed, killed_names = _start(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        ours = tempfiles.mkdtemp("restore", dir=str(tmp_path))  # this process: running
        host = tempfiles._host()
        other = "0" * 8 if host != "0" * 8 else "1" * 8
        foreign = [f"hncl-ckpt-{other}-{killed.pid}-abc",  # another host's (shared temp folder)
                   "hncl-ckpt-abc",  # not an hncl temp name: not ours to judge
                   f"notes-{host}-{killed.pid}-x.txt"]
        for name in foreign:
            (tmp_path / name).write_text("keep")
        before = set(os.listdir(tmp_path))
        assert set(killed_names) | set(alive_names) <= before  # the killed process did leave them

        removed = tempfiles.sweep_orphans(str(tmp_path))

        assert sorted(removed) == sorted(killed_names)
        assert set(os.listdir(tmp_path)) == before - set(killed_names)
        assert os.path.basename(ours) in before and set(alive_names) <= before and set(foreign) <= before
        assert tempfiles.sweep_orphans(str(tmp_path)) == []  # nothing more, and no error, a second time
    finally:
        alive.kill()
        alive.wait()
    assert sorted(tempfiles.sweep_orphans(str(tmp_path))) == sorted(alive_names)  # once it no longer runs

