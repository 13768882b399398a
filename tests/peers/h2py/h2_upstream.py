#!/usr/bin/env python3
"""A scripted h2c gRPC upstream (Python h2), to test what a proxy does with an
upstream's GOAWAY, REFUSED_STREAM, deadlines and cancels.

    h2_upstream.py --mode MODE [--listen 127.0.0.1:0]

Except in `hold` mode, the first request on the first connection is handled by
MODE and every other request is answered with its own body as the response
message, grpc-status 0, and the response header `x-conn: N` (the connection
that served it).

  goaway          GOAWAY(NO_ERROR, last_stream_id = that stream - 2): the stream
                  was refused unprocessed; the connection closes 0.2 s later.
  refused-stream  RST_STREAM(REFUSED_STREAM) on that stream.
  processed       GOAWAY(NO_ERROR, last_stream_id = that stream), then the
                  connection closes 0.2 s later without an answer: the stream
                  counts as processed and must not be retried.
  hold            every request is held open and never answered (a server
                  that hangs), to watch deadlines and cancels arrive.

stdout, one JSON line each (every line has "t", time.monotonic()):
  {"event":"listening","address":"HOST:PORT"}
  {"event":"headers","conn":N,"stream":S,"path":...,"grpc_timeout":"198744u"|null}
      when a request's headers arrive;
  {"event":"request","conn":N,"stream":S,"path":...,"body_bytes":B,"action":...}
      when its body is complete (action: the MODE, or "answered");
  {"event":"reset","conn":N,"stream":S,"error":"CANCEL"} for each RST_STREAM
      received.
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

MODES = ("goaway", "refused-stream", "processed", "hold")


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
                    headers = dict(ev.headers)
                    paths[ev.stream_id] = headers.get(":path")
                    bodies[ev.stream_id] = b""
                    emit({"event": "headers", "conn": conn_no, "stream": ev.stream_id,
                          "path": paths[ev.stream_id],
                          "grpc_timeout": headers.get("grpc-timeout")})
                elif isinstance(ev, h2.events.StreamReset):
                    emit({"event": "reset", "conn": conn_no, "stream": ev.stream_id,
                          "error": ev.error_code.name})
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if isinstance(ev, h2.events.StreamEnded) or (
                    isinstance(ev, h2.events.RequestReceived) and ev.stream_ended
                ):
                    sid = ev.stream_id
                    action = "answered"
                    if mode == "hold":
                        action = "hold"
                    elif first[0]:
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
                    elif action == "hold":
                        pass
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
