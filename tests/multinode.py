"""A real two-node Ray cluster on one machine, for the multi-node tests (and by hand).

Ray keeps the node IP given to `ray start --node-ip-address` for any 127.x.y.z except
127.0.0.1, so a head at 127.0.0.2 and a second node at 127.0.0.3 are two nodes to Ray and to
Ray Train (node_rank 0 and 1). Each node gets its own --temp-dir, its own free port for every
service (raylet and GCS listen on all interfaces, and Ray's fixed default ports belong to
whichever Ray on the machine started first), one CPU and a small object store.

Node 2 runs in a mount namespace of its own (`unshare -m`) where the kernel allows one (root, or
unprivileged user namespaces), which makes it a different machine in two controlled ways:
- `private/` (under the cluster's folder) is a tmpfs of its own there: a disk the head does not
  share. Everything else on the machine is shared, as a cluster's shared filesystem would be.
- its /etc/hosts maps this machine's host name to 127.0.0.9, where nothing listens: an S3
  endpoint addressed by host name (http://HOSTNAME:PORT) is reachable from the head and not
  from node 2.
Without a namespace (`isolated` False) node 2 shares every disk and name with the head: only the
tests of those two cases cannot run.

Never `ray stop` here (it stops every Ray on the machine): `stop()` and `kill_node2()` SIGKILL
exactly this cluster's processes (their process groups, the processes whose command line names
the node's temp dir, and all their descendants: workers rename themselves and run in groups of
their own).

By hand (prints the environment to use, Ctrl-C tears it down):

    PYTHONPATH=. python tests/multinode.py
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
UNREACHABLE_IP = "127.0.0.9"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # Ray's default is ~30% of the machine's memory per node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_port_flags() -> List[str]:
    """A free port for each service a node listens on (beside the head's GCS and dashboard)."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [f"{flag}={free_port()}" for flag in flags]


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(pid))
    return kids


def _processes_of(pgid: Optional[int], marker: str) -> Set[int]:
    """Every process in group `pgid` or whose command line mentions `marker`, and their descendants."""
    roots = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if pgid is not None and os.getpgid(int(pid)) == pgid:
                roots.add(int(pid))
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    roots.add(int(pid))
        except (OSError, ProcessLookupError):
            pass
    kids, out, todo = _children(), set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, []))
    return out


def kill_processes(pgid: Optional[int], marker: str) -> None:
    for _ in range(100):
        pids = _processes_of(pgid, marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes of {marker} survive SIGKILL: {sorted(_processes_of(pgid, marker))}")


def unshare_argv() -> Optional[List[str]]:
    """How to give node 2 a mount namespace of its own here: `unshare -m` (root), else in a user
    namespace of its own (`unshare -r -m`, where unprivileged user namespaces are allowed), else
    None (the multi-node tests skip)."""
    for argv in (["unshare", "-m", "--propagation", "private"], ["unshare", "-r", "-m", "--propagation", "private"]):
        try:
            if subprocess.run(argv + ["sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                              timeout=30).returncode == 0:
                return argv
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


class TwoNodeCluster:
    """Head 127.0.0.2 (GCS, dashboard, 1 CPU) + node 127.0.0.3 (1 CPU, own mount namespace)."""

    def __init__(self, extra_env: Optional[Dict[str, str]] = None, head_cpus: int = 1):
        self.head_cpus = head_cpus
        # short: Ray's unix sockets live under the temp dirs (108-byte limit)
        self.root = tempfile.mkdtemp(prefix="hncl-mn-", dir="/tmp")
        self.private = os.path.join(self.root, "private")  # node 2's own disk
        os.makedirs(self.private)
        self.hostname = socket.gethostname()
        self.hosts_file = os.path.join(self.root, "hosts-node2")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.dashboard = f"http://{HEAD_IP}:{self.dashboard_port}"
        bin_dir = os.path.dirname(sys.executable)
        self.ray = os.path.join(bin_dir, "ray")
        # for drivers (tests' subprocesses, `ray job submit`): this process's environment and the cluster
        self.env = dict(os.environ, **(extra_env or {}), RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled",
                        OMP_NUM_THREADS="1", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
        # the nodes know no S3 endpoint or credentials: a job's workers get the driver's (forwarded)
        self.node_env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
        self.pgids: Dict[str, int] = {}
        self.unshare = unshare_argv()
        self.isolated = self.unshare is not None  # node 2 has a disk and host names of its own
        self._write_hosts()

    def _write_hosts(self) -> None:
        with open("/etc/hosts") as f:
            lines = [ln for ln in f.read().splitlines() if self.hostname not in ln.split()[1:]]
        with open(self.hosts_file, "w") as f:
            f.write("\n".join(lines + [f"{UNREACHABLE_IP} {self.hostname}"]) + "\n")

    def temp_dir(self, node: str) -> str:
        return os.path.join(self.root, node)

    def _start(self, name: str, argv: List[str]) -> None:
        proc = subprocess.Popen(argv, env=self.node_env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` of {name} failed:\n{out[-3000:]}")
        self.pgids[name] = proc.pid

    def start_head(self) -> None:
        self._start("head", [
            self.ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
            f"--dashboard-port={self.dashboard_port}", f"--dashboard-host={HEAD_IP}", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}", f"--num-cpus={self.head_cpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats", f"--temp-dir={self.temp_dir('head')}", *node_port_flags()])

    def start_node2(self) -> None:
        """Node 2, in its own mount namespace where possible: a private tmpfs over `private/`, its
        own /etc/hosts."""
        setup = 'mount -t tmpfs tmpfs "$HNCL_PRIVATE" && mount --bind "$HNCL_HOSTS" /etc/hosts && exec "$0" "$@"'
        self.node_env.update(HNCL_PRIVATE=self.private, HNCL_HOSTS=self.hosts_file)
        isolate = [*self.unshare, "sh", "-c", setup] if self.isolated else []
        self._start("node2", [
            *isolate,
            self.ray, "start", f"--address={self.address}", f"--node-ip-address={NODE2_IP}", "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir('node2')}", *node_port_flags()])

    def kill_node2(self) -> None:
        """SIGKILL node 2's raylet, agents and workers: a node lost without warning."""
        kill_processes(self.pgids.pop("node2", None), self.temp_dir("node2"))

    def alive_nodes(self) -> List[str]:
        """IPs of the nodes the GCS counts as alive (state API, through the head's dashboard)."""
        from ray.util.state import list_nodes

        return sorted(n.node_ip for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")],
                                                       raise_on_missing_output=False))

    def wait_for(self, ips: List[str], timeout: float = 120) -> None:
        deadline, seen = time.time() + timeout, None
        while time.time() < deadline:
            try:
                seen = self.alive_nodes()
                if seen == sorted(ips):
                    return
            except Exception as e:  # the dashboard is still starting
                seen = repr(e)[:200]
            time.sleep(0.5)
        raise TimeoutError(f"alive nodes {seen}, expected {sorted(ips)}")

    def ensure_node2(self) -> None:
        """Both nodes alive (node 2 restarted if a test left it dead)."""
        if not _processes_of(self.pgids.get("node2"), self.temp_dir("node2")):
            self.kill_node2()
            self.start_node2()
        self.wait_for([HEAD_IP, NODE2_IP])

    def start(self) -> "TwoNodeCluster":
        try:
            self.start_head()
            self.start_node2()
            self.wait_for([HEAD_IP, NODE2_IP])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.kill_node2()
        kill_processes(self.pgids.pop("head", None), self.temp_dir("head"))
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    cluster = TwoNodeCluster().start()
    print(f"two nodes up ({cluster.root}):\n  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=disabled\n"
          f"  dashboard / job submission: {cluster.dashboard}\n  node 2's private disk: {cluster.private}\n"
          f"Ctrl-C stops exactly these processes.", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
