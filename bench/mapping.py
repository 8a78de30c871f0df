#!/usr/bin/env python3
"""Mapping-proxy benchmark: linkgate side by side with socat and haproxy.

Throughput: iperf3 single stream through each relay on loopback, relays
taken in alternating order over several rounds; reports Gbit/s, ratios, and
the relay's CPU seconds per GB (user+sys of the relay process and its
reaped children, read from /proc).

Memory: resident memory per idle mapped connection at N connections,
linkgate against haproxy.

Usage: python3 bench/mapping.py [--rounds 3] [--seconds 5] [--idle 9000]
Needs: iperf3, socat, haproxy (Debian packages) and a release build
(cargo build --release). Everything runs on 127.0.0.1 with OS-chosen ports.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import LINKGATE, Relay, require_release_build, cpu_seconds, free_port, rss_kib, wait_port


def start_linkgate(tmp, target_port):
    port = free_port()
    conf = os.path.join(tmp, "linkgate.toml")
    with open(conf, "w") as f:
        f.write(
            f'[gateway]\nshutdown_grace = "1s"\n[[service]]\nname = "bench"\ntype = "mapping"\n'
            f'listen = "127.0.0.1:{port}"\ntarget = "127.0.0.1:{target_port}"\n'
            f'max_connections = 100000\n'
        )
    env = dict(os.environ, RUST_LOG="warn")
    return Relay("linkgate", [LINKGATE, "run", "-c", conf], port, tmp, env)


def start_socat(tmp, target_port):
    port = free_port()
    argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"TCP:127.0.0.1:{target_port}"]
    return Relay("socat", argv, port, tmp)


def start_haproxy(tmp, target_port, splice, maxconn=1000):
    port = free_port()
    conf = os.path.join(tmp, f"haproxy-{'splice' if splice else 'copy'}.cfg")
    with open(conf, "w") as f:
        f.write(
            f"global\n  maxconn {maxconn}\n" + ("  maxpipes 256\n" if splice else "  nosplice\n") +
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n" +
            ("  option splice-auto\n" if splice else "") +
            f"frontend fe\n  bind 127.0.0.1:{port}\n  maxconn {maxconn}\n  default_backend be\n"
            f"backend be\n  server s1 127.0.0.1:{target_port} maxconn {maxconn}\n"
        )
    name = "haproxy-splice" if splice else "haproxy"
    return Relay(name, ["haproxy", "-db", "-f", conf], port, tmp)


def iperf(port, seconds):
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads(out)["end"]["sum_received"]
    return result["bits_per_second"] / 1e9, result["bytes"]


def throughput(args, tmp):
    server_port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(server_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    relays = []
    try:
        wait_port(server_port)
        relays.append(start_linkgate(tmp, server_port))
        relays.append(start_socat(tmp, server_port))
        relays.append(start_haproxy(tmp, server_port, splice=False))
        relays.append(start_haproxy(tmp, server_port, splice=True))
        results = {r.name: [] for r in relays}
        for rnd in range(args.rounds):
            order = relays if rnd % 2 == 0 else list(reversed(relays))
            for relay in order:
                before = cpu_seconds(relay.proc.pid)
                gbps, nbytes = iperf(relay.port, args.seconds)
                time.sleep(0.3)  # let socat reap its child so cutime includes it
                cpu = cpu_seconds(relay.proc.pid) - before
                results[relay.name].append((gbps, cpu / (nbytes / 1e9)))
                print(f"  round {rnd + 1} {relay.name:15s} {gbps:6.2f} Gbit/s  {cpu / (nbytes / 1e9):.3f} CPU s/GB", flush=True)
    finally:
        for relay in relays:
            relay.stop()
        server.terminate()
        server.wait()
    summary = {name: (statistics.median(g for g, _ in runs), statistics.median(c for _, c in runs))
               for name, runs in results.items()}
    return summary


def sink_server(port, count):
    """A server (in a child process) that accepts and holds connections."""
    code = (
        "import asyncio,sys\n"
        "held=[]\n"
        "async def h(r,w):\n    held.append(w)\n    await r.read()\n"
        "async def main():\n"
        f"    s=await asyncio.start_server(h,'127.0.0.1',{port},backlog=4096)\n"
        "    await s.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def idle_memory(args, tmp):
    target_port = free_port()
    sink = sink_server(target_port, args.idle)
    try:
        return idle_memory_against(args, tmp, target_port)
    finally:
        sink.terminate()
        sink.wait()


def idle_memory_against(args, tmp, target_port):
    out = {}
    starters = (start_linkgate, lambda t, p: start_haproxy(t, p, splice=True, maxconn=args.idle + 500))
    for start in starters:
        relay = None
        socks = []
        try:
            wait_port(target_port)
            relay = start(tmp, target_port)
            for _ in range(100):  # warm up allocator and thread pools
                socks.append(socket.create_connection(("127.0.0.1", relay.port)))
            time.sleep(1)
            base = rss_kib(relay.pids())
            for _ in range(args.idle):
                socks.append(socket.create_connection(("127.0.0.1", relay.port)))
            time.sleep(3)
            after = rss_kib(relay.pids())
            per_conn = (after - base) / args.idle
            out[relay.name] = (per_conn, base, after)
            print(f"  {relay.name:15s} RSS {base} KiB -> {after} KiB: {per_conn:.2f} KiB per idle connection", flush=True)
        finally:
            for s in socks:
                s.close()
            if relay:
                relay.stop()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=9000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    require_release_build()
    # The relay holds two sockets per mapped connection; children inherit
    # this process's limit. (This workplace caps the hard limit at 20000.)
    need = args.idle * 2 + 500
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        sys.exit(f"--idle {args.idle} needs {need} open files per process; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            print(f"throughput: iperf3 single stream, {args.seconds}s x {args.rounds} rounds, alternating order")
            s = throughput(args, tmp)
            lg_gbps, lg_cpu = s["linkgate"]
            best_haproxy = max(("haproxy", "haproxy-splice"), key=lambda n: s[n][0])
            print("\nmedian over rounds:")
            for name, (gbps, cpu) in s.items():
                print(f"  {name:15s} {gbps:6.2f} Gbit/s  {cpu:.3f} CPU s/GB  linkgate/this = {lg_gbps / gbps:.2f}x")
            print(f"  vs best haproxy ({best_haproxy}): throughput {lg_gbps / s[best_haproxy][0]:.2f}x, "
                  f"CPU per GB {lg_cpu / s[best_haproxy][1]:.2f}x; vs socat {lg_gbps / s['socat'][0]:.2f}x")
        if not args.skip_memory:
            print(f"\nidle memory: {args.idle} idle mapped connections")
            m = idle_memory(args, tmp)
            names = list(m)
            print(f"  linkgate/haproxy per-connection memory = {m[names[0]][0] / m[names[1]][0]:.2f}x")


if __name__ == "__main__":
    main()
