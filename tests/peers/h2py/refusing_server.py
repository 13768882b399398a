#!/usr/bin/env python3
"""An h2c gRPC echo upstream that refuses or drops the first request it gets,
to test a proxy's retries: only requests the upstream never processed may be
sent again (RFC 9113 §8.7).

    refusing_server.py --mode MODE [--listen 127.0.0.1:0]

The first request on the first connection is handled by MODE; every other
request is answered with its own body as the response message, grpc-status 0,
and the response header `x-conn: N` (the connection that served it).

  goaway          GOAWAY(NO_ERROR, last_stream_id = that stream - 2): the stream
                  was refused unprocessed; the connection closes 0.2 s later.
  refused-stream  RST_STREAM(REFUSED_STREAM) on that stream.
  processed       GOAWAY(NO_ERROR, last_stream_id = that stream), then the
                  connection closes 0.2 s later without an answer: the stream
                  counts as processed and must not be retried.

stdout, one JSON line each: {"event":"listening","address":"HOST:PORT"}, then
{"event":"request","conn":N,"stream":S,"path":...,"body_bytes":B,"action":...}
when a request's body is complete (action: the MODE, or "answered").
"""

import argparse
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.errors
import h2.exceptions

from framelog import emit

MODES = ("goaway", "refused-stream", "processed")


def serve(sock, conn_no, mode, first):
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    bodies, paths = {}, {}
    close_at = None
    try:
        while close_at is None or time.monotonic() < close_at:
            sock.settimeout(0.05 if close_at else None)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers).get(":path")
                    bodies[ev.stream_id] = b""
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if isinstance(ev, h2.events.StreamEnded) or (
                    isinstance(ev, h2.events.RequestReceived) and ev.stream_ended
                ):
                    sid = ev.stream_id
                    action = "answered"
                    if first[0]:
                        first[0] = False
                        action = mode
                    emit({"event": "request", "conn": conn_no, "stream": sid,
                          "path": paths.get(sid), "body_bytes": len(bodies.get(sid, b"")),
                          "action": action})
                    if action == "goaway":
                        conn.close_connection(last_stream_id=max(sid - 2, 0))
                        close_at = time.monotonic() + 0.2
                    elif action == "processed":
                        conn.close_connection(last_stream_id=sid)
                        close_at = time.monotonic() + 0.2
                    elif action == "refused-stream":
                        conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                    else:
                        conn.send_headers(sid, [(":status", "200"),
                                                ("content-type", "application/grpc"),
                                                ("x-conn", str(conn_no))])
                        body = bodies.pop(sid, b"")
                        # Small test bodies: the proxy's window (1 MiB) always has room.
                        step = conn.max_outbound_frame_size
                        for i in range(0, len(body), step):
                            conn.send_data(sid, body[i:i + step])
                        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        pass
    finally:
        sock.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, int(port)))
    lsock.listen(64)
    emit({"event": "listening", "address": "%s:%d" % lsock.getsockname()})
    first = [True]  # shared: only the very first request is refused or dropped
    conn_no = 0
    while True:
        sock, _ = lsock.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn_no += 1
        threading.Thread(target=serve, args=(sock, conn_no, args.mode, first),
                         daemon=True).start()


if __name__ == "__main__":
    main()
