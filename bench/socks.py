#!/usr/bin/env python3
"""SOCKS5 benchmark: linkgate side by side with dante (danted) and microsocks.

Rate: a single-threaded Rust load generator (bench/loadgen) runs 64
concurrent loops of connect, SOCKS5 no-auth CONNECT to an echo server in the
load generator's own thread, 64-byte round trip, close; servers are taken in
alternating order over several rounds, each round on drained TIME_WAIT
ports; connections per second and setup-to-echo latency (p50, p99).

CPU isolation (default, --no-pin to turn off): the server under test runs on
CPU 0 and the load generator on CPU 1 (taskset), so every server has exactly
one core of its own and never competes with the load. Each server keeps its
default settings (linkgate sizes its worker pool from its CPU affinity).

Memory: resident memory per idle SOCKS5 tunnel with --idle tunnels open,
linkgate against microsocks.

Usage: python3 bench/socks.py [--rounds 3] [--seconds 2] [--clients 64] [--idle 9000] [--no-pin]
Needs: dante-server, microsocks (Debian packages) and
cargo build --release -p linkgate -p linkgate-loadgen.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    LINKGATE, LOADGEN, Relay, add_pin_option, require_release_build, children, cpu_placement, free_port, rss_kib, tree_cpu_seconds,
    wait_for_time_wait_drain,
)





def start_linkgate(tmp, pin):
    port = free_port()
    conf = os.path.join(tmp, "linkgate.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\nshutdown_grace = "1s"\n[[service]]\nname = "socks"\ntype = "socks"\n'
                f'listen = "127.0.0.1:{port}"\nmax_connections = 100000\n')
    # Audit records stay on (written to a file), as in production.
    return Relay("linkgate", pin + [LINKGATE, "run", "-c", conf], port, tmp)


def start_dante(tmp, pin):
    port = free_port()
    conf = os.path.join(tmp, "danted.conf")
    with open(conf, "w") as f:
        f.write(f"""logoutput: /dev/null
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
""")
    return Relay("dante", pin + ["danted", "-f", conf, "-p", os.path.join(tmp, "danted.pid")], port, tmp)


def start_microsocks(tmp, pin):
    port = free_port()
    return Relay("microsocks", pin + ["microsocks", "-i", "127.0.0.1", "-p", str(port)], port, tmp)


def loadgen(pin, *args):
    out = subprocess.run(pin + [LOADGEN, *map(str, args)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    # dante binds its outgoing sockets to a port of its own choosing, which
    # cannot be one still in TIME_WAIT: as the ephemeral range fills up its
    # rate sinks, then stops (0/s after ~20,000 connections here). Short
    # rounds on drained ports measure it at its best.
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--idle", type=int, default=9000)
    add_pin_option(parser)
    args = parser.parse_args()
    server_cpu, load_cpu = cpu_placement(args)
    require_release_build(loadgen=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wait_for_time_wait_drain()  # an earlier run may have used up the ports
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "echo.port")
        echo = subprocess.Popen(load_cpu + [LOADGEN, "echo", port_file])
        servers = []
        try:
            while not os.path.exists(port_file) or not open(port_file).read():
                time.sleep(0.05)
            target = f"127.0.0.1:{open(port_file).read()}"
            for start in (start_linkgate, start_dante, start_microsocks):
                servers.append(start(tmp, server_cpu))
            results = {s.name: [] for s in servers}
            placement = "server on CPU 0, load on CPU 1" if args.pin else "everything on both CPUs"
            print(f"rate: {args.clients} concurrent clients, {args.seconds}s x {args.rounds} rounds, "
                  f"alternating order, {placement}")
            for rnd in range(args.rounds):
                for server in (servers if rnd % 2 == 0 else list(reversed(servers))):
                    wait_for_time_wait_drain()
                    # Warm up (dante forks its helper processes on demand).
                    loadgen(load_cpu, "rate", f"127.0.0.1:{server.port}", "local", args.clients, 0.5)
                    cpu_before = tree_cpu_seconds(server.proc.pid)
                    r = loadgen(load_cpu, "rate", f"127.0.0.1:{server.port}", "local", args.clients, args.seconds)
                    cpu = tree_cpu_seconds(server.proc.pid) - cpu_before
                    r["cpu_us_per_conn"] = cpu / max(r["connections"], 1) * 1e6
                    results[server.name].append(r)
                    print(f"  round {rnd + 1} {server.name:10s} {r['per_second']:9.0f} conn/s  p50 {r['p50_ms']:.3f} ms"
                          f"  p99 {r['p99_ms']:.3f} ms  errors {r['errors']}  {r['cpu_us_per_conn']:.0f} us CPU/conn",
                          flush=True)
            med = {n: {k: statistics.median(r[k] for r in rs) for k in ("per_second", "p50_ms", "p99_ms")}
                   for n, rs in results.items()}
            lg = med["linkgate"]
            ratio = lambda a, b: f"{a / b:.2f}x" if b else "n/a"  # noqa: E731
            print("\nmedian over rounds (and each server's best round):")
            for name, m in med.items():
                best = max(results[name], key=lambda r: r["per_second"])
                print(f"  {name:10s} {m['per_second']:9.0f} conn/s  p50 {m['p50_ms']:.3f} ms  p99 {m['p99_ms']:.3f} ms"
                      f"   linkgate/this: rate {ratio(lg['per_second'], m['per_second'])}, "
                      f"p99 {ratio(lg['p99_ms'], m['p99_ms'])}; best round {best['per_second']:.0f} conn/s")

            wait_for_time_wait_drain()
            print(f"\nidle memory: {args.idle} idle SOCKS5 tunnels")
            for server in servers:
                if server.name == "dante":
                    continue  # one process per client group: not comparable per connection
                pids = lambda: [server.proc.pid] + children(server.proc.pid)  # noqa: E731
                warm = subprocess.Popen(load_cpu + [LOADGEN, "hold", f"127.0.0.1:{server.port}", target, "100"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                warm.stdout.readline()
                time.sleep(1)
                base = rss_kib(pids())
                hold = subprocess.Popen(load_cpu + [LOADGEN, "hold", f"127.0.0.1:{server.port}", target, str(args.idle)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                hold.stdout.readline()
                time.sleep(2)
                after = rss_kib(pids())
                for p in (hold, warm):
                    p.stdin.close()
                    p.wait()
                print(f"  {server.name:10s} RSS {base} KiB -> {after} KiB: {(after - base) / args.idle:.2f} KiB per idle tunnel",
                      flush=True)
        finally:
            for server in servers:
                server.stop()
            echo.terminate()
            echo.wait()
            print("waiting for TIME_WAIT sockets to drain (so tests can bind ports again)...", flush=True)
            wait_for_time_wait_drain()


if __name__ == "__main__":
    main()
