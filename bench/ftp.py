#!/usr/bin/env python3
"""FTP proxy benchmark: linkgate's ftp service side by side with SuSE's
ftp-proxy (Debian package ftp-proxy), both with a fixed target, in front of
one pyftpdlib server (and that server directly, for reference).

- Sessions: linkgate-loadgen runs CLIENTS concurrent loops of whole sessions
  (greeting, USER/PASS, TYPE I, PASV, RETR of a 1 KiB file, QUIT); sessions/s,
  latency percentiles, and the proxy's CPU per session (its process tree,
  forked children included).
- Bulk: curl downloads a 1 GiB file (passive mode) through each; Gbit/s and
  the proxy's CPU seconds per GB.

CPU placement (default, --no-pin to turn off): the proxy on CPU 0; the FTP
server and the clients on CPU 1. Proxies in alternating order; medians.

Usage: python3 bench/ftp.py [--rounds 3] [--seconds 3] [--clients 16]
Needs: ftp-proxy and curl (Debian packages), pyftpdlib (pip), and
cargo build --release -p linkgate -p linkgate-loadgen.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    LINKGATE, LOADGEN, Relay, add_pin_option, require_release_build, cpu_placement, free_port, tree_cpu_seconds, wait_for_time_wait_drain,
)

BIG = 1 << 30


def start_server(tmp, pin):
    port = free_port()
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    with open(os.path.join(root, "small.bin"), "wb") as f:
        f.write(os.urandom(1024))
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.truncate(BIG)
    script = f"""
import logging
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
logging.disable(logging.CRITICAL)
a = DummyAuthorizer()
a.add_anonymous({root!r})
FTPHandler.authorizer = a
s = FTPServer(("127.0.0.1", {port}), FTPHandler)
s.max_cons = 0
s.serve_forever()
"""
    return Relay("pyftpdlib (direct)", pin + [sys.executable, "-c", script], port, tmp)


def start_linkgate(tmp, pin, server_port):
    port = free_port()
    conf = os.path.join(tmp, "linkgate.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\nshutdown_grace = "1s"\n[[service]]\nname = "ftp"\ntype = "ftp"\n'
                f'listen = "127.0.0.1:{port}"\ntarget = "127.0.0.1:{server_port}"\nmax_connections = 100000\n')
    # Audit records stay on (written to a file), as in production.
    return Relay("linkgate", pin + [LINKGATE, "run", "-c", conf], port, tmp)


def start_ftp_proxy(tmp, pin, server_port):
    port = free_port()
    conf = os.path.join(tmp, "ftp-proxy.conf")
    with open(conf, "w") as f:
        # Passive towards the server, like linkgate; its defaults would refuse
        # more than 40 new clients a minute (ForkLimit) and 64 at once.
        # Never point LogDestination at /dev/null: ftp-proxy replaces its log
        # file with a regular file at start-up (seen here: it broke /dev/null
        # for the whole machine).
        f.write(f"""[-Global-]
ServerType standalone
Listen 127.0.0.1
Port {port}
DestinationAddress 127.0.0.1
DestinationPort {server_port}
DestinationTransferMode passive
MaxClients 512
ForkLimit 100000000
PidFile {tmp}/ftp-proxy.pid
LogDestination {tmp}/ftp-proxy.log
""")
    return Relay("ftp-proxy", pin + ["ftp-proxy", "-d", "-n", "-f", conf], port, tmp)


def sessions(load_cpu, port, clients, seconds):
    out = subprocess.run(load_cpu + [LOADGEN, "ftp", f"127.0.0.1:{port}", "anonymous", "bench@", "small.bin",
                                     str(clients), str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def bulk(load_cpu, port):
    out = subprocess.run(load_cpu + ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                                     f"ftp://127.0.0.1:{port}/big.bin"], capture_output=True, text=True, check=True)
    size, seconds = out.stdout.split()
    if int(size) != BIG:
        raise RuntimeError(f"short download through port {port}: {size} bytes")
    return int(size), float(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--clients", type=int, default=16)
    add_pin_option(parser)
    args = parser.parse_args()
    server_cpu, load_cpu = cpu_placement(args)
    require_release_build(loadgen=True)
    wait_for_time_wait_drain()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        server = start_server(tmp, load_cpu)
        proxies = []
        try:
            proxies = [start_linkgate(tmp, server_cpu, server.port), start_ftp_proxy(tmp, server_cpu, server.port)]
            placement = "proxy on CPU 0, server and clients on CPU 1" if args.pin else "everything on both CPUs"
            print(f"sessions: {args.clients} concurrent clients, {args.seconds}s x {args.rounds} rounds, "
                  f"alternating order, {placement}")
            results = {p.name: [] for p in [server] + proxies}
            for rnd in range(args.rounds):
                order = proxies if rnd % 2 == 0 else list(reversed(proxies))
                for target in [server] + order:
                    wait_for_time_wait_drain()
                    sessions(load_cpu, target.port, args.clients, 0.5)  # warm up (forks, pools)
                    before = tree_cpu_seconds(target.proc.pid)
                    r = sessions(load_cpu, target.port, args.clients, args.seconds)
                    cpu = tree_cpu_seconds(target.proc.pid) - before
                    r["cpu_us"] = cpu / max(r["sessions"], 1) * 1e6
                    results[target.name].append(r)
                    print(f"  round {rnd + 1} {target.name:20s} {r['per_second']:7.0f} sessions/s  "
                          f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  "
                          f"{r['cpu_us']:5.0f} us CPU/session", flush=True)
            med = {n: {k: statistics.median(r[k] for r in rs) for k in ("per_second", "p50_ms", "p99_ms", "cpu_us")}
                   for n, rs in results.items()}
            lg = med["linkgate"]
            print("\nmedian over rounds:")
            for name, m in med.items():
                print(f"  {name:20s} {m['per_second']:7.0f} sessions/s  p50 {m['p50_ms']:7.2f} ms  "
                      f"p99 {m['p99_ms']:7.2f} ms  {m['cpu_us']:5.0f} us CPU/session   linkgate/this: "
                      f"rate {lg['per_second'] / m['per_second']:.2f}x, p99 {lg['p99_ms'] / m['p99_ms']:.2f}x, "
                      f"CPU {lg['cpu_us'] / max(m['cpu_us'], 1e-9):.2f}x")

            print("\nbulk: curl RETR of 1 GiB, passive")
            speeds = {p.name: [] for p in [server] + proxies}
            for rnd in range(args.rounds):
                for target in [server] + (proxies if rnd % 2 == 0 else list(reversed(proxies))):
                    before = tree_cpu_seconds(target.proc.pid)
                    size, seconds = bulk(load_cpu, target.port)
                    cpu = tree_cpu_seconds(target.proc.pid) - before
                    gbit = size * 8 / seconds / 1e9
                    speeds[target.name].append((gbit, cpu / (size / 1e9)))
                    print(f"  round {rnd + 1} {target.name:20s} {gbit:6.2f} Gbit/s  {cpu / (size / 1e9):.3f} CPU s/GB",
                          flush=True)
            print("\nmedian over rounds:")
            for name, values in speeds.items():
                print(f"  {name:20s} {statistics.median(v[0] for v in values):6.2f} Gbit/s  "
                      f"{statistics.median(v[1] for v in values):.3f} CPU s/GB")
        finally:
            for p in proxies + [server]:
                p.stop()
            print("waiting for TIME_WAIT sockets to drain (so tests can bind ports again)...", flush=True)
            wait_for_time_wait_drain()


if __name__ == "__main__":
    main()
