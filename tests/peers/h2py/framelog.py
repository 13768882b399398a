"""Shared helpers for the h2py test peers: JSON-lines logging of HTTP/2 frames
exactly as they appear on the wire, frame splitting, socket setup.

Every frame line looks like
  {"dir":"send"|"recv","type":"HEADERS","type_id":1,"flags":5,"stream":1,"length":13,"t":...}
plus optional detail keys (error_code/error, last_stream_id, debug, increment,
settings, ack, parse_error, malformed, ...).  Event lines carry an "event" key
and no "dir"/"type" frame fields (except "preface", see README).
"""

import json
import os
import socket
import struct
import sys
import time

from hyperframe.frame import Frame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

FRAME_NAMES = {
    0x0: "DATA",
    0x1: "HEADERS",
    0x2: "PRIORITY",
    0x3: "RST_STREAM",
    0x4: "SETTINGS",
    0x5: "PUSH_PROMISE",
    0x6: "PING",
    0x7: "GOAWAY",
    0x8: "WINDOW_UPDATE",
    0x9: "CONTINUATION",
    0xA: "ALTSVC",
    0xC: "ORIGIN",
    0x10: "PRIORITY_UPDATE",
}

ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

FLAG_ACK = 0x1
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

_HDR = struct.Struct(">HBBBL")


def type_name(type_id):
    if type_id is None:
        return None
    return FRAME_NAMES.get(type_id, "UNKNOWN_0x%02X" % type_id)


def now():
    # CLOCK_MONOTONIC: same clock as bpf_ktime_get_ns() (in seconds).
    return round(time.monotonic(), 6)


def emit(obj):
    """Print one JSON line on stdout and flush."""
    if "t" not in obj:
        obj["t"] = now()
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def die(msg, code=1):
    """Fatal error before any session exists: error + done lines, exit."""
    emit({"event": "error", "message": msg})
    emit({"event": "done", "ok": False, "error": msg})
    sys.stderr.write("%s: error: %s\n" % (os.path.basename(sys.argv[0]), msg))
    sys.stderr.flush()
    sys.exit(code)


def build_header(length, type_id, flags, stream):
    return _HDR.pack((length >> 8) & 0xFFFF, length & 0xFF, type_id, flags, stream)


def parse_header(hdr):
    a, b, type_id, flags, stream = _HDR.unpack(bytes(hdr[:9]))
    return (a << 8) | b, type_id, flags, stream


def frame_record(direction, hdr, body, extra=None):
    """Describe one frame (9-byte header + payload bytes) as a log dict.

    The numeric fields come straight from the header bytes; hyperframe is used
    to parse the payload for detail fields and to flag frames it rejects.
    """
    length, type_id, flags, raw_stream = parse_header(hdr)
    rec = {
        "dir": direction,
        "type": type_name(type_id),
        "type_id": type_id,
        "flags": flags,
        "stream": raw_stream & 0x7FFFFFFF,
        "length": length,
    }
    if raw_stream & 0x80000000:
        rec["reserved_bit"] = 1
    if len(body) == length:
        try:
            f, _ = Frame.parse_frame_header(memoryview(bytes(hdr[:9])), strict=False)
            f.parse_body(memoryview(bytes(body)))
            _details(rec, type_id, flags, f)
        except Exception as e:  # hyperframe rejects the payload
            rec["parse_error"] = "%s: %s" % (type(e).__name__, e)
    if extra:
        rec.update(extra)
    return rec


def _details(rec, type_id, flags, f):
    if type_id == 0x3:  # RST_STREAM
        rec["error_code"] = f.error_code
        rec["error"] = ERROR_NAMES.get(f.error_code, "UNKNOWN")
    elif type_id == 0x7:  # GOAWAY
        rec["error_code"] = f.error_code
        rec["error"] = ERROR_NAMES.get(f.error_code, "UNKNOWN")
        rec["last_stream_id"] = f.last_stream_id
        if f.additional_data:
            rec["debug"] = f.additional_data[:200].decode("latin-1")
    elif type_id == 0x8:  # WINDOW_UPDATE
        rec["increment"] = f.window_increment
    elif type_id == 0x4:  # SETTINGS
        if not flags & FLAG_ACK:
            rec["settings"] = {str(int(k)): v for k, v in f.settings.items()}
    elif type_id == 0x6:  # PING
        rec["opaque"] = f.opaque_data.hex()


def looks_like_server_preface(data):
    """An HTTP/2 server's first frame must be SETTINGS on stream 0."""
    if len(data) < 9:
        return True  # too short to judge
    return data[3] == 0x4 and data[5:9] == b"\0\0\0\0"


class FrameSplitter:
    """Incrementally splits a byte stream into (header, payload) frames."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 9:
            length = (self.buf[0] << 16) | (self.buf[1] << 8) | self.buf[2]
            if len(self.buf) < 9 + length:
                break
            hdr = bytes(self.buf[:9])
            body = bytes(self.buf[9:9 + length])
            del self.buf[:9 + length]
            out.append((hdr, body))
        return out

    def pending(self):
        return len(self.buf)


class Counters:
    def __init__(self):
        self.sent = {}
        self.recv = {}

    def count(self, rec):
        d = self.sent if rec["dir"] == "send" else self.recv
        d[rec["type"]] = d.get(rec["type"], 0) + 1

    def summary(self):
        return {
            "frames_sent": sum(self.sent.values()),
            "frames_recv": sum(self.recv.values()),
            "sent_by_type": dict(sorted(self.sent.items())),
            "recv_by_type": dict(sorted(self.recv.items())),
        }


def strip_brackets(host):
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def fmt_addr(sa):
    host, port = sa[0], sa[1]
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def authority(host, port):
    host = strip_brackets(host)
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def connect(host, port, timeout=5.0, nodelay=True):
    """Connect over TCP (IPv4 or IPv6 literal/hostname). Returns the socket."""
    host = strip_brackets(host)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        die("cannot resolve %s: %s" % (host, e), 2)
    last = None
    for family, stype, proto, _, sa in infos:
        s = socket.socket(family, stype, proto)
        s.settimeout(timeout)
        try:
            s.connect(sa)
        except OSError as e:
            last = e
            s.close()
            continue
        s.settimeout(None)
        if nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    die("cannot connect to %s port %s: %s" % (host, port, last), 2)


def emit_connected(sock):
    emit({"event": "connected", "local": fmt_addr(sock.getsockname()),
          "remote": fmt_addr(sock.getpeername())})


def tcp_data_segs_out(sock):
    """tcpi_data_segs_out from TCP_INFO (Linux >= 4.6), or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        if len(info) >= 160:
            return struct.unpack_from("<I", info, 156)[0]
    except OSError:
        pass
    return None
