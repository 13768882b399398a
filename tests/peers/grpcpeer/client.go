package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
)

// errMismatch reports a call that succeeded but did not get its request echoed back.
var errMismatch = errors.New("echo differs from the request")

// bidi describes the two streaming methods to the client side.
var bidi = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// oneDialer opens the client's only TCP connection and refuses to open another: when the server
// closes it (GOAWAY on GracefulStop), later calls fail with UNAVAILABLE instead of quietly going
// over a new connection the test does not know about.
type oneDialer struct {
	mu   sync.Mutex
	conn net.Conn
}

func (d *oneDialer) dial(ctx context.Context, addr string) (net.Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn != nil {
		return nil, errors.New("grpcpeer client: not opening a second connection")
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	d.conn = c
	return c, nil
}

// peerKey carries a *peer.Peer in a call's context for the call to fill (grpc.Peer).
type peerKey struct{}

func peerOption(ctx context.Context) []grpc.CallOption {
	if p, ok := ctx.Value(peerKey{}).(*peer.Peer); ok {
		return []grpc.CallOption{grpc.Peer(p)}
	}
	return nil
}

// loggingDialer opens a connection whenever grpc-go asks (reconnects included) and prints
// "connected LOCAL REMOTE" for each: REMOTE is what getpeername says, which Go reads after
// connect.
func loggingDialer(ctx context.Context, addr string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	say("connected %s %s", c.LocalAddr(), c.RemoteAddr())
	return c, nil
}

// balancedConn dials every address of targets (comma-separated) as one channel with
// round_robin, as grpc-go does with a headless service's addresses from its dns resolver.
func balancedConn(targets string, security []grpc.DialOption) (*grpc.ClientConn, error) {
	r := manual.NewBuilderWithScheme("grpcpeer")
	var addrs []resolver.Address
	for _, a := range strings.Split(targets, ",") {
		addrs = append(addrs, resolver.Address{Addr: a})
	}
	r.InitialState(resolver.State{Addresses: addrs})
	return grpc.Dial("grpcpeer:///pods", append(security,
		grpc.WithResolvers(r),
		grpc.WithContextDialer(loggingDialer),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(maxMessage)),
	)...)
}

func runClient(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	addr := fs.String("addr", "", "server address, host:port (IPv6 as [::1]:port)")
	method := fs.String("method", "unary", "unary, stream, slow or reset")
	calls := fs.Int("calls", 1, "number of calls")
	concurrency := fs.Int("concurrency", 1, "calls in flight at once")
	size := fs.Int("size", 32, "bytes per request message")
	messages := fs.Int("messages", 3, "messages sent (and echoed) per stream call")
	cancelAfter := fs.Duration("cancel-after", 0, "cancel each call after this long (the client sends RST_STREAM CANCEL); 0: never")
	tokenSecret := fs.String("token-secret", "", "file with an HMAC secret: each call carries its own HS256 JWT, sub SUBJECT-<i % subjects>")
	subject := fs.String("subject", "user", "with -token-secret: the tokens' sub prefix")
	tokenExpired := fs.Bool("token-expired", false, "with -token-secret: the tokens' exp is an hour in the past")
	session := fs.String("session", "", "each call carries x-session-id: PREFIX-<i % subjects>")
	subjects := fs.Int("subjects", 1, "distinct token subjects and sessions")
	traceparent := fs.Bool("traceparent", false, "each call carries a W3C traceparent with a trace id of its own")
	pause := fs.Duration("pause", 0, "each worker waits this long between its calls")
	duration := fs.Duration("duration", 0, "make calls for this long, however many (-calls is then ignored); 0: -calls calls")
	targets := fs.String("targets", "", "instead of -addr: addresses (comma-separated) balanced round_robin, reconnecting as grpc-go does; each call line ends with the peer it went to")
	callTimeout := fs.Duration("call-timeout", 0, "each call's deadline; 0: none")
	tlsCA := fs.String("tls-ca", "", "TLS instead of h2c, trusting this PEM CA; a refused handshake ends the client (exit 1) with the reason")
	tlsCert := fs.String("tls-cert", "", "with -tls-ca: present this PEM client certificate (chain), for servers that require one (mTLS)")
	tlsKey := fs.String("tls-key", "", "with -tls-cert: its PEM private key")
	authority := fs.String("authority", "", ":authority, and with TLS the name the server certificate is checked against; default: the address")
	fs.Parse(args)
	if (*tlsCert == "") != (*tlsKey == "") || *tlsCert != "" && *tlsCA == "" {
		fatalf("-tls-cert and -tls-key go together, and need -tls-ca")
	}
	security := []grpc.DialOption{grpc.WithInsecure()} // h2c
	if *authority != "" {
		// grpc-go 1.33 takes it only without TLS; with TLS, the credentials' ServerName is both.
		security = append(security, grpc.WithAuthority(*authority))
	}
	if *tlsCA != "" {
		creds, err := clientCredentials(*tlsCA, *tlsCert, *tlsKey, *authority)
		if err != nil {
			fatalf("tls: %v", err)
		}
		security = []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	}
	var secret []byte
	if *tokenSecret != "" {
		var err error
		if secret, err = ioutil.ReadFile(*tokenSecret); err != nil {
			fatalf("token secret: %v", err)
		}
	}
	if *subjects < 1 {
		*subjects = 1
	}

	var call func(ctx context.Context, conn *grpc.ClientConn, req []byte) error
	switch *method {
	case "unary":
		call = func(ctx context.Context, conn *grpc.ClientConn, req []byte) error {
			return callUnary(ctx, conn, methodUnary, req)
		}
	case "slow":
		call = func(ctx context.Context, conn *grpc.ClientConn, req []byte) error {
			return callUnary(ctx, conn, methodSlow, req)
		}
	case "stream":
		call = func(ctx context.Context, conn *grpc.ClientConn, req []byte) error {
			return callStream(ctx, conn, req, *messages)
		}
	case "reset":
		call = callReset
	default:
		fatalf("unknown method %q (want unary, stream, slow or reset)", *method)
	}
	if *addr == "" && *targets == "" {
		fatalf("client needs -addr or -targets")
	}
	if *concurrency < 1 {
		*concurrency = 1
	}

	var conn *grpc.ClientConn
	var err error
	if *targets != "" {
		if conn, err = balancedConn(*targets, security); err != nil {
			fatalf("dial %s: %v", *targets, err)
		}
	} else {
		var d oneDialer
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err = grpc.DialContext(ctx, *addr, append(security,
			grpc.WithContextDialer(d.dial),
			// Connect before the first call, so that "connected" describes a real connection, and
			// give up at once if the server is not there (or refuses the TLS handshake).
			grpc.WithBlock(),
			grpc.FailOnNonTempDialError(true),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(maxMessage)),
		)...)
		cancel()
		if err != nil {
			fatalf("dial %s: %v", *addr, err)
		}
		say("connected %s %s", d.conn.LocalAddr(), d.conn.RemoteAddr())
	}
	defer conn.Close()

	req := make([]byte, *size)
	for i := range req {
		req[i] = byte('a' + i%26)
	}
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				ctx := context.Background()
				if secret != nil {
					tok := signToken(secret, fmt.Sprintf("%s-%d", *subject, i%*subjects), *tokenExpired)
					ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
				}
				if *session != "" {
					ctx = metadata.AppendToOutgoingContext(ctx, "x-session-id", fmt.Sprintf("%s-%d", *session, i%*subjects))
				}
				if *traceparent {
					ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+randomHex(16)+"-"+randomHex(8)+"-01")
				}
				var p peer.Peer
				ctx = context.WithValue(ctx, peerKey{}, &p)
				var stop context.CancelFunc = func() {}
				if *callTimeout > 0 {
					ctx, stop = context.WithTimeout(ctx, *callTimeout)
				}
				err := runCall(ctx, conn, call, req, *cancelAfter)
				stop()
				code := status.Code(err).String()
				if errors.Is(err, errMismatch) {
					code = "EchoMismatch"
				}
				if *targets != "" {
					say("call %d %s %v", i, code, p.Addr)
				} else {
					say("call %d %s", i, code)
				}
				time.Sleep(*pause)
			}
		}()
	}
	end := time.Now().Add(*duration)
	for i := 0; ; i++ {
		if *duration > 0 && !time.Now().Before(end) || *duration == 0 && i >= *calls {
			break
		}
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	// Closing the connection does not flush what grpc-go's writer still holds, such as the
	// RST_STREAM NO_ERROR the client sends when the server ends a Reset call the client has not
	// half-closed: give it a moment so that the last call's frames are on the wire too.
	time.Sleep(100 * time.Millisecond)
	say("done")
}

// runCall makes one call, cancelled after cancelAfter if that is not 0. A call that returns early
// is cancelled too, so that its stream never lingers on the connection.
func runCall(ctx context.Context, conn *grpc.ClientConn, call func(context.Context, *grpc.ClientConn, []byte) error, req []byte, cancelAfter time.Duration) error {
	// Not context.WithTimeout: a deadline would go out as grpc-timeout and end the call with
	// DEADLINE_EXCEEDED; cancelling is what makes grpc-go send RST_STREAM CANCEL.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if cancelAfter > 0 {
		t := time.AfterFunc(cancelAfter, cancel)
		defer t.Stop()
	}
	return call(ctx, conn, req)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// signToken makes an HS256 JWT for sub, valid for an hour or expired an hour ago.
func signToken(secret []byte, sub string, expired bool) string {
	exp := time.Now().Add(time.Hour)
	if expired {
		exp = time.Now().Add(-time.Hour)
	}
	enc := base64.RawURLEncoding
	header := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	claims, _ := json.Marshal(map[string]interface{}{"sub": sub, "scope": "echo", "exp": exp.Unix()})
	signed := header + "." + enc.EncodeToString(claims)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(signed))
	return signed + "." + enc.EncodeToString(mac.Sum(nil))
}

func callUnary(ctx context.Context, conn *grpc.ClientConn, method string, req []byte) error {
	var resp []byte
	if err := conn.Invoke(ctx, method, req, &resp, peerOption(ctx)...); err != nil {
		return err
	}
	if !bytes.Equal(resp, req) {
		return errMismatch
	}
	return nil
}

// callStream sends n messages one after the other, each echoed before the next, then half-closes
// and expects the server to end the stream with OK.
func callStream(ctx context.Context, conn *grpc.ClientConn, req []byte, n int) error {
	s, err := conn.NewStream(ctx, bidi, methodStream)
	if err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		// SendMsg returns io.EOF when the stream has ended; RecvMsg then tells why.
		if err := s.SendMsg(req); err != nil && err != io.EOF {
			return err
		}
		var resp []byte
		if err := s.RecvMsg(&resp); err != nil {
			return err
		}
		if !bytes.Equal(resp, req) {
			return errMismatch
		}
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	return recvEnd(s)
}

// callReset sends one message and deliberately never half-closes, so that the server's answer
// (trailers before the client's END_STREAM) comes with RST_STREAM from the server.
func callReset(ctx context.Context, conn *grpc.ClientConn, req []byte) error {
	s, err := conn.NewStream(ctx, bidi, methodReset)
	if err != nil {
		return err
	}
	if err := s.SendMsg(req); err != nil && err != io.EOF {
		return err
	}
	return recvEnd(s)
}

// recvEnd drains the stream and returns its status: nil for OK.
func recvEnd(s grpc.ClientStream) error {
	for {
		var resp []byte
		if err := s.RecvMsg(&resp); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}
