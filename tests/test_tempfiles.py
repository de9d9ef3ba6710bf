"""What a killed hncl process leaves in the temp folder is removed by the next one on the host,
and nothing a running process (or another host) uses is touched."""

import os
import signal
import subprocess
import sys

from hncl.infra import tempfiles

MAKE = """
import os, sys, time
from hncl.infra import tempfiles
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
        other = "0" * 16 if host != "0" * 16 else "1" * 16
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



def test_another_host_with_the_same_host_name_and_pids_is_never_swept(tmp_path, monkeypatch):
    """Two VMs made from one image (same host name, same /etc/machine-id, the same initial pid
    namespace) sharing an NFS temp folder differ only in their boot ids: a leftover of the other
    one, under a pid that is dead here, is not this host's to remove. Where no boot id can be read,
    no death can be proven and nothing is swept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    real_read = tempfiles._read
    monkeypatch.setattr(tempfiles, "_read", lambda p: "boot-of-vm-b" if p.endswith("boot_id") else real_read(p))
    theirs = f"hncl-ckpt-{tempfiles._host()}-{dead}-abc"
    monkeypatch.setattr(tempfiles, "_read", lambda p: "boot-of-vm-a" if p.endswith("boot_id") else real_read(p))
    ours = f"hncl-ckpt-{tempfiles._host()}-{dead}-abc"
    assert ours != theirs
    for name in (ours, theirs):
        (tmp_path / name).mkdir()
    assert tempfiles.sweep_orphans(str(tmp_path)) == [ours]
    (tmp_path / ours).mkdir()
    monkeypatch.setattr(tempfiles, "_read", lambda p: "" if p.endswith("boot_id") else real_read(p))
    assert tempfiles.sweep_orphans(str(tmp_path)) == [] and sorted(os.listdir(tmp_path)) == sorted([ours, theirs])
