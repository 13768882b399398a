#!/usr/bin/env python3
"""grpcio client for the proxy's end-to-end tests. See README.md.

    client.py TARGET CASE [options]

TARGET is HOST:PORT. CASE is one of the keys of CASES below. stdout: JSON lines, the last one
{"event":"done","ok":true|false,"case":CASE,...}; exit status 0 iff ok (2 on a usage error).
"""

import argparse
import hashlib
import itertools
import json
import os
import queue
import random
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent import futures

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

import stubs  # noqa: E402

pb2, pb2_grpc = stubs.load()

MIB = 1024 * 1024
FAIL_MESSAGE = "msg for code {}: ünïcode % and spaces"


class CheckFailed(Exception):
    pass


_emit_lock = threading.Lock()


def emit(**fields):
    # Concurrent calls print from several threads: one whole line at a time.
    line = json.dumps(fields, separators=(",", ":"))
    with _emit_lock:
        print(line, flush=True)


def noise(seed, size):
    """Reproducible random bytes: unlike stubs.pattern, a shifted or repeated block shows."""
    return random.Random(seed).randbytes(size)


def expect_equal(what, expected, got):
    if expected != got:
        raise CheckFailed("%s: expected %r, got %r" % (what, expected, got))


def expect_bytes(what, expected, got):
    if expected == got:
        return
    if len(expected) != len(got):
        raise CheckFailed("%s: expected %d bytes, got %d" % (what, len(expected), len(got)))
    i = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
    raise CheckFailed("%s: byte %d of %d is 0x%02x, expected 0x%02x"
                      % (what, i, len(expected), got[i], expected[i]))


def expect_echo(what, request, response):
    """request is a Msg, or the raw bytes of a grpc-go call."""
    if isinstance(request, bytes):
        expect_bytes(what, request, response)
    else:
        expect_equal(what + " seq", request.seq, response.seq)
        expect_bytes(what + " payload", request.payload, response.payload)


def expect_status(what, call, code):
    if call.code() != code:
        raise CheckFailed("%s: expected status %s, got %s %r"
                          % (what, code.name, call.code().name, call.details()))


def ping_pong(method, requests):
    """Sends each request on one stream only after the echo of the previous one has arrived and
    checked out, then half-closes and expects the end of the stream with OK."""
    outbox = queue.Queue()
    call = method(iter(outbox.get, None))
    try:
        for i, request in enumerate(requests):
            outbox.put(request)
            response = next(call, None)
            if response is None:
                raise CheckFailed("stream ended after %d of %d echoes: %s %r"
                                  % (i, len(requests), call.code().name, call.details()))
            expect_echo("echo %d" % i, request, response)
        outbox.put(None)
        extra = sum(1 for _ in call)
        expect_equal("messages after the half-close", 0, extra)
        expect_status("bidi stream", call, grpc.StatusCode.OK)
    finally:
        outbox.put(None)  # lets grpcio's request-consuming thread finish on an early exit
        call.cancel()     # no-op once the call is over
    return len(requests)


def case_unary(stub, args):
    calls = 0
    for size in (0, 1, 100, 16384):
        for _ in range(10):
            request = pb2.Msg(seq=calls, payload=noise(calls, size))
            expect_echo("call %d (%d bytes)" % (calls, size), request, stub.Unary(request))
            calls += 1
    return {"calls": calls}


def case_metadata(stub, args):
    sent = [("x-custom", "hello"), ("x-multi", "one"), ("x-multi", "two"),
            ("x-data-bin", bytes(range(256)))]

    def by_key(metadata):
        # Values keep their order per key; the order between different keys is not compared.
        out = {}
        for key, value in metadata:
            if key.startswith("x-"):
                out.setdefault(key, []).append(value)
        return out

    _, call = stub.Unary.with_call(pb2.Msg(seq=1, payload=b"metadata"), metadata=sent)
    expect_equal("echoed initial metadata", by_key(sent), by_key(call.initial_metadata()))
    expect_equal("echoed trailing metadata", by_key(sent), by_key(call.trailing_metadata()))
    return {"keys": sorted(by_key(sent))}


def check_stream(what, responses, count, size):
    n = 0
    for msg in responses:
        expect_equal("%s message %d seq" % (what, n), n, msg.seq)
        expect_bytes("%s message %d payload" % (what, n), stubs.pattern(n, size), msg.payload)
        n += 1
    expect_equal(what + " messages", count, n)


def case_server_stream(stub, args):
    check_stream("server stream", stub.ServerStream(pb2.StreamRequest(count=1000, size=100)),
                 1000, 100)
    return {"messages": 1000}


def case_client_stream(stub, args):
    messages = [pb2.Msg(seq=i, payload=noise(i, (i * 37) % 2000)) for i in range(1000)]
    summary = stub.ClientStream(iter(messages))
    payloads = b"".join(m.payload for m in messages)
    expect_equal("summary count", len(messages), summary.count)
    expect_equal("summary bytes", len(payloads), summary.bytes)
    expect_equal("summary sha256", hashlib.sha256(payloads).hexdigest(), summary.sha256)
    return {"messages": len(messages), "bytes": len(payloads)}


def case_bidi(stub, args):
    requests = [pb2.Msg(seq=i, payload=noise(i, i * 10)) for i in range(200)]
    return {"round_trips": ping_pong(stub.Bidi, requests)}


def case_large(stub, args):
    request = pb2.Msg(seq=7, payload=noise(7, 4 * MIB))
    expect_echo("4 MiB unary", request, stub.Unary(request))
    check_stream("4 MiB stream", stub.ServerStream(pb2.StreamRequest(count=3, size=4 * MIB)),
                 3, 4 * MIB)
    return {"unary_bytes": 4 * MIB, "stream_messages": 3}


def case_status(stub, args):
    failures = []
    for code in grpc.StatusCode:
        number = code.value[0]
        for trailers_only in (True, False):
            message = FAIL_MESSAGE.format(number)
            request = pb2.FailRequest(code=number, message=message, trailers_only=trailers_only)
            try:
                response, call = stub.Fail.with_call(request)
            except grpc.RpcError as e:
                response, call = None, e
            initial = [k for k, _ in call.initial_metadata()]
            problems = []
            if call.code() != code:
                problems.append("code %s instead of %s" % (call.code().name, code.name))
            elif code is grpc.StatusCode.OK:
                if response.payload != message.encode():
                    problems.append("response payload %r instead of %r"
                                    % (response.payload, message))
            elif call.details() != message:
                problems.append("message %r instead of %r" % (call.details(), message))
            # The server adds x-before-fail to the HEADERS it sends ahead of the status.
            if trailers_only == ("x-before-fail" in initial):
                problems.append("initial metadata keys %s" % initial)
            emit(event="status", code=number, trailers_only=trailers_only,
                 got_code=call.code().name, got_details=call.details(), initial_metadata=initial,
                 ok=not problems)
            failures += ["code %d trailers_only=%s: %s" % (number, trailers_only, p)
                         for p in problems]
    if failures:
        raise CheckFailed("; ".join(failures))
    return {"calls": 2 * len(grpc.StatusCode)}


def case_deadline(stub, args):
    count = args.count or 1
    timeout_ms = 200 if args.timeout_ms is None else args.timeout_ms

    def one(i):
        start = time.monotonic()
        try:
            stub.Sleep(pb2.SleepRequest(millis=args.sleep_ms), timeout=timeout_ms / 1000)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        elapsed = (time.monotonic() - start) * 1000
        emit(event="deadline", call=i, code=code.name, details=details,
             elapsed_ms=round(elapsed, 3))
        return code, elapsed

    with futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(count)))
    codes = Counter(code.name for code, _ in results)
    elapsed = [e for _, e in results]
    summary = {"count": count, "codes": dict(codes), "max_elapsed_ms": round(max(elapsed), 3),
               "median_elapsed_ms": round(statistics.median(elapsed), 3)}
    if codes["DEADLINE_EXCEEDED"] != count:
        raise CheckFailed("expected DEADLINE_EXCEEDED for all %d calls, got %s"
                          % (count, dict(codes)), summary)
    return summary


def case_stats(stub, args):
    def plain(msg):
        return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
    reply = stub.Stats(pb2.Empty())
    emit(event="stats", **dict(plain(reply), sleeps=[plain(r) for r in reply.sleeps]))
    return {}


def case_server_stream_slow(stub, args):
    count = args.count or 10
    interval_ms = 100 if args.interval_ms is None else args.interval_ms
    request = pb2.StreamRequest(count=count, size=100, interval_ms=interval_ms)
    call = stub.ServerStream(request)
    received, problem = 0, None
    try:
        for msg in call:
            emit(event="message", seq=msg.seq, t=time.monotonic())
            if problem is None:
                try:
                    expect_equal("message %d seq" % received, received, msg.seq)
                    expect_bytes("message %d payload" % received, stubs.pattern(received, 100),
                                 msg.payload)
                except CheckFailed as e:
                    problem = e
            received += 1
    except grpc.RpcError:
        pass  # the status below says how the stream ended; that is for the test to judge
    emit(event="status", code=call.code().name, details=call.details() or "", t=time.monotonic())
    summary = {"messages": received, "status": call.code().name}
    if problem:
        raise CheckFailed(str(problem), summary)
    return summary


def case_inflight(stub, args):
    count = args.count or 10
    calls = [stub.Sleep.future(pb2.SleepRequest(millis=args.sleep_ms)) for _ in range(count)]
    # "Started" means the server runs every handler, which only its Stats can tell.
    give_up = time.monotonic() + max(5, 2 * args.sleep_ms / 1000)
    while True:
        active = stub.Stats(pb2.Empty()).active
        if active >= count or time.monotonic() > give_up or all(c.done() for c in calls):
            break
        time.sleep(0.01)
    emit(event="started", count=count, active=active)
    codes = Counter(c.code().name for c in calls)  # code() waits for the end of the call
    summary = {"count": count, "active_at_start": active, "codes": dict(codes)}
    if codes["OK"] != count:
        raise CheckFailed("expected OK for all %d calls, got %s" % (count, dict(codes)), summary)
    return summary


def case_grpc_go(stub, args):
    # test.Echo of tests/peers/grpcpeer: its rawCodec takes the message bytes as they are, so
    # grpcio's generic calls without (de)serializers talk to it directly.
    channel = stub.channel
    unary = channel.unary_unary("/test.Echo/Unary")
    stream = channel.stream_stream("/test.Echo/Stream")
    sizes = (0, 100, 16384, 4 * MIB)
    for size in sizes:
        request = noise(size, size)
        expect_echo("unary %d bytes" % size, request, unary(request))
    round_trips = ping_pong(stream, [noise(i, i % 300) for i in range(1000)])
    # Client-stream style: everything sent and the half-close before reading a single echo.
    requests = [noise(i, 1000 + i) for i in range(100)]
    call = stream(iter(requests))
    echoes = list(call)
    expect_equal("echoes after sending 100 and half-closing", len(requests), len(echoes))
    for i, (request, echo) in enumerate(zip(requests, echoes)):
        expect_echo("echo %d" % i, request, echo)
    expect_status("half-closed stream", call, grpc.StatusCode.OK)
    return {"unary_sizes": list(sizes), "round_trips": round_trips,
            "half_closed_echoes": len(echoes)}


LOAD_SIZE = 16  # payload bytes of the load case's unary requests and stream messages
LOAD_DETAILS = 3  # distinct details strings kept per status code in the load summary


def status_code(text):
    """A status code given by name (UNAVAILABLE) or number (14)."""
    text = text.strip()
    for code in grpc.StatusCode:
        if text.upper() == code.name or text == str(code.value[0]):
            return code
    raise argparse.ArgumentTypeError("no status code %r" % text)


def header_arg(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % text)
    key = key.lower()
    # grpcio wants bytes for binary headers; the value is sent as its UTF-8 bytes.
    return key, value.encode() if key.endswith("-bin") else value


def load_call(stub, args, i, metadata, timeout):
    """One call of the load case. Returns (code, details, messages, problem): messages is the
    number of response messages, problem a description of a wrong response (None if right)."""
    messages, problem = 0, None
    try:
        if args.method == "unary":
            request = pb2.Msg(seq=i, payload=noise(i, LOAD_SIZE))
            response = stub.Unary(request, metadata=metadata, timeout=timeout)
            messages = 1
            try:
                expect_echo("echo", request, response)
            except CheckFailed as e:
                problem = str(e)
        elif args.method == "fail":
            request = pb2.FailRequest(code=args.code.value[0], message=args.message,
                                      trailers_only=args.trailers_only)
            stub.Fail(request, metadata=metadata, timeout=timeout)
            messages = 1
        else:
            request = pb2.StreamRequest(count=args.stream_count, size=LOAD_SIZE)
            call = stub.ServerStream(request, metadata=metadata, timeout=timeout)
            for msg in call:
                if problem is None:
                    try:
                        expect_equal("message %d seq" % messages, messages, msg.seq)
                        expect_bytes("message %d payload" % messages,
                                     stubs.pattern(messages, LOAD_SIZE), msg.payload)
                    except CheckFailed as e:
                        problem = str(e)
                messages += 1
            if problem is None and messages != args.stream_count:
                problem = "status OK after %d of %d messages" % (messages, args.stream_count)
        return grpc.StatusCode.OK, "", messages, problem
    except grpc.RpcError as e:
        return e.code(), e.details() or "", messages, problem


def call_token(args, i):
    """An HS256 JWT of its own for call i: subject `<--token-sub-prefix><i>`, expired an hour ago, signed
    with the secret in the file --token-per-call names (so each call is another client)."""
    import jwt  # pyjwt; only this option needs it
    if not hasattr(call_token, "secret"):
        with open(args.token_per_call, "rb") as f:
            call_token.secret = f.read()
    claims = {"sub": "%s%d" % (args.token_sub_prefix, i), "scope": "read:test", "exp": int(time.time()) - 3600}
    return jwt.encode(claims, call_token.secret, algorithm="HS256")


def case_load(stub, args):
    count = 100 if args.count is None else args.count
    timeout = None if args.timeout_ms is None else args.timeout_ms / 1000
    pause = (args.interval_ms or 0) / 1000
    metadata = tuple(args.header)
    expected = set(args.expect_codes) if args.expect_codes else None
    indices = itertools.count()
    lock = threading.Lock()
    codes = Counter()
    details = {}
    problems = []

    def worker():
        first = True
        while True:
            with lock:
                i = next(indices)
            if i >= count:
                return
            if not first and pause:
                time.sleep(pause)
            first = False
            t = time.monotonic()
            md = metadata
            if args.token_per_call:
                md = metadata + (("authorization", "Bearer " + call_token(args, i)),)
            try:
                code, text, messages, problem = load_call(stub, args, i, md, timeout)
            except Exception as e:  # anything but a status is a bug in the test or the proxy
                code, text, messages, problem = None, "", 0, "%s: %s" % (type(e).__name__, e)
            ms = (time.monotonic() - t) * 1000
            name = code.name if code is not None else "EXCEPTION"
            with lock:
                codes[name] += 1
                if code is not grpc.StatusCode.OK:
                    seen = details.setdefault(name, [])
                    if text not in seen and len(seen) < LOAD_DETAILS:
                        seen.append(text)
                if problem is not None:
                    problems.append("call %d: %s" % (i, problem))
            if args.per_call:
                line = {"event": "call", "i": i, "code": name, "details": text,
                        "ms": round(ms, 3), "messages": messages, "t": t}
                if problem is not None:
                    line["problem"] = problem
                emit(**line)

    with futures.ThreadPoolExecutor(max(args.concurrency, 1)) as pool:
        for f in [pool.submit(worker) for _ in range(max(args.concurrency, 1))]:
            f.result()
    summary = {"method": args.method, "count": count, "codes": dict(codes), "details": details}
    errors = problems[:5]
    if expected is not None:
        others = sorted(set(codes) - {c.name for c in expected})
        if others:
            errors.insert(0, "codes %s not in --expect-codes %s"
                          % (others, sorted(c.name for c in expected)))
    if errors:
        if len(problems) > 5:
            errors.append("and %d more" % (len(problems) - 5))
        raise CheckFailed("; ".join(errors), summary)
    return summary


def case_control(stub, args):
    mode = pb2.FaultRequest(code=args.code.value[0], after_messages=args.after_messages,
                            delay_ms=args.delay_ms, trailers_only=args.trailers_only,
                            every=args.every, exit=args.exit)
    stub.Control(mode)
    return {"mode": {f.name: getattr(mode, f.name) for f in mode.DESCRIPTOR.fields}}


CASES = {
    "unary": case_unary,
    "metadata": case_metadata,
    "server-stream": case_server_stream,
    "client-stream": case_client_stream,
    "bidi": case_bidi,
    "large": case_large,
    "status": case_status,
    "deadline": case_deadline,
    "stats": case_stats,
    "server-stream-slow": case_server_stream_slow,
    "inflight": case_inflight,
    "grpc-go": case_grpc_go,
    "load": case_load,
    "control": case_control,
}


def open_channel(args):
    options = stubs.MESSAGE_OPTIONS + [
        # Talk to TARGET itself even if http_proxy/https_proxy are set in the environment.
        ("grpc.enable_http_proxy", 0),
        # No transparent retries: a stream the proxy refuses or resets must show, not be redone.
        ("grpc.enable_retries", 0),
    ]
    if args.tls_ca:
        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=read(args.tls_ca),
                                                   private_key=read(args.tls_key),
                                                   certificate_chain=read(args.tls_cert))
        if args.authority:
            options.append(("grpc.ssl_target_name_override", args.authority))
        return grpc.secure_channel(args.target, credentials, options=options)
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    return grpc.insecure_channel(args.target, options=options)


class Stub(pb2_grpc.TestStub):
    def __init__(self, channel):
        super().__init__(channel)
        self.channel = channel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--tls-ca", help="PEM file of the CA: TLS instead of cleartext h2c")
    parser.add_argument("--authority", help="TLS: name the certificate is checked against (and "
                        ":authority); cleartext: :authority")
    parser.add_argument("--tls-cert", metavar="FILE", help="with --tls-ca: present this PEM client "
                        "certificate (chain), for servers that require one (mTLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="with --tls-cert: its PEM private key")
    parser.add_argument("--timeout-ms", "--deadline-ms", type=int, help="call deadline: deadline "
                        "(default 200), load (default none)")
    parser.add_argument("--sleep-ms", type=int, default=1000,
                        help="deadline, inflight: Sleep length")
    parser.add_argument("--count", type=int, help="deadline (1), inflight (10), server-stream-slow "
                        "(10), load (100): number of calls or messages")
    parser.add_argument("--concurrency", type=int, default=1, help="deadline, load: calls at once")
    parser.add_argument("--interval-ms", "--pause-ms", type=int, help="server-stream-slow: pause "
                        "between messages (default 100); load: pause between the calls of one "
                        "worker (default 0)")
    parser.add_argument("--method", choices=("unary", "server-stream", "fail"), default="unary",
                        help="load: the method called")
    parser.add_argument("--stream-count", type=int, default=5,
                        help="load --method server-stream: messages asked for per call")
    parser.add_argument("--header", type=header_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="load: metadata on every call (repeatable)")
    parser.add_argument("--token-sub-prefix", default="user-",
                        help="load, --token-per-call: call i's subject is PREFIX<i>")
    parser.add_argument("--token-per-call", metavar="SECRET_FILE",
                        help="load: each call carries its own expired HS256 token (sub user-<i>) "
                        "signed with the secret in this file")
    parser.add_argument("--per-call", action="store_true",
                        help="load: one {\"event\":\"call\"} line per call")
    parser.add_argument("--expect-codes", type=lambda t: [status_code(c) for c in t.split(",")],
                        metavar="CODE[,CODE...]", help="load: ok only if every call ended with "
                        "one of these (names or numbers)")
    parser.add_argument("--code", type=status_code, default=grpc.StatusCode.OK,
                        help="control: the fault status (0 = no fault); load --method fail: "
                        "the status asked for (name or number)")
    parser.add_argument("--message", default="load fail",
                        help="load --method fail: the grpc-message asked for")
    parser.add_argument("--trailers-only", action="store_true", help="control: failures before "
                        "any message are Trailers-Only; load --method fail: FailRequest field")
    parser.add_argument("--after-messages", type=int, default=0,
                        help="control: stream messages before the fault")
    parser.add_argument("--delay-ms", type=int, default=0,
                        help="control: delay of every Unary, ServerStream and Bidi call")
    parser.add_argument("--every", type=int, default=0, help="control: fail only every Nth call")
    parser.add_argument("--exit", action="store_true",
                        help="control: the server exits 50 ms after answering")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key) or args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert and --tls-key go together, and need --tls-ca")

    start = time.monotonic()
    with open_channel(args) as channel:
        try:
            details = CASES[args.case](Stub(channel), args)
            ok, error = True, None
        except CheckFailed as e:
            ok, error = False, e.args[0]
            details = e.args[1] if len(e.args) > 1 else {}
        except grpc.RpcError as e:
            ok, error, details = False, "unexpected status %s %r" % (e.code().name, e.details()), {}
    done = {"event": "done", "ok": ok, "case": args.case}
    if error:
        done["error"] = error
    done.update(details)
    done["elapsed_ms"] = round((time.monotonic() - start) * 1000, 3)
    emit(**done)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
