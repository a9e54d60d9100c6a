"""K emulated "nodes" on one Linux machine: network namespaces joined by a rate-limited bridge.

Each node is a network namespace ``moesim-n<i>-<pid>`` with one veth; the veth's outer end sits on
the bridge ``msbr<pid>`` in the root namespace. Addresses come from the benchmarking range
198.18.0.0/15 (198.18.0.1, .2, ... /24), so nothing outside the namespaces created here is ever
addressed. A ``tbf`` qdisc caps each node's egress (optionally behind a ``netem`` delay), which
makes traffic between nodes slow, like a NIC, while ranks inside one node talk over the kernel's
local path, like NVLink. The effective inter-node rate is below the tc setting (TCP and gloo
overheads), so it must be measured, not assumed.

Ranks are started with ``ip netns exec`` and the env a torch launcher would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=198.18.0.1, MASTER_PORT, GLOO_SOCKET_IFNAME, MOESIM_NODE_ID,
OMP_NUM_THREADS=1). Everything is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP.
Needs root and iproute2 (``ip``, ``tc``). Only the standard library is imported.

CLI: ``python emulated_cluster.py --nodes 2 --ranks-per-node 2 --rate 400mbit -- python
moe_layer.py CONFIG.json``: rank 0's stdout goes to stdout, everything else to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["EmulatedClusterError", "RankResult", "EmulatedCluster", "remove_stale", "main"]

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
_RATE_BYTES = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
               "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}
_DELAY = re.compile(r"^\d+(?:\.\d+)?(us|ms|s)$")
_INSTALL = "install iproute2 (Debian/Ubuntu: `apt-get install -y iproute2`)"


class EmulatedClusterError(RuntimeError):
    """The emulated cluster cannot be built or a run failed to finish."""


@dataclass(frozen=True)
class RankResult:
    """What one launched rank left behind."""

    rank: int
    node: int
    returncode: int
    stdout: str
    stderr: str


def rate_bytes_per_s(rate: str) -> float:
    """Bytes/s of a tc rate string such as ``"400mbit"`` (bits) or ``"50mbps"`` (bytes)."""
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise EmulatedClusterError(f"rate={rate!r} is not a tc rate; use e.g. '400mbit', '1gbit'")
    return float(m.group(1)) * _RATE_BYTES[m.group(2)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise EmulatedClusterError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _require_tools() -> None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise EmulatedClusterError(f"emulated cluster needs {missing} on PATH: {_INSTALL}")
    if os.geteuid() != 0:
        raise EmulatedClusterError("emulated cluster needs root (CAP_NET_ADMIN) to create "
                                   "network namespaces, veths and a bridge")


def remove_stale() -> list[str]:
    """Delete namespaces and bridges left by emulated clusters whose process has died.

    Returns the names removed. Only names of the form ``moesim-n<i>-<pid>`` / ``msbr<pid>`` are
    touched, and only when no process ``<pid>`` exists.
    """
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"^(moesim-n\d+-(\d+))\b", line)
        if m and not _alive(int(m.group(2))):
            _ip("netns", "del", m.group(1), check=False)
            removed.append(m.group(1))
    for m in re.finditer(r"^\d+: (msbr(\d+))[:@]", _ip("-o", "link").stdout, re.M):
        if not _alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmulatedCluster:
    """``nodes`` namespaces on a shaped bridge; ``run`` launches ``ranks_per_node`` ranks in each.

    Use as a context manager: ``with EmulatedCluster(2, 2, rate="400mbit") as c: c.run(cmd)``.
    ``rate=None`` leaves links unshaped; ``delay`` (e.g. ``"1ms"``) adds netem latency on egress.
    """

    def __init__(self, nodes: int = 2, ranks_per_node: int = 1, rate: str | None = "400mbit",
                 delay: str | None = None, master_port: int = 29500):
        if not 1 <= nodes <= 250:
            raise EmulatedClusterError(f"nodes={nodes} must be in [1, 250]")
        if ranks_per_node < 1:
            raise EmulatedClusterError(f"ranks_per_node={ranks_per_node} must be >= 1")
        if rate is not None:
            rate_bytes_per_s(rate)
        if delay is not None and not _DELAY.match(delay):
            raise EmulatedClusterError(f"delay={delay!r}; use e.g. '500us', '1ms'")
        self.nodes, self.ranks_per_node = nodes, ranks_per_node
        self.rate, self.delay, self.master_port = rate, delay, master_port
        pid = os.getpid()
        self.bridge = f"msbr{pid}"
        self.namespaces = [f"moesim-n{i}-{pid}" for i in range(nodes)]
        self.outer = [f"ms{pid}h{i}" for i in range(nodes)]  # bridge side (root namespace)
        self.inner = [f"ms{pid}n{i}" for i in range(nodes)]  # inside namespace i
        self.addresses = [f"198.18.0.{i + 1}" for i in range(nodes)]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._old_handlers: dict[int, Any] = {}
        self._up = False

    # ---- lifecycle ----

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create bridge, namespaces, veths, addresses and qdiscs (undone if any step fails)."""
        _require_tools()
        atexit.register(self.close)
        self._install_signal_handlers()
        self._up = True
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(self.nodes):
                self._add_node(i)
        except BaseException:
            self.close()
            raise

    def _add_node(self, i: int) -> None:
        ns, outer, inner = self.namespaces[i], self.outer[i], self.inner[i]
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        self._shape(ns, inner)

    def _shape(self, ns: str, dev: str) -> None:
        """Egress of ``dev``: [netem delay] -> tbf rate. Burst >= one 64 KiB GSO segment."""
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev]
        cmds = []
        parent = ["root"]
        if self.delay is not None:
            cmds.append(("sch_netem", [*tc, "root", "handle", "1:", "netem", "delay", self.delay]))
            parent = ["parent", "1:"]
        if self.rate is not None:
            burst = max(128 * 1024, int(rate_bytes_per_s(self.rate) * 0.004))
            cmds.append(("sch_tbf", [*tc, *parent, "handle", "2:", "tbf", "rate", self.rate,
                                     "burst", str(burst), "latency", "200ms"]))
        for module, cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise EmulatedClusterError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()} "
                                           f"(the kernel needs the {module} qdisc module)")

    def close(self) -> None:
        """Kill launched processes, delete namespaces, veths and bridge. Safe to call twice."""
        self._kill_all()
        if self._up:
            self._up = False
            for ns in self.namespaces:
                _ip("netns", "del", ns, check=False)  # also deletes the veth pair
            for outer in self.outer:
                _ip("link", "del", outer, check=False)
            _ip("link", "del", self.bridge, check=False)
        self._restore_signal_handlers()
        atexit.unregister(self.close)

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.close()
            previous = self._old_handlers.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: rely on try/finally and atexit
            self._old_handlers.clear()

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _kill_all(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self._procs:
            p.wait()
        self._procs = []

    # ---- running ranks ----

    def rank_env(self, rank: int) -> dict[str, str]:
        """Environment of global rank ``rank`` (node = rank // ranks_per_node)."""
        node, local = divmod(rank, self.ranks_per_node)
        return {"RANK": str(rank), "WORLD_SIZE": str(self.nodes * self.ranks_per_node),
                "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
                "NODE_RANK": str(node), "MOESIM_NODE_ID": str(node),
                "MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(self.master_port),
                "GLOO_SOCKET_IFNAME": self.inner[node], "OMP_NUM_THREADS": "1"}

    def run(self, cmd: list[str], timeout: float = 600.0,
            env: dict[str, str] | None = None) -> list[RankResult]:
        """Launch ``cmd`` once per rank inside its node's namespace; wait for all.

        If a rank fails, the others get 5 s to finish before they are killed (a collective
        would otherwise wait for the dead rank forever). Raises EmulatedClusterError on timeout.
        Returns one RankResult per rank, in rank order.
        """
        if not self._up:
            raise EmulatedClusterError("cluster is not started; use `with EmulatedCluster(...)`")
        world = self.nodes * self.ranks_per_node
        with tempfile.TemporaryDirectory(prefix="emulated_cluster_") as tmp, \
                contextlib.ExitStack() as stack:
            files = []
            for rank in range(world):
                out, err = (stack.enter_context(open(os.path.join(tmp, f"{rank}.{k}"), "w+b"))
                            for k in "oe")
                files.append((out, err))
                full_env = os.environ | (env or {}) | self.rank_env(rank)
                ns = self.namespaces[rank // self.ranks_per_node]
                self._procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=err, env=full_env,
                    start_new_session=True))
            try:
                timed_out = self._wait(time.monotonic() + timeout)
                codes = [p.returncode if p.returncode is not None else -9 for p in self._procs]
            finally:
                self._kill_all()
            results = [RankResult(r, r // self.ranks_per_node, codes[r], *_read(files[r]))
                       for r in range(world)]
        if timed_out:
            tails = "\n".join(f"[rank {r.rank}] {r.stderr[-500:]}" for r in results)
            raise EmulatedClusterError(f"ranks did not finish within {timeout} s:\n{tails}")
        return results

    def _wait(self, deadline: float) -> bool:
        """Poll until every rank exits; True if the deadline passed first."""
        first_failure: float | None = None
        while True:
            codes = [p.poll() for p in self._procs]
            if all(c is not None for c in codes):
                return False
            now = time.monotonic()
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = now
            if first_failure is not None and now - first_failure > 5.0:
                return False  # survivors are stuck in a collective with a dead rank
            if now > deadline:
                return True
            time.sleep(0.05)


def _read(pair: tuple[Any, Any]) -> tuple[str, str]:
    texts = []
    for f in pair:
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
    return texts[0], texts[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=1)
    ap.add_argument("--rate", default="400mbit", help="egress cap per node, tc syntax; 'none'")
    ap.add_argument("--delay", default=None, help="netem delay on egress, e.g. 1ms")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- python script.py args...")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to launch after --")
    rate = None if args.rate.lower() == "none" else args.rate
    with EmulatedCluster(args.nodes, args.ranks_per_node, rate, args.delay) as cluster:
        results = cluster.run(cmd, timeout=args.timeout)
    for r in results:
        if r.rank == 0:
            sys.stdout.write(r.stdout)
        else:
            sys.stderr.write("".join(f"[rank {r.rank} stdout] {ln}\n"
                                     for ln in r.stdout.splitlines()))
        sys.stderr.write("".join(f"[rank {r.rank}] {ln}\n" for ln in r.stderr.splitlines()))
    failed = [r.rank for r in results if r.returncode != 0]
    if failed:
        sys.stderr.write(f"ranks {failed} failed (codes "
                         f"{[results[r].returncode for r in failed]})\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
