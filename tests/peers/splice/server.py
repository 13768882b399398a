#!/usr/bin/env python3
"""Peers for the interception tests' splice checks: what is not HTTP/2 must reach the original
destination byte for byte.

    server.py http ADDR PORT   HTTP/1.1: a POST's body comes back as the response body
    server.py tls ADDR PORT CERT KEY   TLS: every byte read comes back, until the client closes
    server.py tls-client ADDR PORT BYTES   sends BYTES random bytes over TLS, reads them back
    server.py banner ADDR PORT   a server that speaks first (a banner line), then echoes
    server.py banner-client ADDR PORT BYTES   waits for the banner, sends BYTES, reads them back

Servers print one JSON line when listening ({"listening": "ADDR:PORT"}) and one per exchange
({"received": N, "sha256": HEX, "peer": "ADDR:PORT"}); the client prints {"sent": N,
"sha256": HEX, "echo_equal": BOOL, "peername": "ADDR:PORT"}.
"""

import hashlib
import http.server
import json
import os
import select
import socket
import socketserver
import ssl
import sys
import threading
import time


def say(**fields):
    print(json.dumps(fields), flush=True)


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        say(received=len(body), sha256=hashlib.sha256(body).hexdigest(),
            peer="%s:%d" % self.client_address[:2], protocol=self.request_version)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ThreadingHTTP(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer's own looks the address up in DNS (getfqdn), which in a namespace with no
        # resolver waits for the resolver's timeouts.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve_http(addr, port):
    srv = ThreadingHTTP((addr, port), Echo)
    say(listening="%s:%d" % (addr, port))
    srv.serve_forever()


def serve_tls(addr, port, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    lsock = socket.create_server((addr, port))
    say(listening="%s:%d" % (addr, port))

    def one(conn, peer):
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                digest, n = hashlib.sha256(), 0
                while True:
                    data = tls.recv(65536)
                    if not data:
                        break
                    digest.update(data)
                    n += len(data)
                    tls.sendall(data)
                say(received=n, sha256=digest.hexdigest(), peer="%s:%d" % peer[:2])
        except (ssl.SSLError, OSError) as e:
            say(error=str(e), peer="%s:%d" % peer[:2])

    while True:
        conn, peer = lsock.accept()
        threading.Thread(target=one, args=(conn, peer), daemon=True).start()


def tls_client(addr, port, nbytes):
    payload = os.urandom(nbytes)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    got = bytearray()
    with socket.create_connection((addr, port), timeout=10) as raw:
        peername = "%s:%d" % raw.getpeername()[:2]
        with ctx.wrap_socket(raw) as tls:
            # One thread: an SSL object must not be read and written at once. Each chunk sent,
            # what has come back is read, so neither side's buffers fill.
            def drain(wait):
                while len(got) < nbytes:
                    ready, _, _ = select.select([tls], [], [], wait)
                    if not ready and not tls.pending():
                        return
                    data = tls.recv(65536)
                    if not data:
                        return
                    got.extend(data)
                    wait = 0

            for i in range(0, nbytes, 16384):
                tls.sendall(payload[i:i + 16384])
                drain(0)
            deadline = time.monotonic() + 10
            while len(got) < nbytes and time.monotonic() < deadline:
                drain(1)
            # A TLS close_notify, then the TCP half-close the server's loop waits for.
            try:
                tls.unwrap().shutdown(socket.SHUT_WR)
            except (ssl.SSLError, OSError):
                pass
    say(sent=nbytes, sha256=hashlib.sha256(payload).hexdigest(),
        received=len(got), echo_equal=bytes(got) == payload, peername=peername)


BANNER = b"220 splice-test server speaks first\r\n"


def serve_banner(addr, port):
    lsock = socket.create_server((addr, port))
    say(listening="%s:%d" % (addr, port))

    def one(conn, peer):
        with conn:
            conn.sendall(BANNER)
            n = 0
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                n += len(data)
                conn.sendall(data)
            say(received=n, peer="%s:%d" % peer[:2])

    while True:
        conn, peer = lsock.accept()
        threading.Thread(target=one, args=(conn, peer), daemon=True).start()


def banner_client(addr, port, nbytes):
    payload = os.urandom(nbytes)
    with socket.create_connection((addr, port), timeout=10) as s:
        peername = "%s:%d" % s.getpeername()[:2]
        t0 = time.monotonic()
        banner = b""
        while not banner.endswith(b"\r\n"):
            data = s.recv(1024)
            if not data:
                break
            banner += data
        waited = time.monotonic() - t0
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            data = s.recv(65536)
            if not data:
                break
            got.extend(data)
        say(banner_equal=banner == BANNER, banner_ms=round(waited * 1000, 1),
            echo_equal=bytes(got) == payload, peername=peername)


def main():
    mode = sys.argv[1]
    if mode == "http":
        serve_http(sys.argv[2], int(sys.argv[3]))
    elif mode == "tls":
        serve_tls(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif mode == "tls-client":
        tls_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "banner":
        serve_banner(sys.argv[2], int(sys.argv[3]))
    elif mode == "banner-client":
        banner_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
