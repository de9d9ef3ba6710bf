"""hncl's temporary files and folders, named by host and process: hncl-<kind>-<host>-<pid>-...

A process killed from outside (SIGKILL, the OOM killer, a lost node's Ray worker) cannot remove
what it had in the temp folder: a checkpoint being written, a restore download, a shard waiting
for upload. The name says which process on which host made it, so the next hncl process on that
host (every command, every Ray worker) removes what belongs to processes no longer running, and
never what a running one uses, nor another host's (a temp folder shared over NFS): the host part
is unique per boot and pid namespace, so a pid is only judged where it means the same process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import List, Optional, Tuple

log = logging.getLogger(__name__)

_NAME = re.compile(r"^hncl-[a-z0-9_]+-([0-9a-f]{16})-(\d+)-")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _host() -> Optional[str]:
    """Who can judge whether a pid in a temp name still runs: this boot of this kernel (its random
    boot id: two VMs, or two boots, never share one) and this pid namespace (containers sharing a
    kernel and a temp folder do not share pids), with the machine id and host name. None where the
    boot id cannot be read (not Linux): then nothing is ever swept, as no death can be proven."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    if not boot:
        return None
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = ""
    machine = _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id")
    who = f"{boot} {pid_namespace} {machine} {socket.gethostname()}"
    return hashlib.blake2b(who.encode(), digest_size=8).hexdigest()


def _prefix(kind: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"temp file kind must be lower-case letters, digits or _: {kind!r}")
    return f"hncl-{kind}-{_host() or '0' * 16}-{os.getpid()}-"  # the pid now, not at import: Ray forks workers


def mkdtemp(kind: str, dir: Optional[str] = None) -> str:
    return tempfile.mkdtemp(prefix=_prefix(kind), dir=dir)


def mkstemp(kind: str, suffix: str = "", dir: Optional[str] = None) -> Tuple[int, str]:
    return tempfile.mkstemp(prefix=_prefix(kind), suffix=suffix, dir=dir)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


_swept_in: Optional[int] = None


def sweep_orphans_once() -> None:
    """sweep_orphans() of the temp folder, once per process (every entry point calls it)."""
    global _swept_in
    if _swept_in != os.getpid():
        _swept_in = os.getpid()
        sweep_orphans()


def sweep_orphans(folder: Optional[str] = None) -> List[str]:
    """Remove what hncl processes of this host that no longer run left in `folder` (the temp
    folder by default). Returns the names removed; never fails (a race with another sweeper, a
    file that cannot be removed: it stays)."""
    folder = folder or tempfile.gettempdir()
    host, removed = _host(), []
    if host is None:
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        m = _NAME.match(name)
        if m is None or m.group(1) != host or _running(int(m.group(2))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
    if removed:
        log.info("removed %d temporary item(s) left in %s by hncl processes that no longer run: %s",
                 len(removed), folder, ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed
