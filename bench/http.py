#!/usr/bin/env python3
"""HTTP proxy benchmark: linkgate side by side with squid and tinyproxy
(caching off), against an nginx origin serving ~100-byte responses.

Requests: wrk, one thread, 64 keep-alive connections, absolute-URI GETs
through each proxy (and directly to nginx for reference), proxies taken in
alternating order; requests/s and p99 latency.

CPU isolation (default, --no-pin to turn off): the proxy under test runs on
CPU 0, wrk and nginx on CPU 1 (taskset), so no proxy competes with the load
for its core. Every proxy keeps its default settings (linkgate sizes its
worker pool from its CPU affinity: one worker here). With --no-pin all share
both CPUs and linkgate also runs a second time with `threads = 1`.

CONNECT: one tunnel through each proxy to a local source of zeros, read for
--seconds; Gbit/s.

Usage: python3 bench/http.py [--rounds 3] [--seconds 5] [--no-pin]
Needs: wrk, squid, tinyproxy, nginx-light (Debian packages) and
cargo build --release -p linkgate -p linkgate-loadgen.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    LINKGATE, LOADGEN, Relay, add_pin_option, require_release_build, cpu_placement, free_port, tree_cpu_seconds, wait_for_time_wait_drain,
)

BODY = "x" * 100


def start_nginx(tmp, pin):
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
pid {tmp}/nginx.pid;
error_log /dev/null;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type text/plain; return 200 "{BODY}"; }}
  }}
}}
""")
    return Relay("nginx", pin + ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"], port, tmp)


def start_linkgate(tmp, pin, threads=None):
    port = free_port()
    name = "linkgate" if threads is None else f"linkgate-t{threads}"
    conf = os.path.join(tmp, f"{name}.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\nshutdown_grace = "1s"\n' + (f"threads = {threads}\n" if threads else "") +
                f'[[service]]\nname = "web"\ntype = "http"\nlisten = "127.0.0.1:{port}"\nmax_connections = 100000\n')
    return Relay(name, pin + [LINKGATE, "run", "-c", conf], port, tmp)


def start_squid(tmp, pin):
    port = free_port()
    conf = os.path.join(tmp, "squid.conf")
    with open(conf, "w") as f:
        f.write(f"""http_port 127.0.0.1:{port}
http_access allow localhost
http_access deny all
acl SSL_ports port 1-65535
acl CONNECT method CONNECT
cache deny all
cache_mem 0 MB
access_log none
cache_log /dev/null
pid_filename {tmp}/squid.pid
coredump_dir {tmp}
shutdown_lifetime 1 seconds
max_filedescriptors 16384
""")
    return Relay("squid", pin + ["squid", "-N", "-f", conf], port, tmp)


def start_tinyproxy(tmp, pin):
    port = free_port()
    conf = os.path.join(tmp, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write(f"""Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 1000
Allow 127.0.0.1
LogLevel Critical
PidFile "{tmp}/tinyproxy.pid"
""")
    return Relay("tinyproxy", pin + ["tinyproxy", "-d", "-c", conf], port, tmp)


def wrk(pin, proxy_port, origin_port, seconds, direct=False):
    script = os.path.join(tempfile.gettempdir(), f"wrk-{origin_port}.lua")
    with open(script, "w") as f:
        if not direct:
            f.write(f'request = function() return wrk.format("GET", "http://127.0.0.1:{origin_port}/") end\n')
    out = subprocess.run(pin + ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{proxy_port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99.group(1)) * scale, int(errors.group(1)) if errors else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    add_pin_option(parser)
    args = parser.parse_args()
    require_release_build(loadgen=True)
    server_cpu, load_cpu = cpu_placement(args)
    wait_for_time_wait_drain()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # squid drops to the proxy user
        procs = []
        source_file = os.path.join(tmp, "source.port")
        source = subprocess.Popen(load_cpu + [LOADGEN, "source", source_file])
        try:
            nginx = start_nginx(tmp, load_cpu)
            procs.append(nginx)
            proxies = [start_linkgate(tmp, server_cpu)]
            if not args.pin:
                # Unpinned, the default is two workers; one is how squid and
                # tinyproxy run.
                proxies.append(start_linkgate(tmp, server_cpu, threads=1))
            proxies += [start_squid(tmp, server_cpu), start_tinyproxy(tmp, server_cpu)]
            procs.extend(proxies)
            time.sleep(1)
            rps, p99, _ = wrk(load_cpu, nginx.port, nginx.port, args.seconds, direct=True)
            print(f"nginx directly: {rps:.0f} req/s, p99 {p99:.2f} ms")
            results = {p.name: [] for p in proxies}
            placement = "proxy on CPU 0, wrk and nginx on CPU 1" if args.pin else "everything on both CPUs"
            print(f"requests: wrk -t1 -c64, {args.seconds}s x {args.rounds} rounds, alternating order, {placement}")
            for rnd in range(args.rounds):
                for proxy in (proxies if rnd % 2 == 0 else list(reversed(proxies))):
                    before = tree_cpu_seconds(proxy.proc.pid)
                    rps, p99, bad = wrk(load_cpu, proxy.port, nginx.port, args.seconds)
                    cpu = tree_cpu_seconds(proxy.proc.pid) - before
                    results[proxy.name].append((rps, p99))
                    print(f"  round {rnd + 1} {proxy.name:10s} {rps:9.0f} req/s  p99 {p99:7.2f} ms  "
                          f"non-2xx {bad}  {cpu / max(rps * args.seconds, 1) * 1e6:.1f} us CPU/request", flush=True)
            med = {n: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v)) for n, v in results.items()}
            lg = med["linkgate"]
            print("\nmedian over rounds:")
            for name, (rps, p99) in med.items():
                print(f"  {name:10s} {rps:9.0f} req/s  p99 {p99:7.2f} ms   linkgate/this: "
                      f"req/s {lg[0] / rps:.2f}x, p99 {lg[1] / p99:.2f}x")
            target = f"127.0.0.1:{open(source_file).read()}"
            print(f"\nCONNECT tunnel, one stream, {args.seconds}s:")
            for proxy in proxies:
                out = subprocess.run(load_cpu + [LOADGEN, "tunnel", f"127.0.0.1:{proxy.port}", target, str(args.seconds)],
                                     capture_output=True, text=True)
                if out.returncode == 0:
                    print(f"  {proxy.name:10s} {json.loads(out.stdout)['gbps']:.2f} Gbit/s", flush=True)
                else:
                    print(f"  {proxy.name:10s} failed: {out.stderr.strip()}", flush=True)
        finally:
            for proc in procs:
                proc.stop()
            source.terminate()
            source.wait()
            wait_for_time_wait_drain()


if __name__ == "__main__":
    main()
