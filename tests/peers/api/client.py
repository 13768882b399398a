#!/usr/bin/env python3
"""grpcio client of the agent's status API (agent.v1.AgentStatus), for the end-to-end tests.
See README.md.

    client.py COMMAND ADDR [options]

The stubs are generated at start-up from proto/agent/v1/status.proto (grpc_tools.protoc into a
temporary directory, removed again: tests/peers/grpcpy/stubs.py's generate). stdout: JSON lines, each flushed; the last one is
{"event":"done","ok":true|false,"command":COMMAND,...}; exit status 0 iff ok (2: usage error).
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from datetime import datetime

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts

import grpc  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "grpcpy"))
import stubs  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
PROTO_DIR = os.path.join(ROOT, "proto")
PROTO_FILE = "agent/v1/status.proto"
SERVICE = "agent.v1.AgentStatus"

# No proxy from the environment, no transparent retries: what the server answers is reported.
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
]


pb2, pb2_grpc = stubs.generate(PROTO_DIR, PROTO_FILE, "agent.v1.status")


def emit(**fields):
    print(json.dumps(fields, separators=(",", ":")), flush=True)


def to_dict(msg):
    from google.protobuf import json_format
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def rpc_error(e):
    return {"code": e.code().name, "details": e.details()}


def metadata(token):
    return None if token is None else (("authorization", "Bearer " + token),)


def channel(addr):
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


# ---------------------------------------------------------------------------------------------
# all-methods: every method of AgentStatus once


def cmd_all_methods(args):
    stub = pb2_grpc.AgentStatusStub(channel(args.addr))
    problems = []
    called = []
    timeout = args.timeout

    status = stub.GetStatus(pb2.GetStatusRequest(), timeout=timeout)
    called.append("GetStatus")
    emit(event="GetStatus", status=to_dict(status))
    if not status.version or status.pid <= 0:
        problems.append("GetStatus: no version or pid")

    listed = stub.ListBreakers(pb2.ListBreakersRequest(), timeout=timeout)
    called.append("ListBreakers")
    emit(event="ListBreakers", count=len(listed.breakers),
         breakers=[{"name": b.name, "state": b.state} for b in listed.breakers])

    name = args.breaker
    if name is None and listed.breakers:
        name = listed.breakers[0].name
    if name is None:
        problems.append("no breaker to call GetBreaker, TripBreaker and ResetBreaker with")
    else:
        got = stub.GetBreaker(pb2.GetBreakerRequest(name=name), timeout=timeout)
        called.append("GetBreaker")
        emit(event="GetBreaker", breaker=to_dict(got))
        if got.name != name and got.target != name:
            problems.append("GetBreaker(%r) answered breaker %r" % (name, got.name))
    try:
        stub.GetBreaker(pb2.GetBreakerRequest(name="no such breaker"), timeout=timeout)
        problems.append("GetBreaker of an unknown name did not fail")
    except grpc.RpcError as e:
        emit(event="GetBreaker-unknown", **rpc_error(e))
        if e.code() != grpc.StatusCode.NOT_FOUND:
            problems.append("GetBreaker of an unknown name: %s, expected NOT_FOUND" % e.code().name)

    # Watch: the first events the journal holds.
    events = []
    call = stub.Watch(pb2.WatchRequest(from_seq=1), timeout=timeout)
    try:
        for m in call:
            if m.WhichOneof("kind") != "event":
                problems.append("Watch: %s before %d events" % (m.WhichOneof("kind"), args.watch_count))
                break
            events.append({"seq": m.event.seq, "breaker": m.event.breaker, "from": getattr(m.event, "from"),
                           "to": m.event.to, "reason": m.event.reason})
            if len(events) >= args.watch_count:
                break
    except grpc.RpcError as e:
        problems.append("Watch: %s %r" % (e.code().name, e.details()))
    call.cancel()
    called.append("Watch")
    emit(event="Watch", events=events)
    if [e["seq"] for e in events] != list(range(1, args.watch_count + 1)):
        problems.append("Watch from 1: seqs %r, expected 1..%d" % ([e["seq"] for e in events], args.watch_count))

    if name is not None:
        for method in ("TripBreaker", "ResetBreaker"):
            try:
                r = getattr(stub, method)(pb2.BreakerAdminRequest(name=name), timeout=timeout,
                                          metadata=metadata(args.token))
                emit(event=method, changed=r.changed, state=r.breaker.state, reason=r.breaker.reason)
            except grpc.RpcError as e:
                emit(event=method, **rpc_error(e))
                problems.append("%s: %s %r" % (method, e.code().name, e.details()))
            called.append(method)

    expected = sorted(m.name for m in pb2.DESCRIPTOR.services_by_name["AgentStatus"].methods)
    if sorted(set(called)) != expected:
        problems.append("methods called %r, the service has %r" % (sorted(set(called)), expected))
    return problems, {"methods": sorted(set(called))}


# ---------------------------------------------------------------------------------------------
# health, reflection


def cmd_health(args):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(channel(args.addr))
    out = {}
    for service in args.service:
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=args.timeout)
            out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            out[service] = e.code().name
        emit(event="health", service=service, status=out[service])
    problems = ["%r is %s" % (s, v) for s, v in out.items() if v != "SERVING"]
    return problems, {"statuses": out}


def cmd_reflection(args):
    """Lists services over v1alpha (grpcio-reflection's own client) and over v1. grpcio-reflection
    ships only v1alpha stubs; v1's messages are the same on the wire (same fields and numbers,
    only the package differs), so v1 is asked with v1alpha's messages on v1's method path."""
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    ch = channel(args.addr)
    problems = []
    lists = {}
    for version in ("v1alpha", "v1"):
        method = "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version
        call = ch.stream_stream(method,
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        try:
            replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                timeout=args.timeout))
        except grpc.RpcError as e:
            emit(event="reflection", version=version, **rpc_error(e))
            problems.append("reflection %s: %s %r" % (version, e.code().name, e.details()))
            continue
        names = sorted(s.name for r in replies for s in r.list_services_response.service)
        lists[version] = names
        emit(event="reflection", version=version, services=names)
        for want in args.expect:
            if want not in names:
                problems.append("reflection %s does not list %s: %r" % (version, want, names))

    # The descriptor itself, through grpcio-reflection's descriptor database (v1alpha): the
    # service's methods as the server describes them.
    db = ProtoReflectionDescriptorDatabase(ch)
    pool = descriptor_pool.DescriptorPool(db)
    try:
        svc = pool.FindServiceByName(SERVICE)
        methods = sorted(m.name for m in svc.methods)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append("descriptor of %s via reflection: %r" % (SERVICE, e))
        methods = []
    emit(event="descriptor", service=SERVICE, methods=methods)
    local = sorted(m.name for m in pb2.DESCRIPTOR.services_by_name["AgentStatus"].methods)
    if methods and methods != local:
        problems.append("reflection describes methods %r, proto/ has %r" % (methods, local))
    return problems, {"services": lists, "methods": methods}


# ---------------------------------------------------------------------------------------------
# admin, breaker, status


def cmd_admin(args):
    stub = pb2_grpc.AgentStatusStub(channel(args.addr))
    method = {"trip": stub.TripBreaker, "reset": stub.ResetBreaker}[args.action]
    try:
        r = method(pb2.BreakerAdminRequest(name=args.name), timeout=args.timeout,
                   metadata=metadata(args.token))
        fields = {"code": "OK", "details": "", "changed": r.changed,
                  "breaker": to_dict(r.breaker) if r.HasField("breaker") else None}
    except grpc.RpcError as e:
        fields = rpc_error(e)
    emit(event="admin", action=args.action, name=args.name, **fields)
    # ok means the call was made; the code is for the test to judge.
    return [], {"code": fields["code"]}


def cmd_breaker(args):
    stub = pb2_grpc.AgentStatusStub(channel(args.addr))
    try:
        b = stub.GetBreaker(pb2.GetBreakerRequest(name=args.name), timeout=args.timeout)
        fields = {"code": "OK", "breaker": to_dict(b)}
    except grpc.RpcError as e:
        fields = rpc_error(e)
    emit(event="breaker", name=args.name, **fields)
    return [], {"code": fields["code"]}


def cmd_status(args):
    stub = pb2_grpc.AgentStatusStub(channel(args.addr))
    s = stub.GetStatus(pb2.GetStatusRequest(), timeout=args.timeout)
    emit(event="status", status=to_dict(s))
    return [], {}


# ---------------------------------------------------------------------------------------------
# watch: K concurrent streams in one process (grpc.aio)


async def one_watcher(i, args, ch, stall, deadline):
    """Reads events from --from until --count events (or --until SEQ), checking each seq is the
    one after the last. Returns its summary; events' JSON lines go into a sha256 so the test can
    compare them byte for byte with the journal."""
    stub = pb2_grpc.AgentStatusStub(ch)
    digest = hashlib.sha256()
    start = time.monotonic()
    first = None
    expect = args.from_seq if args.from_seq > 0 else None
    count = 0
    problem = None
    lagged = []
    streams = 0
    end = None
    last_t = None
    max_latency = 0.0
    stall_at = None
    resume_from = args.from_seq

    def done():
        if args.to_end:
            return False
        if args.until is not None:
            return expect is not None and expect > args.until
        return count >= args.count

    while not done() and problem is None:
        streams += 1
        call = stub.Watch(pb2.WatchRequest(from_seq=resume_from))
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    problem = "timed out after %d events (next expected %r)" % (count, expect)
                    break
                m = await asyncio.wait_for(call.read(), left)
                if m is grpc.aio.EOF:
                    end = "eof"
                    break
                kind = m.WhichOneof("kind")
                if kind == "lagged":
                    lagged.append({"resume_from_seq": m.lagged.resume_from_seq, "after": count,
                                   "next_expected": expect, "t": time.monotonic()})
                    if m.lagged.resume_from_seq != expect:
                        problem = "lagged says resume from %d, but the next event due is %r" % (
                            m.lagged.resume_from_seq, expect)
                    # The stream must end after it.
                    nxt = await asyncio.wait_for(call.read(), 10)
                    if nxt is not grpc.aio.EOF:
                        problem = "the stream went on after lagged"
                    end = "lagged"
                    break
                e = m.event
                if expect is None:
                    expect = e.seq
                if e.seq != expect:
                    problem = "event %d after %d events, expected %d" % (e.seq, count, expect)
                    break
                if first is None:
                    first = e.seq
                now = time.monotonic()
                last_t = now
                if args.print_events:
                    emit(event="event", watcher=i, seq=e.seq, json=e.json)
                if args.latency and e.seq % 100 == 0:
                    # From the event's wall-clock time (as journaled) to our receipt of it, for
                    # every 100th event (parsing each would cost more than the watch itself).
                    try:
                        ts = datetime.fromisoformat(json.loads(e.json)["ts"]).timestamp()
                        max_latency = max(max_latency, time.time() - ts)
                    except (ValueError, KeyError, TypeError):
                        problem = "event %d: its json is not JSON" % e.seq
                        break
                digest.update(e.json.encode())
                digest.update(b"\n")
                count += 1
                expect = e.seq + 1
                if done():
                    end = "count"
                    break
                if stall and stall_at is None and count == args.stall_after:
                    stall_at = time.monotonic()
                    emit(event="stalling", watcher=i, after=count, seconds=args.stall_seconds,
                         t=stall_at)
                    await asyncio.sleep(args.stall_seconds)
        except grpc.aio.AioRpcError as e:
            end = "status %s %r" % (e.code().name, e.details())
            problem = problem or end
        except asyncio.TimeoutError:
            problem = problem or "timed out waiting for an event (after %d)" % count
        finally:
            call.cancel()
        if end == "lagged" and args.resume_on_lag and problem is None:
            resume_from = lagged[-1]["resume_from_seq"]
            continue
        if args.to_end and end != "count":
            # The end of the stream is what is awaited (the agent stops): whatever status.
            problem = None if problem == end else problem
            break
        if end == "eof" and problem is None:
            problem = "the stream ended after %d events without lagged" % count
        break

    return {
        "event": "watcher", "watcher": i, "stalled": stall, "first": first,
        "last": None if expect is None or count == 0 else expect - 1, "count": count,
        "streams": streams, "lagged": lagged, "end": end,
        "sha256": digest.hexdigest(), "elapsed_s": round(time.monotonic() - start, 3),
        "last_t": last_t, "max_latency_s": round(max_latency, 3) if args.latency else None,
        "problem": problem,
    }


async def watch_main(args):
    # One channel per watcher: each stream its own HTTP/2 connection, as separate clients are.
    # A small receive window and no BDP probing, so that a watcher that stops reading stops the
    # server's sending soon (instead of grpc core buffering megabytes for it).
    options = CHANNEL_OPTIONS + [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if args.window is not None:
        options.append(("grpc.http2.lookahead_bytes", args.window))
    channels = [grpc.aio.insecure_channel(args.addr, options=options) for _ in range(args.watchers)]
    deadline = time.monotonic() + args.timeout
    try:
        # Every stream open before the caller starts anything: connect all channels first.
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in channels))
        emit(event="connected", watchers=args.watchers, t=time.monotonic())
        stalled = set(range(args.stalled)) if args.stall_after else set()
        tasks = [one_watcher(i, args, c, i in stalled, deadline) for i, c in enumerate(channels)]
        results = []
        for fut in asyncio.as_completed(tasks):
            r = await fut
            emit(**r)
            results.append(r)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return results


def cmd_watch(args):
    results = asyncio.run(watch_main(args))
    problems = ["watcher %d: %s" % (r["watcher"], r["problem"]) for r in results if r["problem"]]
    return problems, {"watchers": len(results)}


# ---------------------------------------------------------------------------------------------


COMMANDS = {
    "all-methods": cmd_all_methods,
    "health": cmd_health,
    "reflection": cmd_reflection,
    "admin": cmd_admin,
    "breaker": cmd_breaker,
    "status": cmd_status,
    "watch": cmd_watch,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help):
        c = sub.add_parser(name, help=help)
        c.add_argument("addr", metavar="ADDR", help="HOST:PORT of the status API")
        c.add_argument("--timeout", type=float, default=30, help="seconds, per call (watch: in all)")
        return c

    c = command("all-methods", "call every AgentStatus method once")
    c.add_argument("--token", help="admin token for TripBreaker/ResetBreaker")
    c.add_argument("--breaker", help="breaker for GetBreaker/TripBreaker/ResetBreaker "
                   "(default: the first ListBreakers has)")
    c.add_argument("--watch-count", type=int, default=1, help="events to read from seq 1")

    c = command("health", "grpc.health.v1.Health/Check")
    c.add_argument("--service", action="append", default=None,
                   help="service to check (repeatable; default: \"\" and %s)" % SERVICE)

    c = command("reflection", "list services over reflection v1alpha and v1")
    c.add_argument("--expect", action="append", default=[], help="a service that must be listed")

    c = command("admin", "TripBreaker or ResetBreaker; prints the status code")
    c.add_argument("action", choices=["trip", "reset"])
    c.add_argument("name")
    c.add_argument("--token")

    c = command("breaker", "GetBreaker")
    c.add_argument("name")

    command("status", "GetStatus")

    c = command("watch", "K concurrent Watch streams, each checked for contiguous order")
    c.add_argument("--from", dest="from_seq", type=int, required=True, help="from_seq (0: from now)")
    c.add_argument("--count", type=int, default=None, help="events each watcher reads")
    c.add_argument("--until", type=int, default=None, help="read until this seq (inclusive)")
    c.add_argument("--to-end", action="store_true",
                   help="read until the stream ends, whatever its status (the agent stops)")
    c.add_argument("--print-events", action="store_true",
                   help="one line per event: {\"event\":\"event\",\"watcher\":i,\"seq\":..,\"json\":..}")
    c.add_argument("--watchers", type=int, default=1)
    c.add_argument("--stall-after", type=int, default=0,
                   help="the first --stalled watchers stop reading after N events ...")
    c.add_argument("--stall-seconds", type=float, default=0, help="... for S seconds")
    c.add_argument("--stalled", type=int, default=1, help="how many watchers stall (with --stall-after)")
    c.add_argument("--resume-on-lag", action="store_true",
                   help="after lagged, watch again from its resume_from_seq")
    c.add_argument("--latency", action="store_true",
                   help="note the largest delay from an event's ts (journal time) to its receipt")
    c.add_argument("--window", type=int, default=None, help="grpc.http2.lookahead_bytes")

    args = p.parse_args()
    if args.command == "health" and args.service is None:
        args.service = ["", SERVICE]
    if args.command == "watch" and [args.count is not None, args.until is not None, args.to_end].count(True) != 1:
        p.error("watch: give exactly one of --count, --until and --to-end")

    start = time.monotonic()
    try:
        problems, extra = COMMANDS[args.command](args)
    except grpc.RpcError as e:
        problems, extra = ["unexpected status %s %r" % (e.code().name, e.details())], {}
    ok = not problems
    done = {"event": "done", "ok": ok, "command": args.command,
            "elapsed_ms": round((time.monotonic() - start) * 1000, 1)}
    done.update(extra)
    if problems:
        done["error"] = "; ".join(problems[:10])
    emit(**done)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
