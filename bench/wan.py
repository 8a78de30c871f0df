#!/usr/bin/env python3
"""A narrow office WAN shared by a bulk download and a keystroke-sized echo.

Two network namespaces stand for two offices, joined through a third, the
WAN router, whose egress on each side is a 20 Mbit/s token bucket filter
with one 256 KB FIFO (the way a DSL modem queues). No propagation delay is added (this kernel has
no netem): what is measured is queueing, which is what a shared WAN adds. The main office (namespace
`lgwan-main`) runs the servers: a bulk source that writes as fast as it
may, and an echo server. The branch (namespace `lgwan-branch`) runs the
clients. Each tunnel carries both through the WAN:

- linkgate, one link, without `bandwidth`
- linkgate, one link, `[[peer]] bandwidth` at 90% of the WAN rate on both ends
- ssh -L (one SSH connection, aes128-gcm@openssh.com)
- stunnel (a TLS connection per client)
- rathole (Noise transport, a data connection per client; skipped when
  `rathole` is not on PATH: `cargo install rathole`)

Per tunnel: the bulk download runs alone for 2 s, then a 64-byte echo every
20 ms for --seconds; the bulk rate over that time and the echo's round
trips (p50/p95/p99) are reported; the idle echo is measured first.

Usage (as root): python3 bench/wan.py [--seconds 10] [--rate 20mbit] [--cc cubic|bbr]
Needs: iproute2, iperf3 is not needed; stunnel4, openssh-server, openssl.
Follows DEVELOPERS.md: the namespaces' subnet is blackholed in the root
namespace first, never addressed from outside, and everything is removed
at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import LINKGATE, require_release_build  # noqa: E402

MAIN, BRANCH, WAN = "lgwan-main", "lgwan-branch", "lgwan-router"
SUBNETS = ("10.213.77.0/24", "10.213.78.0/24")
BRANCH_IP, MAIN_IP = "10.213.77.1", "10.213.78.2"
BULK_PORT, ECHO_PORT = 9001, 9002
PASSWORD = "wan bench password"
AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan_agent.py")


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def in_ns(ns, args):
    return ["ip", "netns", "exec", ns] + list(args)


class Net:
    """The two offices and the WAN between them."""

    def __init__(self, rate, cc="cubic"):
        self.rate, self.cc = rate, cc

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self):
        for subnet in SUBNETS:
            sh("ip", "route", "add", "blackhole", subnet)
        for ns in (MAIN, BRANCH, WAN):
            sh("ip", "netns", "add", ns)
            sh(*in_ns(ns, ["ip", "link", "set", "lo", "up"]))
        sh(*in_ns(WAN, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        for ns in (MAIN, BRANCH):
            # Not permitted in some sandboxes: then the host's default stays.
            sh(*in_ns(ns, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={self.cc}"]), check=False)
        self.cc = sh(*in_ns(MAIN, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"])).stdout.strip()
        print(f"TCP congestion control in the offices: {self.cc}", flush=True)
        # branch <-> router <-> main; the router's egress on each side is
        # the WAN: a separate box, as a modem is, so the senders' own TCP
        # stacks get no back-pressure from its queue.
        sh("ip", "link", "add", "lgw-b", "netns", BRANCH, "type", "veth", "peer", "name", "lgw-rb", "netns", WAN)
        sh("ip", "link", "add", "lgw-m", "netns", MAIN, "type", "veth", "peer", "name", "lgw-rm", "netns", WAN)
        for ns, dev, addr in ((BRANCH, "lgw-b", BRANCH_IP + "/24"), (WAN, "lgw-rb", "10.213.77.2/24"),
                              (WAN, "lgw-rm", "10.213.78.1/24"), (MAIN, "lgw-m", MAIN_IP + "/24")):
            sh(*in_ns(ns, ["ip", "addr", "add", addr, "dev", dev]))
            sh(*in_ns(ns, ["ip", "link", "set", dev, "up"]))
            sh(*in_ns(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"]), check=False)
        sh(*in_ns(BRANCH, ["ip", "route", "add", "default", "via", "10.213.77.2"]))
        sh(*in_ns(MAIN, ["ip", "route", "add", "default", "via", "10.213.78.1"]))
        for dev in ("lgw-rb", "lgw-rm"):
            sh(*in_ns(WAN, ["tc", "qdisc", "add", "dev", dev, "root", "tbf",
                            "rate", self.rate, "burst", "16kb", "limit", "256kb"]))

    def __exit__(self, *exc):
        for ns in (MAIN, BRANCH, WAN):
            sh("ip", "netns", "del", ns, check=False)
        for subnet in SUBNETS:
            sh("ip", "route", "del", "blackhole", subnet, check=False)


class Procs:
    """Processes started for one tunnel, stopped by PID."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []

    def start(self, ns, name, args, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        proc = subprocess.Popen(in_ns(ns, args), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                env=dict(os.environ, **(env or {})))
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


def wait_echo(port, timeout=20):
    """Waits until an echo round trip works through the branch's `port`."""
    out = sh(*in_ns(BRANCH, ["python3", AGENT, "wait", str(port), str(timeout)]), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"tunnel on port {port} did not come up: {out.stdout}{out.stderr}")


def linkgate(tmp, procs, bandwidth=None):
    pace = f'bandwidth = "{bandwidth}"\n' if bandwidth else ""
    hub = os.path.join(tmp, "hub.toml")
    with open(hub, "w") as f:
        f.write(f'''[gateway]
name = "main"
identity = "hub.key"
shutdown_grace = "1s"
[link]
listen = "{MAIN_IP}:7000"
[[peer]]
name = "branch"
password = "{PASSWORD}"
{pace}
[[service]]
name = "bulk"
type = "mapping"
listen = "link"
target = "127.0.0.1:{BULK_PORT}"
allow = "peer:branch"
[[service]]
name = "echo"
type = "mapping"
listen = "link"
target = "127.0.0.1:{ECHO_PORT}"
allow = "peer:branch"
''')
    spoke = os.path.join(tmp, "spoke.toml")
    with open(spoke, "w") as f:
        f.write(f'''[gateway]
name = "branch"
shutdown_grace = "1s"
[[peer]]
name = "main"
connect = "{MAIN_IP}:7000"
password = "{PASSWORD}"
{pace}
[[service]]
name = "bulk"
type = "mapping"
listen = "127.0.0.1:2001"
target = "link://main/bulk"
[[service]]
name = "echo"
type = "mapping"
listen = "127.0.0.1:2002"
target = "link://main/echo"
''')
    env = {"RUST_LOG": "warn"}
    procs.start(MAIN, "linkgate-main", [LINKGATE, "run", "-c", hub], env)
    time.sleep(0.5)
    procs.start(BRANCH, "linkgate-branch", [LINKGATE, "run", "-c", spoke], env)
    return 2001, 2002


def ssh(tmp, procs):
    host_key, user_key = os.path.join(tmp, "host_key"), os.path.join(tmp, "user_key")
    for key in (host_key, user_key):
        if not os.path.exists(key):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    authorized = os.path.join(tmp, "authorized_keys")
    shutil.copy(user_key + ".pub", authorized)
    os.chmod(authorized, 0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    conf = os.path.join(tmp, "sshd_config")
    with open(conf, "w") as f:
        f.write(f"Port 22\nListenAddress {MAIN_IP}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                "AllowTcpForwarding yes\nCiphers aes128-gcm@openssh.com\nPidFile none\n")
    procs.start(MAIN, "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", conf])
    time.sleep(0.5)
    procs.start(BRANCH, "ssh", ["ssh", "-N", "-i", user_key, "-c", "aes128-gcm@openssh.com",
                                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                                "-L", f"127.0.0.1:3001:127.0.0.1:{BULK_PORT}",
                                "-L", f"127.0.0.1:3002:127.0.0.1:{ECHO_PORT}", f"root@{MAIN_IP}"])
    return 3001, 3002


def stunnel(tmp, procs):
    pem = os.path.join(tmp, "stunnel.pem")
    if not os.path.exists(pem):
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-subj", "/CN=bench", "-days", "1", "-keyout", pem, "-out", pem)
    server, client = os.path.join(tmp, "stunnel-server.conf"), os.path.join(tmp, "stunnel-client.conf")
    with open(server, "w") as f:
        f.write(f"foreground = yes\npid =\nsslVersion = TLSv1.3\ncert = {pem}\n"
                f"[bulk]\naccept = {MAIN_IP}:4433\nconnect = 127.0.0.1:{BULK_PORT}\n"
                f"[echo]\naccept = {MAIN_IP}:4434\nconnect = 127.0.0.1:{ECHO_PORT}\n")
    with open(client, "w") as f:
        f.write("foreground = yes\npid =\nclient = yes\nsslVersion = TLSv1.3\n"
                f"[bulk]\naccept = 127.0.0.1:4001\nconnect = {MAIN_IP}:4433\n"
                f"[echo]\naccept = 127.0.0.1:4002\nconnect = {MAIN_IP}:4434\n")
    procs.start(MAIN, "stunnel-server", ["stunnel", server])
    procs.start(BRANCH, "stunnel-client", ["stunnel", client])
    return 4001, 4002


def rathole(tmp, procs):
    keys = sh("rathole", "--genkey").stdout.split()
    private, public = keys[keys.index("Private") + 2], keys[keys.index("Public") + 2]
    # rathole's server exposes the ports (in the branch); its client sits
    # beside the services (in the main office) and dials out.
    server, client = os.path.join(tmp, "rathole-server.toml"), os.path.join(tmp, "rathole-client.toml")
    with open(server, "w") as f:
        f.write(f'''[server]
bind_addr = "{BRANCH_IP}:2333"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "{private}"
[server.services.bulk]
token = "bench"
bind_addr = "127.0.0.1:5001"
[server.services.echo]
token = "bench"
bind_addr = "127.0.0.1:5002"
''')
    with open(client, "w") as f:
        f.write(f'''[client]
remote_addr = "{BRANCH_IP}:2333"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "{public}"
[client.services.bulk]
token = "bench"
local_addr = "127.0.0.1:{BULK_PORT}"
[client.services.echo]
token = "bench"
local_addr = "127.0.0.1:{ECHO_PORT}"
''')
    env = {"RUST_LOG": "warn"}
    procs.start(BRANCH, "rathole-server", ["rathole", "-s", server], env)
    time.sleep(0.5)
    procs.start(MAIN, "rathole-client", ["rathole", "-c", client], env)
    return 5001, 5002


def measure(bulk_port, echo_port, seconds):
    out = sh(*in_ns(BRANCH, ["python3", AGENT, "measure", str(bulk_port), str(echo_port), str(seconds)]))
    return json.loads(out.stdout)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", default="20mbit", help="WAN rate each way, as tc writes it")
    parser.add_argument("--bandwidth", default="18Mbit/s", help="linkgate's [[peer]] bandwidth (90%% of the WAN)")
    parser.add_argument("--only", default="", help="comma-separated tunnel names to run")
    parser.add_argument("--cc", default="cubic", help="TCP congestion control in both offices (Linux's default: cubic)")
    args = parser.parse_args()
    require_release_build()
    tunnels = [
        ("linkgate", lambda tmp, p: linkgate(tmp, p)),
        ("linkgate bandwidth", lambda tmp, p: linkgate(tmp, p, args.bandwidth)),
        ("ssh -L", ssh),
        ("stunnel", stunnel),
    ]
    if shutil.which("rathole"):
        tunnels.append(("rathole", rathole))
    else:
        print("rathole not on PATH: skipped (cargo install rathole)")
    if args.only:
        wanted = args.only.split(",")
        tunnels = [t for t in tunnels if t[0] in wanted]
    results = {}
    with tempfile.TemporaryDirectory() as tmp, Net(args.rate, args.cc) as net:
        servers = subprocess.Popen(in_ns(MAIN, ["python3", AGENT, "serve", str(BULK_PORT), str(ECHO_PORT)]))
        try:
            for name, start in tunnels:
                procs = Procs(tmp)
                try:
                    bulk, echo = start(tmp, procs)
                    wait_echo(echo)
                    results[name] = measure(bulk, echo, args.seconds)
                finally:
                    procs.stop()
                r = results[name]
                print(f"{name:20s} bulk {r['bulk_mbit']:6.2f} Mbit/s  echo idle {r['idle_ms']:6.1f} ms  "
                      f"p50 {pct(r['echo_ms'], 50):7.1f}  p95 {pct(r['echo_ms'], 95):7.1f}  "
                      f"p99 {pct(r['echo_ms'], 99):7.1f} ms  ({len(r['echo_ms'])} echoes)", flush=True)
        finally:
            servers.terminate()
            servers.wait()
    print()
    print("| tunnel | bulk Mbit/s | echo idle | echo p50 | echo p95 | echo p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        e = r["echo_ms"]
        print(f"| {name} | {r['bulk_mbit']:.1f} | {r['idle_ms']:.1f} ms | {pct(e, 50):.1f} ms | "
              f"{pct(e, 95):.1f} ms | {pct(e, 99):.1f} ms |")
    print(json.dumps({k: {"bulk_mbit": v["bulk_mbit"], "idle_ms": v["idle_ms"],
                          "p50": pct(v["echo_ms"], 50), "p95": pct(v["echo_ms"], 95),
                          "p99": pct(v["echo_ms"], 99), "echoes": len(v["echo_ms"]),
                          "median": statistics.median(v["echo_ms"])} for k, v in results.items()}))


if __name__ == "__main__":
    main()
