"""Helpers shared by the benchmark scripts: ports, processes, CPU and memory
read from /proc. Everything runs on 127.0.0.1 with OS-chosen ports."""

import os
import sys
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINKGATE = os.environ.get("LINKGATE_BIN") or os.path.join(ROOT, "target", "release", "linkgate")
LOADGEN = os.path.join(ROOT, "target", "release", "linkgate-loadgen")


def require_release_build(loadgen=False):
    """Exits with the build command unless the release binaries exist."""
    needed = [LINKGATE] + ([LOADGEN] if loadgen else [])
    if not all(os.path.exists(binary) for binary in needed):
        sys.exit("build first: cargo build --release -p linkgate" + (" -p linkgate-loadgen" if loadgen else ""))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid):
    """utime+stime of pid and of its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11..14] = utime stime cutime cstime (stat fields 14-17)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Relay:
    def __init__(self, name, argv, port, tmp, env=None):
        self.name, self.port = name, port
        log = open(os.path.join(tmp, f"{name}.log"), "w+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=tmp)
        try:
            wait_port(port)
        except RuntimeError:
            self.stop()
            log.seek(0)
            raise RuntimeError(f"{name} did not start: {log.read()}")

    def pids(self):
        return [self.proc.pid] + children(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()




def tree_cpu_seconds(pid):
    """CPU of pid, its reaped children, and its live descendants (sshd and
    socat fork a process per connection)."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += tree_cpu_seconds(child)
        except OSError:
            pass
    return total


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def time_wait_sockets():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def wait_for_time_wait_drain(limit=1000, timeout=75):
    """Connection-rate runs leave tens of thousands of sockets in TIME_WAIT,
    which can exhaust the ephemeral ports that tests bind; wait them out."""
    deadline = time.time() + timeout
    while time_wait_sockets() > limit and time.time() < deadline:
        time.sleep(1)


def add_pin_option(parser):
    """--no-pin: by default the server under test runs on CPU 0 and the
    load on CPU 1, so no server competes with the load for its core."""
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the server under test and the load share both CPUs")


def cpu_placement(args):
    """(prefix for the server under test, prefix for the load): taskset
    commands when pinned, empty lists when not."""
    if not args.pin:
        return [], []
    if os.cpu_count() < 2:
        sys.exit("pinning needs two CPUs; use --no-pin")
    return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
