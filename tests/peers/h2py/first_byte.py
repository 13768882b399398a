#!/usr/bin/env python3
"""Connection setup, measured: fresh connections one after another, each carrying one gRPC
unary call (test.Echo/Unary, 32 bytes); for each, the times from the start of connect() to the
first byte the server sent (its SETTINGS, usually) and to the response's headers.

    first_byte.py N NAME=HOST:PORT [NAME=HOST:PORT ...]

N connections to each target, the targets taking turns connection by connection (so that
drift on a noisy machine hits them alike). `cargo xtask bench intercept` starts it inside the
intercepted cgroup for the intercepted and explicit targets, outside for direct. Prints one
JSON line: {"NAME": {"first_byte_us": [...], "response_us": [...], "failed": K}, ...}.
"""

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events


def one(host, port, body):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [
        (":method", "POST"), (":scheme", "http"), (":authority", "%s:%d" % (host, port)),
        (":path", "/test.Echo/Unary"), ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    c.send_data(sid, body, end_stream=True)
    s.sendall(c.data_to_send())
    first = None
    response = None
    done = False
    while not done:
        data = s.recv(65536)
        if first is None:
            first = time.perf_counter()
        if not data:
            break
        for e in c.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and response is None:
                response = time.perf_counter()
            if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid:
                done = True
        out = c.data_to_send()
        if out:
            s.sendall(out)
    s.close()
    if first is None or response is None or not done:
        return None
    return (first - t0) * 1e6, (response - t0) * 1e6


def main():
    args = sys.argv[1:]
    n = int(args.pop(0))
    targets = []
    for a in args:
        name, addr = a.split("=", 1)
        host, port = addr.rsplit(":", 1)
        targets.append((name, host, int(port)))
    body = b"\0\0\0\0\x20" + b"a" * 32
    out = {name: {"first_byte_us": [], "response_us": [], "failed": 0} for name, _, _ in targets}
    for _ in range(n):
        for name, host, port in targets:
            try:
                times = one(host, port, body)
            except OSError:
                times = None
            if times is None:
                out[name]["failed"] += 1
            else:
                out[name]["first_byte_us"].append(round(times[0], 1))
                out[name]["response_us"].append(round(times[1], 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
