#!/usr/bin/env python3
"""grpcio server of the proxytest.Test service (tests/proto/test.proto). See README.md.

    server.py [--listen HOST:PORT] [--fault CODE[:AFTER_MESSAGES]] [--delay-ms N] [--every N]
              [--trailers-only] [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]

--listen defaults to 127.0.0.1:0 (any free port). The fault flags set the initial fault mode, as a
Control call would (see FaultRequest in test.proto). --tls-cert and --tls-key serve TLS instead of
h2c; --tls-client-ca also requires a client certificate that CA signed (mTLS). The files are read
again whenever they change, checked at each new connection; established connections keep theirs.

stdout: {"event":"listening","address":"HOST:PORT"} once serving. With TLS, it is followed by
{"event":"tls_loaded","serial":HEX,...} for the first certificate and for every one that replaces it.
SIGTERM/SIGINT: stop (in-flight calls get 1 s) and exit 0. grpcio's own logs go to stderr.
"""

import argparse
import collections
import hashlib
import json
import os
import signal
import ssl
import sys
import tempfile
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
        self.started = self.finished = self.cancelled = self.active = self.faults = 0
        self.sleeps = collections.deque(maxlen=SLEEP_RECORDS)

    def fault(self):
        with self.lock:
            self.faults += 1

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
                faults=self.faults,
            )


STATS = Stats()


class Faults:
    """The server-wide fault mode (a FaultRequest) for Unary, ServerStream and Bidi."""

    def __init__(self):
        self.lock = threading.Lock()
        self.mode = pb2.FaultRequest()
        self.calls = 0  # calls of the affected methods since the mode was set, for `every`

    def set(self, mode):
        with self.lock:
            self.mode = mode
            self.calls = 0

    def take(self):
        """For a call starting now: (delay in seconds, the StatusCode to fail with or None, mode).
        The mode is read once, so a Control during the call does not change it halfway."""
        with self.lock:
            mode = self.mode
            self.calls += 1
            calls = self.calls
        code = None
        if mode.code and calls % max(mode.every, 1) == 0:
            code = CODES[mode.code]
        return mode.delay_ms / 1000, code, mode


FAULTS = Faults()
FAULT_ECHO_KEY = ("x-before-fail", "1")


def fault_message(code):
    return "injected fault %d" % code.value[0]


def start_faulted(context):
    """Applies the delay of the current mode. Returns (code or None, mode), or None when the call
    ended during the delay."""
    delay, code, mode = FAULTS.take()
    if delay and not wait(context, delay):
        return None
    return code, mode


def abort_fault(context, code, mode, headers_sent, metadata=()):
    """Ends the call with the injected status. Unless trailers_only or a message has already put
    the HEADERS on the wire, the HEADERS go out first, so the status comes as trailers."""
    if not headers_sent and not mode.trailers_only:
        context.send_initial_metadata(tuple(metadata) + (FAULT_ECHO_KEY,))
    STATS.fault()
    context.abort(code, fault_message(code))


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
        started = start_faulted(context)
        if started is None:
            return pb2.Msg()  # the call is over; nobody reads this
        code, mode = started
        # grpcio hands -bin values over as bytes and takes bytes back, so echoing is a copy.
        echo = [(m.key, m.value) for m in context.invocation_metadata() if m.key.startswith("x-")]
        if code is not None:
            abort_fault(context, code, mode, headers_sent=False, metadata=echo)
        if echo:
            context.send_initial_metadata(echo)
            context.set_trailing_metadata(echo)
        return request

    @tracked_stream
    def ServerStream(self, request, context):
        started = start_faulted(context)
        if started is None:
            return
        code, mode = started
        count = request.count if code is None else min(request.count, mode.after_messages)
        for seq in range(count):
            if seq and request.interval_ms and not wait(context, request.interval_ms / 1000):
                return
            yield pb2.Msg(seq=seq, payload=stubs.pattern(seq, request.size))
        if code is not None:
            abort_fault(context, code, mode, headers_sent=count > 0)

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
        started = start_faulted(context)
        if started is None:
            return
        code, mode = started
        if code is None:
            yield from request_iterator
            return
        echoed = 0
        while echoed < mode.after_messages:
            msg = next(request_iterator, None)
            if msg is None:
                break  # the client half-closed first: fail now
            yield msg
            echoed += 1
        abort_fault(context, code, mode, headers_sent=echoed > 0)

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

    def Control(self, request, context):
        if request.code and request.code not in CODES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no status code %d" % request.code)
        FAULTS.set(request)
        log_mode("Control", request)
        if request.exit:
            # Late enough for the reply to be on the wire; os._exit skips every cleanup, like a
            # crashed upstream (the listening socket and all connections just close).
            threading.Timer(0.05, os._exit, (0,)).start()
        return pb2.Empty()


def say(**fields):
    print(json.dumps(fields, separators=(",", ":")), flush=True)


class TlsFiles:
    """The certificate, key and client CA files a TLS server serves, re-read when they change.

    grpcio calls fetch() before the handshake of every new connection
    (dynamic_ssl_server_credentials): a stat of the files and, only if one is another file (a
    rename puts another inode there) or has another size or mtime, a read. Files that do not load
    (a key that is not the certificate's, caught between the two renames of a rotation) keep the
    previous configuration and are tried again at the next connection: no handshake ever gets a
    broken one. Established connections keep the certificate they were made with."""

    def __init__(self, cert, key, client_ca):
        self.files = (cert, key, client_ca)
        self.client_auth = client_ca is not None
        self.lock = threading.Lock()
        self.stamp = None  # the stat of the files when last read
        self.served = None  # the (cert, key, client CA) bytes being served
        self.serial = None
        self.initial = self.load(self.files_stamp())
        if self.initial is None:
            sys.exit("server.py: cannot serve TLS with %s" % ", ".join(self.paths()))

    def paths(self):
        return [p for p in self.files if p]

    def files_stamp(self):
        try:
            return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, self.paths()))
        except OSError as e:
            print("server.py: tls: %s" % e, file=sys.stderr, flush=True)
            return None

    def load(self, stamp):
        """A configuration from the files as they are now; None if they cannot be read or do not
        load (logged: tried again at the next connection) or hold what is served already."""
        if stamp is None:
            return None
        try:
            contents = tuple(read_file(p) if p else None for p in self.files)
            if contents == self.served:
                self.stamp = stamp
                return None
            serial = check_key_pair(*contents)
        except (OSError, ssl.SSLError, ValueError, KeyError) as e:
            print("server.py: tls: not loading %s: %s (keeping what is served)"
                  % (", ".join(self.paths()), e), file=sys.stderr, flush=True)
            return None
        self.stamp, self.served, self.serial = stamp, contents, serial
        cert, key, client_ca = contents
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self):
        """dynamic_ssl_server_credentials' fetcher: a new configuration, or None to keep it."""
        with self.lock:
            stamp = self.files_stamp()
            if stamp is None or stamp == self.stamp:
                return None
            config = self.load(stamp)
            if config is not None:
                self.announce()
            return config

    def announce(self):
        say(event="tls_loaded", serial=self.serial, cert=self.files[0],
            client_auth=self.client_auth)

    def credentials(self):
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_auth)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def check_key_pair(cert, key, client_ca):
    """Loads the PEM bytes as Python's ssl would, which refuses a key that is not the
    certificate's, and returns the certificate's serial number in upper-case hex (as
    `openssl x509 -serial` prints it)."""
    with tempfile.TemporaryDirectory(prefix="grpcpy-tls-") as scratch:
        paths = {}
        for name, data in (("cert", cert), ("key", key), ("ca", client_ca)):
            if data is not None:
                paths[name] = os.path.join(scratch, name + ".pem")
                with open(paths[name], "wb") as f:
                    f.write(data)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(paths["cert"], paths["key"])
        if "ca" in paths:
            context.load_verify_locations(paths["ca"])
        # The stdlib's own decoder (its test suite uses it): no third-party package needed.
        return ssl._ssl._test_decode_cert(paths["cert"])["serialNumber"]


def log_mode(source, mode):
    fields = {f.name: getattr(mode, f.name) for f in mode.DESCRIPTOR.fields}
    print("server.py: fault mode from %s: %s" % (source, json.dumps(fields)), file=sys.stderr,
          flush=True)


def fault_arg(text):
    """--fault CODE[:AFTER_MESSAGES] -> (code, after_messages)"""
    code, _, after = text.partition(":")
    try:
        code, after = int(code), int(after or 0)
    except ValueError:
        raise argparse.ArgumentTypeError("expected CODE[:AFTER_MESSAGES], got %r" % text)
    if code not in CODES or after < 0:
        raise argparse.ArgumentTypeError("no status code %d (0..16) or negative count" % code)
    return code, after


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, port 0 for any")
    parser.add_argument("--fault", type=fault_arg, default=(0, 0), metavar="CODE[:AFTER_MESSAGES]",
                        help="initial fault mode: fail Unary, ServerStream and Bidi with CODE "
                        "(streams after AFTER_MESSAGES messages)")
    parser.add_argument("--delay-ms", type=int, default=0, help="initial fault mode: delay of "
                        "every Unary, ServerStream and Bidi call")
    parser.add_argument("--every", type=int, default=0, help="initial fault mode: fail only every "
                        "Nth call")
    parser.add_argument("--trailers-only", action="store_true", help="initial fault mode: a "
                        "failure before any message is Trailers-Only")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate "
                        "(chain) instead of h2c; re-read when it changes")
    parser.add_argument("--tls-key", metavar="FILE", help="with --tls-cert: its PEM private key")
    parser.add_argument("--tls-client-ca", metavar="FILE", help="with --tls-cert: require a "
                        "client certificate signed by this PEM CA (mTLS)")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key) or args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-cert and --tls-key go together; --tls-client-ca needs them")
    initial = pb2.FaultRequest(code=args.fault[0], after_messages=args.fault[1],
                               delay_ms=args.delay_ms, every=args.every,
                               trailers_only=args.trailers_only)
    FAULTS.set(initial)
    if initial != pb2.FaultRequest():
        log_mode("the command line", initial)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        # SO_REUSEPORT (grpcio's default) would let a second server bind a busy port silently.
        options=stubs.MESSAGE_OPTIONS + [("grpc.so_reuseport", 0)],
    )
    pb2_grpc.add_TestServicer_to_server(TestServicer(), server)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if tls:
        port = server.add_secure_port(args.listen, tls.credentials())
    else:
        port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit("server.py: cannot listen on %s" % args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    say(event="listening", address="%s:%d" % (host, port))
    if tls:
        tls.announce()

    stop.wait()  # lock waits are interrupted by signals on POSIX, so the handler gets to run
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
