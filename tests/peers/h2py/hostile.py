#!/usr/bin/env python3
"""Raw-socket HTTP/2 client sending crafted bytes; logs every frame it sends and
receives as JSON lines on stdout.  See README.md.

CASE is one of: garbage, huge-length, truncated-headers, zero-length, split,
coalesced, not-h2, near-miss.
"""

import argparse
import os
import random
import select
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hpack import Encoder  # noqa: E402  (ships with h2)
from hyperframe.frame import (  # noqa: E402
    GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame,
    WindowUpdateFrame,
)

import framelog  # noqa: E402
from framelog import PREFACE, build_header, emit, now  # noqa: E402

CASES = ["garbage", "huge-length", "truncated-headers", "zero-length", "split",
         "coalesced", "not-h2", "near-miss"]

CANCEL = 0x8
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)


class Peer:
    def __init__(self, sock, host, port, args):
        self.sock = sock
        self.args = args
        self.authority = framelog.authority(host, port)
        self.splitter = framelog.FrameSplitter()
        self.counters = framelog.Counters()
        self.enc = Encoder()
        self.eof = False
        self.close_reason = None
        self.goaways = []
        self.ping_acks = []            # opaque hex of PING ACKs received
        self.settings_acks = 0
        self.server_settings = 0
        self.raw_recv = False          # peer is not speaking HTTP/2 framing
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.send_calls = 0
        self.segs0 = framelog.tcp_data_segs_out(sock)

    # ---------------------------------------------------------------- frames
    @staticmethod
    def raw(type_id, flags, stream, payload=b""):
        return build_header(len(payload), type_id, flags, stream) + payload

    def headers_block(self, path="/", extra=()):
        hdrs = [(":method", "GET"), (":scheme", "http"), (":authority", self.authority),
                (":path", path), ("user-agent", "h2py-hostile")] + list(extra)
        return self.enc.encode(hdrs)

    def headers_frame(self, stream, end_stream=True, path="/", extra=()):
        f = HeadersFrame(stream)
        f.data = self.headers_block(path, extra)
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    @staticmethod
    def settings_frame(ack=False):
        if ack:
            return SettingsFrame(0, flags=["ACK"]).serialize()
        return SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0,
                                          SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize()

    @staticmethod
    def ping_frame(opaque):
        return PingFrame(0, opaque_data=opaque).serialize()

    @staticmethod
    def rst_frame(stream, code=CANCEL):
        return RstStreamFrame(stream, error_code=code).serialize()

    @staticmethod
    def goaway_frame(last=0, code=0):
        return GoAwayFrame(0, last_stream_id=last, error_code=code).serialize()

    @staticmethod
    def window_update_frame(stream, inc):
        return WindowUpdateFrame(stream, window_increment=inc).serialize()

    # ------------------------------------------------------------------ send
    def _sendall(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            self._closed("send failed: %s" % e, by="peer")
            return False
        self.bytes_sent += len(data)
        self.send_calls += 1
        return True

    def _log_sent(self, frame, extra=None, t=None):
        rec = framelog.frame_record("send", frame[:9], frame[9:], extra)
        rec["t"] = t if t is not None else now()
        self.counters.count(rec)
        emit(rec)

    def send_preface(self, split=False):
        if split:
            for i in range(len(PREFACE)):
                if not self._sendall(PREFACE[i:i + 1]):
                    return False
                if i == len(PREFACE) - 1:
                    emit({"event": "preface", "dir": "send", "length": len(PREFACE),
                          "writes": len(PREFACE)})
                time.sleep(self.args.delay)
                self.poll(0)
            return True
        ok = self._sendall(PREFACE)
        if ok:
            emit({"event": "preface", "dir": "send", "length": len(PREFACE)})
        return ok

    def send_frames(self, frames, extra=None):
        """All frames in ONE send() call; log each after the write succeeded."""
        if self.eof:
            return False
        if not self._sendall(b"".join(frames)):
            return False
        t = now()
        for f in frames:
            self._log_sent(f, extra, t)
        return True

    def send_split(self, frames):
        """Each byte of each frame in its own send() call (TCP_NODELAY + sleep)."""
        for f in frames:
            for i in range(len(f)):
                if not self._sendall(f[i:i + 1]):
                    return False
                if i == len(f) - 1:
                    # log before reading, so the reaction is logged after it
                    self._log_sent(f, {"writes": len(f)})
                time.sleep(self.args.delay)
                self.poll(0)
        return True

    def send_malformed(self, data, rec):
        """Write crafted bytes; log the intended frame with malformed:true."""
        if self.eof:
            return False
        ok = self._sendall(data)
        rec = {"dir": "send", **rec, "malformed": True, "bytes_written": len(data) if ok else 0}
        rec["t"] = now()
        self.counters.count(rec)
        emit(rec)
        return ok

    # ------------------------------------------------------------------ recv
    def poll(self, timeout):
        if self.eof:
            return
        try:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return
        if not r:
            return
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError) as e:
            self._closed("reset: %s" % e, by="peer")
            return
        except OSError as e:
            self._closed("recv error: %s" % e, by="peer")
            return
        if not data:
            self._closed("eof", by="peer")
            return
        self.bytes_recv += len(data)
        if self.bytes_recv == len(data) and not framelog.looks_like_server_preface(data):
            self.raw_recv = True
        if self.raw_recv:
            emit({"dir": "recv", "raw": True, "length": len(data),
                  "preview": data[:80].decode("latin-1")})
            return
        for hdr, body in self.splitter.feed(data):
            rec = framelog.frame_record("recv", hdr, body)
            self.counters.count(rec)
            emit(rec)
            t = rec["type_id"]
            if t == GOAWAY:
                self.goaways.append(rec)
            elif t == PING and rec["flags"] & framelog.FLAG_ACK:
                self.ping_acks.append(rec.get("opaque"))
            elif t == SETTINGS:
                if rec["flags"] & framelog.FLAG_ACK:
                    self.settings_acks += 1
                else:
                    self.server_settings += 1

    def wait_for(self, cond, timeout):
        deadline = time.monotonic() + timeout
        while not cond() and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.poll(left)
        return cond()

    def _closed(self, reason, by):
        if self.eof:
            return
        self.eof = True
        self.close_reason = reason
        rec = {"event": "closed", "reason": reason, "by": by}
        if self.splitter.pending():
            rec["trailing_bytes"] = self.splitter.pending()
        emit(rec)

    def finish(self, timeout, half_close=True):
        """Half-close, read until the peer closes (or timeout), then close."""
        if not self.eof and half_close:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())
        if not self.eof:
            self._closed("timeout waiting for peer to close", by="us")
        self.snapshot_segs()
        self.sock.close()

    def error_goaways(self):
        return [g for g in self.goaways if g.get("error_code", 0) != 0]

    def summary(self):
        s = self.counters.summary()
        s.update({"bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv,
                  "send_calls": self.send_calls, "close_reason": self.close_reason})
        if self.sock.fileno() >= 0:
            self.snapshot_segs()
        segs1 = getattr(self, "segs_final", None)
        if self.segs0 is not None and segs1 is not None:
            s["data_segs_out"] = segs1 - self.segs0
        if self.goaways:
            g = self.goaways[0]
            s["goaway_recv"] = {k: g.get(k) for k in ("error_code", "error", "last_stream_id", "debug") if k in g}
        if self.raw_recv:
            s["peer_not_h2"] = True
        return s

    def snapshot_segs(self):
        self.segs_final = framelog.tcp_data_segs_out(self.sock)


# ---------------------------------------------------------------------- cases
def start(p, split_preface=False):
    """Preface + client SETTINGS in one send() call (unless split)."""
    if split_preface:
        return p.send_preface(split=True)
    ok = p._sendall(PREFACE + p.settings_frame())
    if ok:
        emit({"event": "preface", "dir": "send", "length": len(PREFACE)})
        p._log_sent(p.settings_frame())
    return ok


def need_server_settings(p):
    if not p.wait_for(lambda: p.server_settings > 0, p.args.timeout):
        return "no SETTINGS from server (%s)" % (p.close_reason or "timeout")
    return None


def case_garbage(p):
    start(p)
    p.wait_for(lambda: p.server_settings > 0, 0.5)
    seed = p.args.seed if p.args.seed is not None else random.SystemRandom().randrange(2**32)
    data = random.Random(seed).randbytes(p.args.size)
    length, type_id, flags, stream = framelog.parse_header(data[:9]) if len(data) >= 9 else (None,) * 4
    rec = {"type": "GARBAGE", "type_id": None, "flags": None, "stream": None,
           "length": len(data), "seed": seed}
    if length is not None:
        rec["as_header"] = {"type": framelog.type_name(type_id), "type_id": type_id, "flags": flags,
                            "stream": stream & 0x7FFFFFFF, "length": length}
    p.send_malformed(data, rec)
    p.finish(p.args.timeout)
    return True, None


def case_huge_length(p):
    start(p)
    err = need_server_settings(p)
    if err:
        return False, err
    p.send_frames([p.settings_frame(ack=True), p.headers_frame(1, end_stream=False, path="/")])
    p.poll(0.05)
    payload = bytes(p.args.payload_bytes)
    data = build_header(0xFFFFFF, DATA, 0, 1) + payload
    p.send_malformed(data, {"type": "DATA", "type_id": DATA, "flags": 0, "stream": 1,
                            "length": 0xFFFFFF, "payload_sent": len(payload)})
    p.finish(p.args.timeout)
    return True, None


def case_truncated_headers(p):
    start(p)
    err = need_server_settings(p)
    if err:
        return False, err
    p.send_frames([p.settings_frame(ack=True)])
    block = p.headers_block("/", extra=[("x-pad", "p" * 200)])
    n = len(block)
    k = n // 2
    hdr = build_header(n, HEADERS, framelog.FLAG_END_STREAM | framelog.FLAG_END_HEADERS, 1)
    p.send_malformed(hdr + block[:k], {"type": "HEADERS", "type_id": HEADERS,
                                        "flags": framelog.FLAG_END_STREAM | framelog.FLAG_END_HEADERS,
                                        "stream": 1, "length": n, "payload_sent": k,
                                        "truncated": True})
    p.poll(0.2)
    p.finish(p.args.timeout)
    return True, None


def case_zero_length(p):
    start(p)
    err = need_server_settings(p)
    if err:
        return False, err
    # Phase 1, ONE send(): zero-length frames that are valid in context.
    valid = [
        p.settings_frame(ack=True),                              # ACK of server SETTINGS
        p.raw(SETTINGS, 0, 0),                                   # empty SETTINGS
        p.headers_frame(1, end_stream=False, path="/"),          # opens stream 1 (not 0-length)
        p.raw(DATA, 0, 1),
        p.raw(DATA, 0, 1),
        p.raw(DATA, 0, 1),
        p.raw(0x20, 0, 0),                                       # unknown/extension type: ignored
        p.raw(0x21, 0xFF, 1),
        p.raw(DATA, framelog.FLAG_END_STREAM, 1),                # ends the request
        p.ping_frame(b"zerosync"),
    ]
    p.send_frames(valid)
    acked = p.wait_for(lambda: "7a65726f73796e63" in p.ping_acks, p.args.timeout)
    bad = p.error_goaways()
    if not acked or bad:
        p.finish(p.args.timeout)
        return False, ("server rejected valid zero-length frames: %s"
                       % (bad[0].get("error") if bad else "no PING ACK"))
    # Let the empty SETTINGS be ACKed and the stream-1 response arrive.
    p.wait_for(lambda: p.settings_acks >= 2, 0.5)
    p.poll(0.1)
    if not p.args.valid_only:
        # Phase 2, ONE send(): zero-length frames that are invalid (frame size /
        # semantics).  The first one normally makes the server GOAWAY.
        invalid = [
            (p.raw(WINDOW_UPDATE, 0, 0), "WINDOW_UPDATE needs 4 bytes"),
            (p.raw(PING, 0, 0), "PING needs 8 bytes"),
            (p.raw(RST_STREAM, 0, 1), "RST_STREAM needs 4 bytes"),
            (p.raw(PRIORITY, 0, 3), "PRIORITY needs 5 bytes"),
            (p.raw(GOAWAY, 0, 0), "GOAWAY needs >= 8 bytes"),
            (p.raw(HEADERS, framelog.FLAG_END_STREAM | framelog.FLAG_END_HEADERS, 3),
             "empty header block: no pseudo-headers"),
        ]
        if p._sendall(b"".join(f for f, _ in invalid)):
            t = now()
            for f, why in invalid:
                p._log_sent(f, {"malformed": True, "why": why}, t)
    p.finish(p.args.timeout)
    return True, None


def case_split(p):
    # The 24-byte magic in one send() (unless --split-preface), then every
    # frame one byte per send().
    if p.args.split_preface:
        if not p.send_preface(split=True):
            return False, "send failed"
    elif not p.send_preface():
        return False, "send failed"
    p.send_split([p.settings_frame()])
    err = need_server_settings(p)
    if err:
        return False, err
    frames = [
        p.settings_frame(ack=True),
        p.headers_frame(1, end_stream=False, path="/"),  # stream stays open ...
        p.rst_frame(1, CANCEL),                           # ... until we cancel it
        p.window_update_frame(0, 1000),
        p.ping_frame(b"splitsyn"),
    ]
    if not p.send_split(frames):
        return False, "connection closed during split send: %s" % p.close_reason
    acked = p.wait_for(lambda: "73706c697473796e" in p.ping_acks and p.settings_acks >= 1,
                       p.args.timeout)
    p.send_split([p.goaway_frame(0, 0)])
    p.finish(p.args.timeout)
    bad = p.error_goaways()
    if bad:
        return False, "server sent GOAWAY %s" % bad[0].get("error")
    if not acked:
        return False, "no PING ACK / SETTINGS ACK for split frames"
    return True, None


def case_coalesced(p):
    start(p)
    err = need_server_settings(p)
    if err:
        return False, err
    frames = [p.settings_frame(ack=True)]
    sid = 1
    for i in range(p.args.count):
        frames.append(p.ping_frame(i.to_bytes(8, "big")))
        frames.append(p.window_update_frame(0, 1))
        frames.append(p.headers_frame(sid, end_stream=True, path="/"))
        frames.append(p.rst_frame(sid, CANCEL))
        sid += 2
    frames.append(p.ping_frame(b"coalsync"))
    segs_before = framelog.tcp_data_segs_out(p.sock)
    if not p.send_frames(frames):
        return False, "send failed: %s" % p.close_reason
    segs_after = framelog.tcp_data_segs_out(p.sock)
    emit({"event": "coalesced_write", "frames": len(frames), "bytes": sum(map(len, frames)),
          "data_segs_out": (segs_after - segs_before) if segs_before is not None else None})
    acked = p.wait_for(lambda: "636f616c73796e63" in p.ping_acks, p.args.timeout)
    p.poll(0.1)
    if not p.eof:
        p.send_frames([p.goaway_frame(0, 0)])  # last server-initiated stream: none
    p.finish(p.args.timeout)
    bad = p.error_goaways()
    if bad:
        return False, "server sent GOAWAY %s" % bad[0].get("error")
    if not acked:
        return False, "no ACK for final PING"
    n_acks = len(p.ping_acks)
    if n_acks != p.args.count + 1:
        return False, "expected %d PING ACKs, got %d" % (p.args.count + 1, n_acks)
    return True, None


def case_not_h2(p):
    req = ("GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: h2py-hostile\r\nConnection: close\r\n\r\n"
           % p.authority).encode()
    p.send_malformed(req, {"type": "HTTP1_REQUEST", "type_id": None, "flags": None,
                           "stream": None, "length": len(req), "raw": True})
    p.finish(p.args.timeout, half_close=False)
    return True, None


def case_near_miss(p):
    # The preface's first 16 bytes one per send(), then bytes that are not the rest of it:
    # a tracker that starts flows on preface pieces must drop this one.
    for i in range(16):
        if not p._sendall(PREFACE[i:i + 1]):
            return False, "connection closed during the near-miss preface"
        time.sleep(p.args.delay)
    rest = b"\r\nnot the rest of a preface\r\n\r\n"
    p.send_malformed(rest, {"type": "NEAR_MISS_PREFACE", "type_id": None, "flags": None,
                            "stream": None, "length": 16 + len(rest), "raw": True})
    p.finish(p.args.timeout, half_close=False)
    return True, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("case", choices=CASES)
    ap.add_argument("--timeout", type=float, default=3.0,
                    help="seconds to wait for server reactions / close (default 3)")
    ap.add_argument("--delay", type=float, default=0.002,
                    help="split: sleep after each 1-byte send() (default 0.002)")
    ap.add_argument("--split-preface", action="store_true",
                    help="split: also send the 24-byte preface one byte per send()")
    ap.add_argument("--count", type=int, default=100,
                    help="coalesced: number of PING/WINDOW_UPDATE/HEADERS+RST_STREAM groups (default 100)")
    ap.add_argument("--size", type=int, default=1024, help="garbage: number of random bytes (default 1024)")
    ap.add_argument("--seed", type=int, help="garbage: RNG seed (default: random, logged)")
    ap.add_argument("--payload-bytes", type=int, default=4096,
                    help="huge-length: payload bytes actually sent after the header (default 4096)")
    ap.add_argument("--valid-only", action="store_true",
                    help="zero-length: skip the invalid zero-length frames")
    a = ap.parse_args()

    sock = framelog.connect(a.host, a.port, timeout=a.timeout)
    framelog.emit_connected(sock)
    p = Peer(sock, a.host, a.port, a)
    fn = {"garbage": case_garbage, "huge-length": case_huge_length,
          "truncated-headers": case_truncated_headers, "zero-length": case_zero_length,
          "split": case_split, "coalesced": case_coalesced, "not-h2": case_not_h2,
          "near-miss": case_near_miss}[a.case]
    try:
        ok, err = fn(p)
    except KeyboardInterrupt:
        ok, err = False, "interrupted"
    if p.sock.fileno() >= 0:
        p.snapshot_segs()
        p.sock.close()
    done = {"event": "done", "case": a.case, "ok": ok}
    done.update(p.summary())
    if err:
        done["error"] = err
    emit(done)
    if not ok:
        sys.stderr.write("hostile.py: error: %s\n" % err)
        sys.exit(1)


if __name__ == "__main__":
    main()
