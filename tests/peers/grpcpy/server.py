#!/usr/bin/env python3
"""grpcio server of the proxytest.Test service (tests/proto/test.proto). See README.md.

    server.py [--listen HOST:PORT]    (default 127.0.0.1:0: any free port)

stdout: exactly one line, {"event":"listening","address":"HOST:PORT"}, once serving.
SIGTERM/SIGINT: stop (in-flight calls get 1 s) and exit 0. grpcio's own logs go to stderr.
"""

import argparse
import collections
import hashlib
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

import stubs  # noqa: E402

pb2, pb2_grpc = stubs.load()

# Room for 200 concurrent calls: the sync server runs every call's handler on a pool thread.
WORKERS = 256
POLL = 0.005  # how often a waiting handler checks whether its call has ended
SLEEP_RECORDS = 100
CODES = {c.value[0]: c for c in grpc.StatusCode}


def wait(context, seconds):
    """Sleeps for seconds, or until the call ends. Returns True if the whole time went by."""
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return True
        if not context.is_active():
            return False
        time.sleep(min(POLL, left))


class Stats:
    """Counters for the Stats method; every handler but Stats goes through begin/end."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = self.finished = self.cancelled = self.active = 0
        self.sleeps = collections.deque(maxlen=SLEEP_RECORDS)

    def begin(self):
        with self.lock:
            self.started += 1
            self.active += 1

    def end(self, context):
        # A call still active when its handler is done is being answered; one that is not was
        # cancelled by the client, reset or timed out (an abort only ends it after the handler).
        cancelled = not context.is_active()
        with self.lock:
            self.finished += 1
            self.active -= 1
            self.cancelled += cancelled

    def reply(self):
        with self.lock:
            return pb2.StatsReply(
                calls_started=self.started,
                calls_finished=self.finished,
                calls_cancelled=self.cancelled,
                active=self.active,
                sleeps=list(self.sleeps),
            )


STATS = Stats()


def tracked(handler):
    def wrapper(self, request, context):
        STATS.begin()
        try:
            return handler(self, request, context)
        finally:
            STATS.end(context)
    return wrapper


def tracked_stream(handler):
    # For generators: the count must span the iteration, not just the call that creates it.
    # grpcio drops the generator when the call ends early, which runs the finally.
    def wrapper(self, request, context):
        STATS.begin()
        try:
            yield from handler(self, request, context)
        finally:
            STATS.end(context)
    return wrapper


class TestServicer(pb2_grpc.TestServicer):
    @tracked
    def Unary(self, request, context):
        # grpcio hands -bin values over as bytes and takes bytes back, so echoing is a copy.
        echo = [(m.key, m.value) for m in context.invocation_metadata() if m.key.startswith("x-")]
        if echo:
            context.send_initial_metadata(echo)
            context.set_trailing_metadata(echo)
        return request

    @tracked_stream
    def ServerStream(self, request, context):
        for seq in range(request.count):
            if seq and request.interval_ms and not wait(context, request.interval_ms / 1000):
                return
            yield pb2.Msg(seq=seq, payload=stubs.pattern(seq, request.size))

    @tracked
    def ClientStream(self, request_iterator, context):
        count = size = 0
        digest = hashlib.sha256()
        for msg in request_iterator:
            count += 1
            size += len(msg.payload)
            digest.update(msg.payload)
        return pb2.Summary(count=count, bytes=size, sha256=digest.hexdigest())

    @tracked_stream
    def Bidi(self, request_iterator, context):
        yield from request_iterator

    @tracked
    def Fail(self, request, context):
        code = CODES.get(request.code)
        if code is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no status code %d" % request.code)
        if not request.trailers_only:
            # Puts the response HEADERS on the wire now; the status then comes as trailers.
            # Without it, grpcio sends initial metadata and status in one batch and gRPC core
            # turns that into a Trailers-Only response (one HEADERS frame with END_STREAM).
            context.send_initial_metadata((("x-before-fail", "1"),))
        if code is grpc.StatusCode.OK:
            # abort() refuses OK (it turns it into UNKNOWN), and a unary OK needs a response
            # message anyway, so OK is never Trailers-Only: answer one, carrying the message.
            context.set_details(request.message)
            return pb2.Msg(payload=request.message.encode())
        context.abort(code, request.message)

    @tracked
    def Sleep(self, request, context):
        started = time.monotonic()
        # gRPC core consumes grpc-timeout and never passes it on as metadata; look anyway so the
        # record shows it should that change.
        timeout = [m.value for m in context.invocation_metadata() if m.key == "grpc-timeout"]
        remaining = context.time_remaining()
        # Without a deadline grpcio reports the time left until gpr_inf_future: centuries.
        has_deadline = remaining < 10 * 365 * 86400
        completed = wait(context, request.millis / 1000)
        record = pb2.SleepRecord(
            grpc_timeout=timeout[0] if timeout else "",
            has_deadline=has_deadline,
            time_remaining_ms=remaining * 1000 if has_deadline else 0,
            cancelled=not completed,
            started=started,
            ended=time.monotonic(),
            millis=request.millis,
        )
        with STATS.lock:
            STATS.sleeps.append(record)
        return pb2.Msg()

    def Stats(self, request, context):
        return STATS.reply()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, port 0 for any")
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        # SO_REUSEPORT (grpcio's default) would let a second server bind a busy port silently.
        options=stubs.MESSAGE_OPTIONS + [("grpc.so_reuseport", 0)],
    )
    pb2_grpc.add_TestServicer_to_server(TestServicer(), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit("server.py: cannot listen on %s" % args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    line = {"event": "listening", "address": "%s:%d" % (host, port)}
    print(json.dumps(line, separators=(",", ":")), flush=True)

    stop.wait()  # lock waits are interrupted by signals on POSIX, so the handler gets to run
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
