#!/usr/bin/env python3
"""h2c (prior knowledge) client built on the `h2` library that logs every frame
it sends and receives as JSON lines on stdout.  See README.md.

Modes (exactly one):
  --requests N --path /x [--concurrent M]
  --rapid-reset RATE --duration SECONDS [--path /x] [--separate-writes]
  --cancel [--path /x]
  --hold            (commands on stdin: "get PATH", "ping", "quit")
"""

import argparse
import os
import select
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402
from h2.connection import ConnectionState  # noqa: E402
from h2.settings import SettingCodes, Settings  # noqa: E402

import framelog  # noqa: E402
from framelog import PREFACE, emit, now  # noqa: E402

CANCEL = h2.errors.ErrorCodes.CANCEL


class Failure(Exception):
    pass


class Client:
    def __init__(self, sock, host, port, args):
        self.sock = sock
        self.args = args
        self.authority = framelog.authority(host, port)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
        })
        self.splitter = framelog.FrameSplitter()
        self.counters = framelog.Counters()
        self.preface_sent = False
        self.eof = False
        self.close_reason = None
        self.goaway_recv = None      # dict from the GOAWAY frame record
        self.goaway_sent = False
        self.remote_settings_seen = False
        self.local_settings_acked = False
        self.streams = {}            # stream id -> response state dict
        self.reset_by_us = set()     # streams we sent RST_STREAM on
        self.suppressed_auto_rst = 0
        self.h2_error = None
        self.on_response_headers = None   # hook(stream_id), used by --cancel
        self.pings_acked = 0
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.not_h2 = False

    # ------------------------------------------------------------------ send
    def flush(self, explicit_rst=()):
        """Write whatever h2 has queued, logging each frame as it goes out.

        RST_STREAM frames that h2 emits on its own in reaction to frames that
        arrive on a stream we already reset ourselves are dropped (RFC 9113
        5.1: such frames MUST be ignored); they are counted in the summary.
        """
        data = self.conn.data_to_send()
        if not data:
            return
        if not self.preface_sent:
            assert data.startswith(PREFACE)
            data = data[len(PREFACE):]
            self._write(PREFACE)
            self.preface_sent = True
            emit({"event": "preface", "dir": "send", "length": len(PREFACE)})
        frames = framelog.FrameSplitter().feed(data)
        out = []
        recs = []
        for hdr, body in frames:
            rec = framelog.frame_record("send", hdr, body)
            if (rec["type_id"] == 0x3 and rec["stream"] in self.reset_by_us
                    and rec["stream"] not in explicit_rst):
                self.suppressed_auto_rst += 1
                continue
            out.append(hdr + body)
            recs.append(rec)
        if not out:
            return
        self._write(b"".join(out))
        t = now()  # one write: all its frames share the write-completion time
        for rec in recs:
            if rec["type_id"] == 0x7:
                self.goaway_sent = True
            rec["t"] = t
            self.counters.count(rec)
            emit(rec)

    def _write(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.eof = True
            self.close_reason = "send failed: %s" % e
            raise Failure("send failed: %s" % e)
        self.bytes_sent += len(data)

    # ------------------------------------------------------------------ recv
    def h2_usable(self):
        return self.conn.state_machine.state != ConnectionState.CLOSED and self.h2_error is None

    def pump(self, timeout, extra_fds=()):
        """Wait up to `timeout` for the socket (and extra fds); process input.
        Returns the list of extra fds that are readable."""
        if self.eof:
            if timeout > 0 and extra_fds:
                r, _, _ = select.select(list(extra_fds), [], [], timeout)
                return r
            return []
        fds = [self.sock] + list(extra_fds)
        r, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if self.sock in r:
            self._read_socket()
        return [fd for fd in r if fd is not self.sock]

    def _read_socket(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError) as e:
            self._closed("reset: %s" % e)
            return
        except OSError as e:
            self._closed("recv error: %s" % e)
            return
        if not data:
            self._closed("eof")
            return
        first = self.bytes_recv == 0
        self.bytes_recv += len(data)
        if first and not framelog.looks_like_server_preface(data):
            self.not_h2 = True
        if self.not_h2:
            emit({"dir": "recv", "raw": True, "length": len(data),
                  "preview": data[:80].decode("latin-1")})
            self.h2_error = "peer is not speaking HTTP/2"
            return
        for hdr, body in self.splitter.feed(data):
            rec = framelog.frame_record("recv", hdr, body)
            self.counters.count(rec)
            emit(rec)
            if rec["type_id"] == 0x7:
                self.goaway_recv = rec
            if rec["type_id"] == 0x6 and rec["flags"] & framelog.FLAG_ACK:
                self.pings_acked += 1
            if self.h2_usable():
                try:
                    events = self.conn.receive_data(hdr + body)
                except h2.exceptions.ProtocolError as e:
                    self.h2_error = "%s: %s" % (type(e).__name__, e)
                    emit({"event": "h2_error", "message": self.h2_error})
                    events = []
                self._handle_events(events)
                try:
                    self.flush()
                except Failure:
                    return

    def _closed(self, reason):
        if not self.eof:
            self.eof = True
            self.close_reason = reason
            rec = {"event": "closed", "reason": reason, "by": "peer"}
            if self.splitter.pending():
                rec["trailing_bytes"] = self.splitter.pending()
            emit(rec)

    def _handle_events(self, events):
        for ev in events:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.remote_settings_seen = True
            elif isinstance(ev, h2.events.SettingsAcknowledged):
                self.local_settings_acked = True
            elif isinstance(ev, h2.events.ResponseReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    for k, v in ev.headers:
                        if k == b":status":
                            st["status"] = int(v)
                    if self.on_response_headers:
                        self.on_response_headers(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st["body_bytes"] += len(ev.data)
                if ev.flow_controlled_length:
                    try:
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    except h2.exceptions.ProtocolError:
                        pass
            elif isinstance(ev, h2.events.StreamEnded):
                self._finish(ev.stream_id, "complete")
            elif isinstance(ev, h2.events.StreamReset):
                if ev.remote_reset:
                    self._finish(ev.stream_id, "reset_by_peer", ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                pass  # logged from the frame itself

    def _finish(self, sid, outcome, error_code=None):
        st = self.streams.get(sid)
        if st is None or st["done"]:
            return
        st["done"] = True
        st["outcome"] = outcome
        if self.args.mode_quiet_streams:
            return
        rec = {"event": "response", "stream": sid, "path": st["path"],
               "status": st["status"], "body_bytes": st["body_bytes"], "outcome": outcome}
        if error_code is not None:
            rec["error_code"] = int(error_code)
        emit(rec)

    # -------------------------------------------------------------- helpers
    def headers(self, path):
        return [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"h2py-peer"),
        ]

    def start_get(self, path):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, self.headers(path), end_stream=True)
        self.streams[sid] = {"path": path, "status": None, "body_bytes": 0,
                             "done": False, "outcome": None}
        self.flush()
        return sid

    def wait(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while not cond():
            if self.eof:
                raise Failure("connection closed (%s) while waiting for %s" % (self.close_reason, what))
            if self.goaway_recv is not None and not self.h2_usable() and not cond():
                raise Failure("GOAWAY received (%s) while waiting for %s"
                              % (self.goaway_recv.get("error"), what))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure("timeout waiting for %s" % what)
            self.pump(left)

    def handshake(self):
        self.conn.initiate_connection()
        self.flush()
        self.wait(lambda: self.remote_settings_seen and self.local_settings_acked,
                  self.args.timeout, "SETTINGS exchange")
        emit({"event": "settings_exchanged"})

    def close_cleanly(self, linger=1.0):
        """GOAWAY(NO_ERROR) if possible, half-close, read until EOF/linger."""
        if not self.eof:
            if not self.goaway_sent:
                if self.h2_usable():
                    self.conn.close_connection()
                    try:
                        self.flush()
                    except Failure:
                        pass
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            deadline = time.monotonic() + linger
            while not self.eof and time.monotonic() < deadline:
                # h2 is CLOSED after GOAWAY: frames are only logged now.
                self.pump(deadline - time.monotonic())
            if not self.eof:
                emit({"event": "closed", "reason": "linger timeout", "by": "us"})
        self.sock.close()

    def summary(self):
        s = self.counters.summary()
        s["bytes_sent"] = self.bytes_sent
        s["bytes_recv"] = self.bytes_recv
        if self.goaway_recv is not None:
            s["goaway_recv"] = {k: self.goaway_recv.get(k) for k in
                                ("error_code", "error", "last_stream_id", "debug") if k in self.goaway_recv}
        if self.suppressed_auto_rst:
            s["suppressed_auto_rst"] = self.suppressed_auto_rst
        s["close_reason"] = self.close_reason
        if self.not_h2:
            s["peer_not_h2"] = True
        return s


# ---------------------------------------------------------------------- modes
def mode_requests(c, a):
    total, conc = a.requests, max(1, a.concurrent)
    started = 0
    deadline = time.monotonic() + a.timeout
    active = set()
    while True:
        for sid in [s for s in active if c.streams[s]["done"]]:
            active.discard(sid)
        if started == total and not active:
            break
        limit = min(conc, c.conn.remote_settings.max_concurrent_streams)
        while started < total and len(active) < limit and c.h2_usable() and not c.eof:
            active.add(c.start_get(a.path))
            started += 1
        if c.eof:
            raise Failure("connection closed (%s) with %d/%d responses"
                          % (c.close_reason, done_count(c), total))
        if not c.h2_usable() and (started < total or active):
            # GOAWAY received (or h2 error): wait a moment for in-flight data to
            # be logged, then fail.
            raise Failure("connection terminated (%s) with %d/%d responses"
                          % ((c.goaway_recv or {}).get("error") or c.h2_error, done_count(c), total))
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure("timeout: %d/%d responses" % (done_count(c), total))
        c.pump(left)
    c.close_cleanly()
    bad = [s for s, st in c.streams.items() if st["outcome"] != "complete"]
    statuses = {}
    for st in c.streams.values():
        statuses[str(st["status"])] = statuses.get(str(st["status"]), 0) + 1
    return {"requests": total, "responses": done_count(c), "statuses": statuses}, not bad


def done_count(c):
    return sum(1 for st in c.streams.values() if st["outcome"] == "complete")


def mode_rapid_reset(c, a):
    rate, duration = a.rapid_reset, a.duration
    if rate <= 0 or duration <= 0:
        raise Failure("--rapid-reset and --duration must be > 0")
    interval = 1.0 / rate
    hdrs = c.headers(a.path)
    sent = 0
    first_t = last_t = None
    stopped = None
    start = time.monotonic()
    end = start + duration
    while True:
        t = time.monotonic()
        if t >= end:
            break
        if c.eof:
            stopped = "connection closed: %s" % c.close_reason
            break
        if not c.h2_usable():
            stopped = "GOAWAY received" if c.goaway_recv else ("h2 error: %s" % c.h2_error)
            break
        due = start + sent * interval
        if t >= due:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, hdrs, end_stream=True)
            if a.separate_writes:
                c.flush()
            c.conn.reset_stream(sid, CANCEL)
            c.reset_by_us.add(sid)
            c.flush(explicit_rst=(sid,))
            last_t = now()
            if first_t is None:
                first_t = last_t
                emit({"event": "first_reset", "t": first_t, "stream": sid})
            sent += 1
            c.pump(0)  # keep reading: settings/ping ACKs, WINDOW_UPDATEs, GOAWAY
        else:
            c.pump(due - t)
    emit({"event": "last_reset", "t": last_t, "count": sent})
    if stopped:
        emit({"event": "stopped", "reason": stopped, "after_resets": sent})
    # Let server reactions (responses, GOAWAY) arrive and get logged.
    linger_until = time.monotonic() + a.linger
    while not c.eof and time.monotonic() < linger_until:
        c.pump(linger_until - time.monotonic())
    c.close_cleanly()
    span = (last_t - first_t) if (first_t is not None and last_t is not None) else 0.0
    res = {
        "resets_sent": sent,
        "target_rate": rate,
        "duration": duration,
        "first_reset_t": first_t,
        "last_reset_t": last_t,
        "achieved_rate": round((sent - 1) / span, 1) if span > 0 else None,
        "stopped_early": stopped,
    }
    return res, sent > 0


def mode_cancel(c, a):
    sid = c.start_get(a.path)
    c.streams[sid]["cancel_trigger"] = None
    state = {"trigger": None}

    def on_headers(s):
        if s == sid and state["trigger"] is None:
            state["trigger"] = "response_headers"
            do_cancel()

    def do_cancel():
        stream = c.conn.streams.get(sid)
        still_open = stream is not None and not stream.closed
        c.reset_by_us.add(sid)
        if still_open:
            c.conn.reset_stream(sid, CANCEL)
            c.flush(explicit_rst=(sid,))
        else:
            # Response already finished (END_STREAM seen): write the RST_STREAM
            # by hand so the cancel is on the wire regardless.
            from hyperframe.frame import RstStreamFrame
            f = RstStreamFrame(sid, error_code=int(CANCEL))
            raw = f.serialize()
            c._write(raw)
            rec = framelog.frame_record("send", raw[:9], raw[9:], {"note": "stream_already_closed"})
            c.counters.count(rec)
            emit(rec)
        emit({"event": "cancel", "stream": sid, "trigger": state["trigger"],
              "stream_was_open": still_open})

    c.on_response_headers = on_headers
    deadline = time.monotonic() + a.cancel_after
    while state["trigger"] is None:
        if c.eof:
            raise Failure("connection closed before cancel: %s" % c.close_reason)
        left = deadline - time.monotonic()
        if left <= 0:
            state["trigger"] = "timeout"
            do_cancel()
            break
        c.pump(left)
    c.on_response_headers = None
    linger_until = time.monotonic() + a.linger
    while not c.eof and time.monotonic() < linger_until:
        c.pump(linger_until - time.monotonic())
    c.close_cleanly()
    return {"stream": sid, "trigger": state["trigger"]}, True


def mode_hold(c, a):
    stdin_fd = sys.stdin.fileno()
    buf = b""
    stdin_eof = False
    n_cmds = 0
    emit({"event": "ready"})
    while True:
        # Get one command line, servicing the socket meanwhile.
        while b"\n" not in buf and not stdin_eof:
            r = c.pump(3600.0, extra_fds=(stdin_fd,))
            if c.eof:
                raise Failure("connection closed while holding: %s" % c.close_reason)
            if stdin_fd in r:
                chunk = os.read(stdin_fd, 4096)
                if not chunk:
                    stdin_eof = True
                buf += chunk
        if b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
        else:
            line, buf = buf, b""
        line = line.decode("utf-8", "replace").strip()
        if not line:
            if stdin_eof:
                line = "quit"
            else:
                continue
        parts = line.split()
        cmd = parts[0].lower()
        n_cmds += 1
        emit({"event": "command", "command": line})
        if cmd == "quit":
            c.close_cleanly()
            return {"commands": n_cmds}, True
        elif cmd == "get" and len(parts) == 2:
            sid = c.start_get(parts[1])
            c.wait(lambda: c.streams[sid]["done"], a.timeout, "response on stream %d" % sid)
        elif cmd == "ping":
            before = c.pings_acked
            c.conn.ping(b"h2pyping")
            c.flush()
            c.wait(lambda: c.pings_acked > before, a.timeout, "PING ACK")
        else:
            emit({"event": "error", "message": "unknown command: %r" % line})
        emit({"event": "ready"})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host")
    p.add_argument("port", type=int)
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--requests", type=int, metavar="N", help="send N GET requests")
    m.add_argument("--rapid-reset", type=float, metavar="RATE",
                   help="HEADERS+RST_STREAM(CANCEL) pairs per second (CVE-2023-44487)")
    m.add_argument("--cancel", action="store_true", help="one GET, cancelled after response HEADERS")
    m.add_argument("--hold", action="store_true", help="command-driven via stdin")
    p.add_argument("--path", default="/", help="request path (default /)")
    p.add_argument("--concurrent", type=int, default=1, metavar="M", help="max parallel streams (default 1)")
    p.add_argument("--duration", type=float, default=3.0, help="rapid-reset duration in seconds (default 3)")
    p.add_argument("--separate-writes", action="store_true",
                   help="rapid-reset: write HEADERS and RST_STREAM with two send() calls")
    p.add_argument("--cancel-after", type=float, default=0.1,
                   help="cancel: reset after this many seconds if no response HEADERS (default 0.1)")
    p.add_argument("--linger", type=float, default=0.3,
                   help="rapid-reset/cancel: keep reading this long before GOAWAY (default 0.3)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-wait timeout in seconds (default 10)")
    p.add_argument("--quiet-streams", dest="mode_quiet_streams", action="store_true",
                   help="do not print per-stream 'response' events")
    a = p.parse_args()
    if a.requests is not None and a.requests < 1:
        p.error("--requests must be >= 1")

    sock = framelog.connect(a.host, a.port, timeout=a.timeout)
    framelog.emit_connected(sock)
    c = Client(sock, a.host, a.port, a)
    if a.rapid_reset is not None:
        a.mode_quiet_streams = True
    mode = ("requests" if a.requests is not None else "rapid-reset" if a.rapid_reset is not None
            else "cancel" if a.cancel else "hold")
    ok = False
    res = {}
    err = None
    try:
        c.handshake()
        if mode == "requests":
            res, ok = mode_requests(c, a)
        elif mode == "rapid-reset":
            res, ok = mode_rapid_reset(c, a)
        elif mode == "cancel":
            res, ok = mode_cancel(c, a)
        else:
            res, ok = mode_hold(c, a)
    except Failure as e:
        err = str(e)
        try:
            c.close_cleanly(linger=0.3)
        except Exception:
            pass
    except KeyboardInterrupt:
        err = "interrupted"
    done = {"event": "done", "mode": mode, "ok": ok and err is None}
    done.update(res)
    done.update(c.summary())
    if err:
        done["error"] = err
    emit(done)
    if err or not ok:
        sys.stderr.write("h2client.py: error: %s\n" % (err or "not all streams completed"))
        sys.exit(1)


if __name__ == "__main__":
    main()
