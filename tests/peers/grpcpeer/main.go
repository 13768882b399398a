// grpcpeer is a gRPC peer for the end-to-end tests: a server exposing the test.Echo service and a
// client that drives it, both over cleartext HTTP/2 (h2c) so that the agent sees plain frames, or
// over TLS (tls.go).
//
// There is no protoc step: test.Echo is a hand-written grpc.ServiceDesc and every message is a raw
// byte string carried by rawCodec, so the payload on the wire is exactly the bytes the client chose.
//
//	grpcpeer server -addr 127.0.0.1:0 [-max-streams N] [-slow DURATION] [-static-window]
//	                [-gc-every DURATION [-gc-on-signal]] [-reject-expired]
//	                [-tls-cert FILE -tls-key FILE [-tls-client-ca FILE]]
//	grpcpeer client -addr HOST:PORT -method unary|stream|slow|reset [-calls N] [-concurrency M]
//	                [-size BYTES] [-messages K] [-cancel-after DURATION]
//	                [-token-secret FILE [-token-expired] [-subject PREFIX]] [-session PREFIX] [-subjects K]
//	                [-traceparent] [-pause DURATION] [-duration DURATION]
//	                [-tls-ca FILE [-tls-cert FILE -tls-key FILE]] [-authority NAME]
//
// Protocol on stdout: the server prints "listening HOST:PORT" once the socket is bound and
// "stopped" after a graceful stop on SIGTERM/SIGINT (exit 0), "gc on"/"gc off" when SIGUSR1
// switches -gc-on-signal's collections, and with TLS "tls loaded SERIAL" (upper-case hex, as
// `openssl x509 -serial` prints it) after "listening" for the first certificate and at the first
// handshake that gets another one (tls.go: the files are read again when they change). The
// client prints "connected LOCAL REMOTE" once its single connection is up, "call I CODE" per
// finished call (CODE being the grpc status code name, or EchoMismatch) and "done" (exit 0
// whatever the codes). A TLS handshake that fails or that the server refuses ends the client
// at once, exit 1, with the reason on stderr: "grpcpeer: dial ADDR: connection error: desc =
// "transport: authentication handshake failed: REASON"", REASON being for instance
// "x509: certificate has expired or is not yet valid: current time ... is after ...",
// "x509: certificate signed by unknown authority" or, for a client certificate the server
// refuses, "the server refused the connection after the handshake: remote error: tls: bad
// certificate" (a grpc-go server; a grpcio one just closes: "...: EOF"). With -calls 0 the client
// only connects, which makes it a handshake check against any gRPC server.
//
// Built against the grpc-go packaged by Debian (1.33), in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$ROOT/target/go-cache go build -o $OUT .
package main

import (
	"fmt"
	"os"
	"sync"
)

// Method names of the test.Echo service.
const (
	serviceName  = "test.Echo"
	methodUnary  = "/test.Echo/Unary"
	methodStream = "/test.Echo/Stream"
	methodSlow   = "/test.Echo/Slow"
	methodReset  = "/test.Echo/Reset"
)

// maxMessage lifts grpc-go's default 4 MiB receive limit so that tests can send large messages.
const maxMessage = 64 << 20

// rawCodec marshals nothing: a message is a []byte (or a *[]byte to unmarshal into) that goes on
// the wire as is. It satisfies both encoding.Codec (Name, for grpc.ForceCodec on the client) and
// the older grpc.Codec (String, for grpc.CustomCodec on the server: grpc-go 1.33 has no
// grpc.ForceServerCodec yet, and registering the codec under a content-subtype would not cover
// plain "application/grpc" requests, which grpc-go maps to the proto codec).
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case []byte:
		return m, nil
	case *[]byte:
		return *m, nil
	default:
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	m, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	// Copy: a codec must not assume it owns the receive buffer.
	*m = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string   { return "raw" }
func (rawCodec) String() string { return "raw" }

// stdout serialises the protocol lines of concurrent goroutines. os.Stdout is unbuffered, so
// every line reaches the reading test immediately, in one write.
var stdout sync.Mutex

func say(format string, args ...interface{}) {
	stdout.Lock()
	defer stdout.Unlock()
	fmt.Printf(format+"\n", args...)
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "grpcpeer: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: grpcpeer server|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		runServer(os.Args[2:])
	case "client":
		runClient(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "grpcpeer: unknown mode %q (want server or client)\n", os.Args[1])
		os.Exit(2)
	}
}
