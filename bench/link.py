#!/usr/bin/env python3
"""Encrypted-link benchmark: a linkgate gateway pair side by side with a
stunnel client/server pair (TLS 1.3) and ssh -L (aes128-gcm@openssh.com).

Throughput: one iperf3 stream through each tunnel, tunnels taken in
alternating order over several rounds; Gbit/s and the CPU seconds per GB of
both ends together (process trees, from /proc).

Setup: time from connect() to the first byte from a server that greets on
accept, through each tunnel: a new stream on an established link (linkgate),
a new TLS connection (stunnel), a new channel on an established SSH
connection (ssh -L). Sequential connections; median and p99.

Usage: python3 bench/link.py [--rounds 3] [--seconds 5] [--setups 300] [--also-threads N] [--also-plain]
Needs: iperf3, stunnel4, openssh-server, openssl (Debian packages) and a
release build (cargo build --release). Runs sshd on a loopback port with
keys made for the run, as root.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import LINKGATE, Relay, require_release_build, free_port, percentile, tree_cpu_seconds, wait_port  # noqa: E402

PASSWORD = "bench link password"


def greeter():
    """A server that sends one byte on accept and closes; returns its port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(512)

    def serve():
        while True:
            conn, _ = server.accept()
            try:
                conn.sendall(b"x")
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


class Tunnel:
    """A pair of processes carrying two forwarded ports: bulk and greet."""

    def __init__(self, name, procs, bulk_port, greet_port):
        self.name, self.procs, self.bulk_port, self.greet_port = name, procs, bulk_port, greet_port

    def cpu(self):
        return sum(tree_cpu_seconds(p.proc.pid) for p in self.procs)

    def stop(self):
        for p in self.procs:
            p.stop()


def start_linkgate(tmp, bulk_target, greet_target, name="linkgate", transport=None, gateway_extra=""):
    """A linkgate pair; `transport(link_port)` gives the hub's extra listen
    entry (and [link] lines) and the spoke's connect value and [[peer]]
    lines, for the link transport benchmark. Default: raw TCP.
    `gateway_extra` is added to both gateways' [gateway] table."""
    link_port, bulk, greet = free_port(), free_port(), free_port()
    listen, hub_link_extra, connect, peer_extra = (
        (f"127.0.0.1:{link_port}", "", f"127.0.0.1:{link_port}", "") if transport is None else transport(link_port))
    hub_conf = os.path.join(tmp, f"{name}-hub.toml".replace(" ", "-"))
    with open(hub_conf, "w") as f:
        f.write(f'''[gateway]
name = "hub"
identity = "hub.key"
shutdown_grace = "1s"
{gateway_extra}
[link]
listen = "{listen}"
{hub_link_extra}
[[peer]]
name = "spoke"
password = "{PASSWORD}"
[[service]]
name = "bulk"
type = "mapping"
listen = "link"
target = "127.0.0.1:{bulk_target}"
allow = "peer:spoke"
[[service]]
name = "greet"
type = "mapping"
listen = "link"
target = "127.0.0.1:{greet_target}"
allow = "peer:spoke"
''')
    spoke_conf = os.path.join(tmp, f"{name}-spoke.toml".replace(" ", "-"))
    with open(spoke_conf, "w") as f:
        f.write(f'''[gateway]
name = "spoke"
shutdown_grace = "1s"
{gateway_extra}
[[peer]]
name = "hub"
connect = "{connect}"
password = "{PASSWORD}"
{peer_extra}
[[service]]
name = "bulk"
type = "mapping"
listen = "127.0.0.1:{bulk}"
target = "link://hub/bulk"
[[service]]
name = "greet"
type = "mapping"
listen = "127.0.0.1:{greet}"
target = "link://hub/greet"
''')
    env = dict(os.environ, RUST_LOG="warn")
    tag = name.replace(" ", "-")
    hub = Relay(f"{tag}-hub", [LINKGATE, "run", "-c", hub_conf], link_port, tmp, env)
    spoke = Relay(f"{tag}-spoke", [LINKGATE, "run", "-c", spoke_conf], bulk, tmp, env)
    # Wait until the link is up: a greeting arrives through it.
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", greet), timeout=2) as s:
                if s.recv(1) == b"x":
                    break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        spoke.stop()
        hub.stop()
        raise RuntimeError(f"{name} link did not come up")
    return Tunnel(name, [spoke, hub], bulk, greet)


def start_plain(tmp, bulk_target, greet_target):
    """The floor of the same path without the link: two linkgate mapping
    services in a row (client → A → B → server), so a byte is read and
    written twice as through a gateway pair, with no records, encryption or
    multiplexing: what the kernel's copies alone cost."""
    a_bulk, b_bulk, a_greet, b_greet = free_port(), free_port(), free_port(), free_port()
    conf = os.path.join(tmp, "plain.toml")
    with open(conf, "w") as f:
        for name, listen, target in (("bulk-a", a_bulk, b_bulk), ("bulk-b", b_bulk, bulk_target),
                                     ("greet-a", a_greet, b_greet), ("greet-b", b_greet, greet_target)):
            f.write(f'[[service]]\nname = "{name}"\ntype = "mapping"\nlisten = "127.0.0.1:{listen}"\n'
                    f'target = "127.0.0.1:{target}"\n')
        f.write('[gateway]\nshutdown_grace = "1s"\n')
    relay = Relay("plain", [LINKGATE, "run", "-c", conf], a_greet, tmp, dict(os.environ, RUST_LOG="warn"))
    return Tunnel("plain relays", [relay], a_bulk, a_greet)


def start_stunnel(tmp, bulk_target, greet_target):
    pem = os.path.join(tmp, "stunnel.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=bench", "-days", "1", "-keyout", pem, "-out", pem],
                   check=True, capture_output=True)
    s_bulk, s_greet, c_bulk, c_greet = free_port(), free_port(), free_port(), free_port()
    server_conf = os.path.join(tmp, "stunnel-server.conf")
    with open(server_conf, "w") as f:
        f.write(f"foreground = yes\npid =\nsslVersion = TLSv1.3\ncert = {pem}\n"
                f"[bulk]\naccept = 127.0.0.1:{s_bulk}\nconnect = 127.0.0.1:{bulk_target}\n"
                f"[greet]\naccept = 127.0.0.1:{s_greet}\nconnect = 127.0.0.1:{greet_target}\n")
    client_conf = os.path.join(tmp, "stunnel-client.conf")
    with open(client_conf, "w") as f:
        f.write(f"foreground = yes\npid =\nclient = yes\nsslVersion = TLSv1.3\n"
                f"[bulk]\naccept = 127.0.0.1:{c_bulk}\nconnect = 127.0.0.1:{s_bulk}\n"
                f"[greet]\naccept = 127.0.0.1:{c_greet}\nconnect = 127.0.0.1:{s_greet}\n")
    server = Relay("stunnel-server", ["stunnel", server_conf], s_greet, tmp)
    client = Relay("stunnel-client", ["stunnel", client_conf], c_greet, tmp)
    return Tunnel("stunnel", [client, server], c_bulk, c_greet)


def start_ssh(tmp, bulk_target, greet_target):
    host_key, user_key = os.path.join(tmp, "host_key"), os.path.join(tmp, "user_key")
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    authorized = os.path.join(tmp, "authorized_keys")
    with open(user_key + ".pub") as src, open(authorized, "w") as dst:
        dst.write(src.read())
    os.chmod(authorized, 0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    sshd_conf = os.path.join(tmp, "sshd_config")
    with open(sshd_conf, "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                "AllowTcpForwarding yes\nCiphers aes128-gcm@openssh.com\nPidFile none\n")
    sshd = Relay("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", sshd_conf], port, tmp)
    bulk, greet = free_port(), free_port()
    ssh = Relay("ssh", ["ssh", "-N", "-p", str(port), "-i", user_key, "-c", "aes128-gcm@openssh.com",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                        "-o", "ExitOnForwardFailure=yes",
                        "-L", f"127.0.0.1:{bulk}:127.0.0.1:{bulk_target}",
                        "-L", f"127.0.0.1:{greet}:127.0.0.1:{greet_target}", "root@127.0.0.1"], greet, tmp)
    return Tunnel("ssh -L", [ssh, sshd], bulk, greet)


def iperf(port, seconds):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out)["end"]["sum_received"]
    return result["bits_per_second"] / 1e9, result["bytes"]


def setup_times(port, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if s.recv(1) != b"x":
                raise RuntimeError("no greeting")
        times.append((time.perf_counter() - start) * 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--setups", type=int, default=300)
    parser.add_argument("--also-threads", type=int, default=0,
                        help="also run a linkgate pair with `threads = N` in [gateway] (default worker "
                             "count: one per CPU)")
    parser.add_argument("--also-plain", action="store_true",
                        help="also run two plain linkgate mappings in a row (no link, no crypto): the floor "
                             "of the kernel's copies on the same path")
    args = parser.parse_args()
    require_release_build()
    with tempfile.TemporaryDirectory() as tmp:
        iperf_port = free_port()
        server = subprocess.Popen(["iperf3", "-s", "-p", str(iperf_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        greet_port = greeter()
        tunnels = []
        try:
            wait_port(iperf_port)
            for start in (start_linkgate, start_stunnel, start_ssh):
                tunnels.append(start(tmp, iperf_port, greet_port))
            if args.also_threads:
                name = f"linkgate threads={args.also_threads}"
                tunnels.append(start_linkgate(tmp, iperf_port, greet_port, name=name,
                                              gateway_extra=f"threads = {args.also_threads}"))
            if args.also_plain:
                tunnels.append(start_plain(tmp, iperf_port, greet_port))
            results = {t.name: [] for t in tunnels}
            print(f"throughput: iperf3 single stream, {args.seconds}s x {args.rounds} rounds, alternating order")
            for rnd in range(args.rounds):
                for tunnel in (tunnels if rnd % 2 == 0 else list(reversed(tunnels))):
                    before = tunnel.cpu()
                    gbps, nbytes = iperf(tunnel.bulk_port, args.seconds)
                    time.sleep(0.3)
                    per_gb = (tunnel.cpu() - before) / (nbytes / 1e9)
                    results[tunnel.name].append((gbps, per_gb))
                    print(f"  round {rnd + 1} {tunnel.name:9s} {gbps:6.2f} Gbit/s  {per_gb:.3f} CPU s/GB (both ends)",
                          flush=True)
            summary = {n: (statistics.median(g for g, _ in r), statistics.median(c for _, c in r))
                       for n, r in results.items()}
            lg = summary["linkgate"]
            print("\nmedian over rounds:")
            for name, (gbps, cpu) in summary.items():
                print(f"  {name:9s} {gbps:6.2f} Gbit/s  {cpu:.3f} CPU s/GB   linkgate/this: "
                      f"throughput {lg[0] / gbps:.2f}x, CPU per GB {lg[1] / cpu:.2f}x")
            print(f"\nsetup: {args.setups} sequential connections to a greeting server")
            for tunnel in tunnels:
                times = setup_times(tunnel.greet_port, args.setups)
                print(f"  {tunnel.name:9s} median {statistics.median(times):.3f} ms  p99 {percentile(times, 0.99):.3f} ms")
        finally:
            for tunnel in tunnels:
                tunnel.stop()
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
