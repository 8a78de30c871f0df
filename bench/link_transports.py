#!/usr/bin/env python3
"""Link transport benchmark: one linkgate link carried five ways, side by
side in one run with rathole's WebSocket-over-TLS transport.

- linkgate tcp        the raw link (the ceiling)
- linkgate ws         WebSocket, plain
- linkgate wss        WebSocket over TLS (the hub's own wss:// listener)
- linkgate CONNECT    the raw link dialed through squid (HTTP CONNECT)
- linkgate wss+CONNECT  wss:// through squid, as a browser behind a proxy
- rathole wss         rathole 0.5 with transport "websocket", tls = true
                      (skipped when `rathole` is not on PATH; install with
                      `cargo install rathole`)

Throughput: one iperf3 stream through each, in alternating order over
several rounds; Gbit/s and CPU seconds per GB of both ends (and squid's,
where it relays). Setup: time from connect() to the first byte of a server
that greets on accept: a new stream on the established link (linkgate), a
new data channel (rathole).

Usage: python3 bench/link_transports.py [--rounds 3] [--seconds 4] [--setups 200]
Needs: iperf3, squid, openssl (Debian packages), a release build.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import Relay, free_port, percentile, require_release_build, wait_port  # noqa: E402
from link import Tunnel, greeter, iperf, setup_times, start_linkgate  # noqa: E402

PATH = "/linkgate"


def make_certs(tmp):
    """A CA and a certificate it signed for localhost / 127.0.0.1."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    at = lambda name: os.path.join(tmp, name)  # noqa: E731

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", "-days", "2", "-subj", "/CN=bench CA", *ec, "-keyout", at("ca-key.pem"), "-out", at("ca.pem"))
    run("req", "-subj", "/CN=localhost", *ec, "-keyout", at("key.pem"), "-out", at("req.pem"))
    with open(at("ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n")
    run("x509", "-req", "-days", "2", "-CAcreateserial", "-in", at("req.pem"), "-CA", at("ca.pem"),
        "-CAkey", at("ca-key.pem"), "-extfile", at("ext.cnf"), "-out", at("cert.pem"))
    run("pkcs12", "-export", "-out", at("identity.pfx"), "-inkey", at("key.pem"), "-in", at("cert.pem"),
        "-certfile", at("ca.pem"), "-passout", "pass:bench")
    return at("ca.pem"), at("cert.pem"), at("key.pem"), at("identity.pfx")


def start_squid(tmp):
    port = free_port()
    conf = os.path.join(tmp, "squid.conf")
    with open(conf, "w") as f:
        f.write(f"http_port 127.0.0.1:{port}\npid_filename none\ncache_log /dev/null\naccess_log none\n"
                "cache deny all\nshutdown_lifetime 0 seconds\nhttp_access allow all\n")
    return Relay("squid", ["squid", "-N", "-f", conf], port, tmp)


def start_rathole(tmp, bulk_target, greet_target, ca, pfx):
    control, bulk, greet = free_port(), free_port(), free_port()
    server_conf, client_conf = os.path.join(tmp, "rathole-server.toml"), os.path.join(tmp, "rathole-client.toml")
    with open(server_conf, "w") as f:
        f.write(f'''[server]
bind_addr = "127.0.0.1:{control}"
[server.transport]
type = "websocket"
[server.transport.websocket]
tls = true
[server.transport.tls]
pkcs12 = "{pfx}"
pkcs12_password = "bench"
[server.services.bulk]
token = "bench"
bind_addr = "127.0.0.1:{bulk}"
[server.services.greet]
token = "bench"
bind_addr = "127.0.0.1:{greet}"
''')
    with open(client_conf, "w") as f:
        f.write(f'''[client]
remote_addr = "localhost:{control}"
[client.transport]
type = "websocket"
[client.transport.tls]
trusted_root = "{ca}"
hostname = "localhost"
[client.transport.websocket]
tls = true
[client.services.bulk]
token = "bench"
local_addr = "127.0.0.1:{bulk_target}"
[client.services.greet]
token = "bench"
local_addr = "127.0.0.1:{greet_target}"
''')
    env = dict(os.environ, RUST_LOG="warn")
    server = Relay("rathole-server", ["rathole", "-s", server_conf], control, tmp, env)
    client = subprocess.Popen(["rathole", "-c", client_conf], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(tmp, "rathole-client.log"), "w"), env=env, cwd=tmp)

    class ClientProc:
        proc = client

        def stop(self):
            client.terminate()
            client.wait()
    # The service ports open once the client registered its services.
    wait_port(greet, timeout=20)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if setup_times(greet, 1):
                break
        except (OSError, RuntimeError):
            time.sleep(0.2)
    return Tunnel("rathole wss", [ClientProc(), server], bulk, greet)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--setups", type=int, default=200)
    args = parser.parse_args()
    require_release_build()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        ca, cert, key, pfx = make_certs(tmp)
        iperf_port = free_port()
        server = subprocess.Popen(["iperf3", "-s", "-p", str(iperf_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        greet_port = greeter()
        squid = start_squid(tmp)
        tls_files = f'tls_cert = "{cert}"\ntls_key = "{key}"'
        proxy = f'via = "http://127.0.0.1:{squid.port}"'
        trust = f'ca_file = "{ca}"'
        variants = {
            "linkgate tcp": None,
            "linkgate ws": lambda p: (f"ws://127.0.0.1:{p}{PATH}", "", f"ws://127.0.0.1:{p}{PATH}", ""),
            "linkgate wss": lambda p: (f"wss://127.0.0.1:{p}{PATH}", tls_files,
                                       f"wss://localhost:{p}{PATH}", trust),
            "linkgate CONNECT": lambda p: (f"127.0.0.1:{p}", "", f"127.0.0.1:{p}", proxy),
            "linkgate wss+CONNECT": lambda p: (f"wss://127.0.0.1:{p}{PATH}", tls_files,
                                               f"wss://localhost:{p}{PATH}", f"{trust}\n{proxy}"),
        }
        tunnels = []
        try:
            wait_port(iperf_port)
            for name, transport in variants.items():
                tunnels.append(start_linkgate(tmp, iperf_port, greet_port, name, transport))
            if shutil.which("rathole"):
                tunnels.append(start_rathole(tmp, iperf_port, greet_port, ca, pfx))
            else:
                print("rathole not on PATH: skipped (cargo install rathole)")
            results = {t.name: [] for t in tunnels}
            print(f"throughput: iperf3 single stream, {args.seconds}s x {args.rounds} rounds, alternating order")
            for rnd in range(args.rounds):
                for tunnel in (tunnels if rnd % 2 == 0 else list(reversed(tunnels))):
                    via_squid = "CONNECT" in tunnel.name
                    before = tunnel.cpu() + (squid_cpu(squid) if via_squid else 0)
                    gbps, nbytes = iperf(tunnel.bulk_port, args.seconds)
                    time.sleep(0.3)
                    after = tunnel.cpu() + (squid_cpu(squid) if via_squid else 0)
                    per_gb = (after - before) / (nbytes / 1e9)
                    results[tunnel.name].append((gbps, per_gb))
                    print(f"  round {rnd + 1} {tunnel.name:21s} {gbps:6.2f} Gbit/s  {per_gb:.3f} CPU s/GB",
                          flush=True)
            summary = {n: (statistics.median(g for g, _ in r), statistics.median(c for _, c in r))
                       for n, r in results.items()}
            raw = summary["linkgate tcp"]
            print("\nmedian over rounds (CPU: both ends, plus squid where it relays):")
            for name, (gbps, cpu) in summary.items():
                print(f"  {name:21s} {gbps:6.2f} Gbit/s  {cpu:.3f} CPU s/GB   of raw link: "
                      f"{gbps / raw[0]:.2f}x throughput, {cpu / raw[1]:.2f}x CPU per GB")
            if "rathole wss" in summary:
                wss, rat = summary["linkgate wss"], summary["rathole wss"]
                print(f"  linkgate wss / rathole wss: throughput {wss[0] / rat[0]:.2f}x, CPU per GB {wss[1] / rat[1]:.2f}x")
            print(f"\nsetup: {args.setups} sequential connections to a greeting server")
            for tunnel in tunnels:
                times = setup_times(tunnel.greet_port, args.setups)
                print(f"  {tunnel.name:21s} median {statistics.median(times):.3f} ms  "
                      f"p99 {percentile(times, 0.99):.3f} ms")
        finally:
            for tunnel in tunnels:
                tunnel.stop()
            squid.stop()
            server.terminate()
            server.wait()


def squid_cpu(squid):
    from benchlib import tree_cpu_seconds
    return tree_cpu_seconds(squid.proc.pid)


if __name__ == "__main__":
    main()
