#!/usr/bin/env python3
"""Unary gRPC calls with raw bytes (no proto), one after another, for upstreams
that echo the request body (refusing_server.py, grpcpeer's /test.Echo/Unary).

    raw_unary.py TARGET [--path /x.Y/Z] [--sizes 5,100,20000] [--timeout 5]

One JSON line per call:
{"event":"call","size":N,"code":"OK","details":...,"echo_ok":bool,"x_conn":...}
and a last {"event":"done","calls":N}. Exit 0 whatever the statuses: the test
judges them.
"""

import argparse
import json
import sys

import grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--path", default="/x.Y/Z")
    ap.add_argument("--sizes", default="5,100,20000")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    call = grpc.insecure_channel(args.target).unary_unary(args.path)
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        body = bytes(i % 251 for i in range(n))
        line = {"event": "call", "size": n}
        try:
            reply, c = call.with_call(body, timeout=args.timeout)
            line.update(code="OK", details="", echo_ok=reply == body,
                        x_conn=dict(c.initial_metadata()).get("x-conn"))
        except grpc.RpcError as e:
            line.update(code=e.code().name, details=e.details(), echo_ok=False)
        print(json.dumps(line), flush=True)
    print(json.dumps({"event": "done", "calls": len(sizes)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
