#!/usr/bin/env python3
"""UDP relays side by side: datagrams per second, loss at a fixed rate, and
round-trip latency, through

- direct (the load generator to the echo server: the ceiling)
- a linkgate udp service
- nginx's stream module (`listen ... udp`, Debian libnginx-mod-stream)
- socat (`UDP-RECVFROM:P,fork`: a process per datagram)
- a linkgate udp service across a link (spoke → link → hub)
- rathole's UDP service over its Noise transport (skipped when `rathole` is
  not on PATH: `cargo install rathole`)

The load is bench/loadgen (`udp`): FLOWS client sockets, 64-byte datagrams.
Max rate: at most 32 datagrams in flight per flow, a flow's window refilled
with one segmented send (UDP GSO). The load's sockets take coalesced
datagrams (UDP GRO) and the echo answers a coalesced burst with one
segmented send, so the load costs little per datagram and a relay's rate
is its own. A relay that segments its own sends (linkgate) then hands the
echo one buffer per burst, as on a NIC with UDP segmentation offload; with
--no-gro the load's sockets take datagrams one by one, so each relay pays
the kernel's cutting of its bursts too (and the load is the limit: read
each relay's CPU per round trip then). Loss: a fixed offered
rate (80% of nginx's max by default). Latency: 1,000 datagrams/s, p50/p99.

CPU placement (default, --no-pin to turn off), as in bench/socks.py: a
local relay runs on CPU 0, the load generator and the echo server on CPU 1
(taskset), so no relay competes with the load for its core; each keeps its
default settings (nginx one worker, linkgate a worker pool sized from its
CPU affinity: one). A pair of gateways across a link (linkgate, rathole)
stands for two machines and is not pinned: on one core its two ends would
take turns for every datagram.

Usage: python3 bench/udp.py [--seconds 3] [--flows 8] [--size 64] [--rounds 1] [--no-pin] [--no-gro]
Needs: cargo build --release -p linkgate -p linkgate-loadgen; nginx with
libnginx-mod-stream; socat.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    LINKGATE, LOADGEN, add_pin_option, cpu_placement, free_port, require_release_build, tree_cpu_seconds,
)

PASSWORD = "udp bench password"


def free_udp_port():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Procs:
    """The processes of one relay under test, all started with the same
    CPU placement prefix."""

    def __init__(self, tmp, pin):
        self.tmp, self.pin, self.procs = tmp, pin, []

    def start(self, name, args, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        proc = subprocess.Popen(self.pin + args, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                env=dict(os.environ, **(env or {})))
        self.procs.append(proc)
        return proc

    def cpu(self):
        """CPU seconds used so far by every process of the relay."""
        return sum(tree_cpu_seconds(proc.pid) for proc in self.procs)

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


# Relays made of two gateways joined by a link: never pinned to one core.
PAIRS = ("linkgate link", "rathole noise")

# The load's CPU placement (taskset prefix), set by main().
LOAD_PIN = []


def load(port, flows, seconds, rate, size):
    out = subprocess.run(LOAD_PIN + [LOADGEN, "udp", f"127.0.0.1:{port}", str(flows), str(seconds), str(rate), str(size)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def wait_udp(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = load(port, 1, 0.2, 0, 64)
        if r["received"] > 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers on udp port {port}")


def linkgate_local(tmp, procs, echo):
    port = free_udp_port()
    conf = os.path.join(tmp, "lg-local.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\nshutdown_grace = "1s"\n[[service]]\nname = "u"\ntype = "udp"\n'
                f'listen = "127.0.0.1:{port}"\ntarget = "127.0.0.1:{echo}"\n')
    procs.start("linkgate-local", [LINKGATE, "run", "-c", conf], {"RUST_LOG": "warn"})
    return port


def nginx(tmp, procs, echo):
    port = free_udp_port()
    conf = os.path.join(tmp, "nginx.conf")
    module = "/usr/lib/nginx/modules/ngx_stream_module.so"
    with open(conf, "w") as f:
        f.write(f"load_module {module};\ndaemon off;\nmaster_process off;\nworker_processes 1;\n"
                f"pid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\nevents {{ worker_connections 4096; }}\n"
                f"stream {{ server {{ listen 127.0.0.1:{port} udp; proxy_pass 127.0.0.1:{echo}; "
                f"proxy_timeout 10s; }} }}\n")
    procs.start("nginx", ["nginx", "-c", conf, "-p", tmp])
    return port


def socat(tmp, procs, echo):
    port = free_udp_port()
    procs.start("socat", ["socat", f"UDP-RECVFROM:{port},bind=127.0.0.1,fork", f"UDP-SENDTO:127.0.0.1:{echo}"])
    return port


def linkgate_link(tmp, procs, echo):
    link, port = free_port(), free_udp_port()
    hub, spoke = os.path.join(tmp, "hub.toml"), os.path.join(tmp, "spoke.toml")
    with open(hub, "w") as f:
        f.write(f'[gateway]\nname = "hub"\nidentity = "hub.key"\nshutdown_grace = "1s"\n'
                f'[link]\nlisten = "127.0.0.1:{link}"\n[[peer]]\nname = "spoke"\npassword = "{PASSWORD}"\n'
                f'[[service]]\nname = "u"\ntype = "udp"\nlisten = "link"\ntarget = "127.0.0.1:{echo}"\n'
                f'allow = "peer:spoke"\n')
    with open(spoke, "w") as f:
        f.write(f'[gateway]\nname = "spoke"\nshutdown_grace = "1s"\n[[peer]]\nname = "hub"\n'
                f'connect = "127.0.0.1:{link}"\npassword = "{PASSWORD}"\n'
                f'[[service]]\nname = "u"\ntype = "udp"\nlisten = "127.0.0.1:{port}"\ntarget = "link://hub/u"\n')
    procs.start("linkgate-hub", [LINKGATE, "run", "-c", hub], {"RUST_LOG": "warn"})
    time.sleep(0.5)
    procs.start("linkgate-spoke", [LINKGATE, "run", "-c", spoke], {"RUST_LOG": "warn"})
    return port


def rathole(tmp, procs, echo):
    keys = subprocess.run(["rathole", "--genkey"], capture_output=True, text=True, check=True).stdout.split()
    private, public = keys[keys.index("Private") + 2], keys[keys.index("Public") + 2]
    control, port = free_port(), free_udp_port()
    server, client = os.path.join(tmp, "rathole-server.toml"), os.path.join(tmp, "rathole-client.toml")
    with open(server, "w") as f:
        f.write(f'[server]\nbind_addr = "127.0.0.1:{control}"\n[server.transport]\ntype = "noise"\n'
                f'[server.transport.noise]\nlocal_private_key = "{private}"\n'
                f'[server.services.u]\ntype = "udp"\ntoken = "bench"\nbind_addr = "127.0.0.1:{port}"\n')
    with open(client, "w") as f:
        f.write(f'[client]\nremote_addr = "127.0.0.1:{control}"\n[client.transport]\ntype = "noise"\n'
                f'[client.transport.noise]\nremote_public_key = "{public}"\n'
                f'[client.services.u]\ntype = "udp"\ntoken = "bench"\nlocal_addr = "127.0.0.1:{echo}"\n')
    procs.start("rathole-server", ["rathole", "-s", server], {"RUST_LOG": "warn"})
    time.sleep(0.5)
    procs.start("rathole-client", ["rathole", "-c", client], {"RUST_LOG": "warn"})
    return port


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--flows", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--loss-rate", type=float, default=0, help="offered datagrams/s for the loss test "
                        "(default: 80%% of nginx's max)")
    parser.add_argument("--only", default="", help="comma-separated relay names to run (default: all); "
                        "keep \"nginx stream\" for the default loss rate")
    parser.add_argument("--rounds", type=int, default=1, help="run the relays this many times, interleaved")
    parser.add_argument("--no-gro", action="store_true", help="the load's sockets take datagrams one by one "
                        "(no UDP GRO), so a relay pays for cutting its segmented sends")
    add_pin_option(parser)
    args = parser.parse_args()
    if args.no_gro:
        # Read by bench/loadgen (udp.rs), the echo server and the load alike.
        os.environ["LOADGEN_NO_GRO"] = "1"
    global LOAD_PIN
    relay_pin, LOAD_PIN = cpu_placement(args)
    print("placement: " + ("relay on CPU 0, load and echo on CPU 1" if args.pin else "everything on both CPUs"))
    require_release_build(loadgen=True)
    relays = [("direct", None), ("nginx stream", nginx), ("linkgate", linkgate_local), ("socat", socat),
              ("linkgate link", linkgate_link)]
    if shutil.which("rathole"):
        relays.append(("rathole noise", rathole))
    else:
        print("rathole not on PATH: skipped (cargo install rathole)")
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        relays = [relay for relay in relays if relay[0] in wanted]
    relays = relays * args.rounds
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        echo_file = os.path.join(tmp, "echo.port")
        echo_proc = subprocess.Popen(LOAD_PIN + [LOADGEN, "udpecho", echo_file])
        while not os.path.exists(echo_file) or not open(echo_file).read():
            time.sleep(0.05)
        echo = int(open(echo_file).read())
        try:
            for name, start in relays:
                procs = Procs(tmp, [] if name in PAIRS else relay_pin)
                try:
                    port = echo if start is None else start(tmp, procs, echo)
                    wait_udp(port)
                    cpu_before = procs.cpu()
                    peak = load(port, args.flows, args.seconds, 0, args.size)
                    # The relay's CPU per datagram relayed both ways (one
                    # round trip): what bounds its rate on a core of its own.
                    round_trips = peak["received_per_s"] * args.seconds
                    peak["cpu_us_per_round_trip"] = (procs.cpu() - cpu_before) * 1e6 / max(round_trips, 1)
                    latency = load(port, 1, args.seconds, 1000, args.size)
                    results.setdefault(name, [])
                    results[name].append({"port": port, "peak": peak, "latency": latency})
                    if name == "nginx stream" and not args.loss_rate:
                        args.loss_rate = 0.8 * peak["received_per_s"]
                    cpu_note = f"  {peak['cpu_us_per_round_trip']:.2f} CPU us/round trip" if start else ""
                    print(f"{name:16s} max {peak['received_per_s']:9.0f} datagrams/s (loss {peak['loss']:.3%}){cpu_note}  "
                          f"rtt at 1000/s p50 {latency['rtt_p50_ms']:.3f} p99 {latency['rtt_p99_ms']:.3f} ms",
                          flush=True)
                    if args.loss_rate:
                        fixed = load(port, args.flows, args.seconds, args.loss_rate, args.size)
                        results[name][-1]["fixed"] = fixed
                        print(f"{'':16s} at {args.loss_rate:.0f}/s offered: loss {fixed['loss']:.3%}", flush=True)
                finally:
                    procs.stop()
        finally:
            echo_proc.terminate()
            echo_proc.wait()
    summarize(results)
    print(json.dumps(results))


def summarize(results):
    """Medians over rounds, and each relay against nginx stream: its rate,
    and its capacity on one core (the inverse of its CPU per round trip)."""
    import statistics
    medians = {}
    for name, runs in results.items():
        rate = statistics.median(run["peak"]["received_per_s"] for run in runs)
        cpu = statistics.median(run["peak"]["cpu_us_per_round_trip"] for run in runs)
        medians[name] = (rate, cpu)
    base = medians.get("nginx stream")
    print("\nmedians over rounds:")
    for name, (rate, cpu) in medians.items():
        line = f"  {name:16s} {rate:9.0f} datagrams/s"
        if name != "direct":
            line += f"  {cpu:.2f} CPU us/round trip"
            if base and name != "nginx stream":
                line += f"  vs nginx: rate {rate / base[0]:.2f}x, CPU per round trip {cpu / base[1]:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
