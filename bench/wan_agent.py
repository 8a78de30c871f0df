#!/usr/bin/env python3
"""The parts of bench/wan.py that run inside a namespace.

  serve BULK_PORT ECHO_PORT     bulk source (writes as fast as it may) and echo server
  wait PORT TIMEOUT             exits 0 once a 64-byte echo works through PORT
  measure BULK ECHO SECONDS     idle echo, then bulk alone 2 s, then bulk + echo every
                                20 ms; prints JSON {bulk_mbit, idle_ms, echo_ms: [...]}
"""

import json
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def serve(bulk_port, echo_port):
    def listener(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s

    def bulk_client(conn):
        data = b"\x5a" * CHUNK
        try:
            while True:
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def echo_client(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def accept_loop(s, handler):
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    bulk, echo = listener(bulk_port), listener(echo_port)
    threading.Thread(target=accept_loop, args=(bulk, bulk_client), daemon=True).start()
    accept_loop(echo, echo_client)


def echo_once(sock):
    start = time.perf_counter()
    sock.sendall(b"k" * 64)
    got = 0
    while got < 64:
        data = sock.recv(64 - got)
        if not data:
            raise RuntimeError("echo closed")
        got += len(data)
    return (time.perf_counter() - start) * 1000


def echo_socket(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def wait(port, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with echo_socket(port) as s:
                echo_once(s)
                return 0
        except (OSError, RuntimeError):
            time.sleep(0.2)
    return 1


def measure(bulk_port, echo_port, seconds):
    echo = echo_socket(echo_port)
    idle = sorted(echo_once(echo) for _ in range(20))[10]
    received = [0]
    stop = threading.Event()
    window = {}

    def download():
        s = socket.create_connection(("127.0.0.1", bulk_port), timeout=30)
        while not stop.is_set():
            data = s.recv(CHUNK)
            if not data:
                break
            received[0] += len(data)
        s.close()

    t = threading.Thread(target=download, daemon=True)
    t.start()
    time.sleep(2)
    window["start"], window["bytes"] = time.perf_counter(), received[0]
    times = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        times.append(echo_once(echo))
        time.sleep(0.02)
    elapsed = time.perf_counter() - window["start"]
    moved = received[0] - window["bytes"]
    stop.set()
    echo.close()
    print(json.dumps({"bulk_mbit": moved * 8 / elapsed / 1e6, "idle_ms": idle, "echo_ms": times}))
    return 0


def main():
    role = sys.argv[1]
    if role == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    elif role == "wait":
        sys.exit(wait(int(sys.argv[2]), float(sys.argv[3])))
    elif role == "measure":
        sys.exit(measure(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))


if __name__ == "__main__":
    main()
