package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// serverCodec is rawCodec for test.Echo's []byte messages and grpc-go's proto codec for the
// health service's: grpc.CustomCodec applies to every service on the server.
type serverCodec struct{ rawCodec }

func (c serverCodec) Marshal(v interface{}) ([]byte, error) {
	switch v.(type) {
	case []byte, *[]byte:
		return c.rawCodec.Marshal(v)
	}
	return encoding.GetCodec(protocodec.Name).Marshal(v)
}

func (c serverCodec) Unmarshal(data []byte, v interface{}) error {
	if _, ok := v.(*[]byte); ok {
		return c.rawCodec.Unmarshal(data, v)
	}
	return encoding.GetCodec(protocodec.Name).Unmarshal(data, v)
}

// echoServer implements test.Echo.
type echoServer struct {
	slow          time.Duration // how long Slow holds a call
	rejectExpired bool          // Unary answers UNAUTHENTICATED to a bearer JWT whose exp has passed
}

// echoService describes test.Echo by hand, as protoc-gen-go-grpc would from:
//
//	service Echo {
//	  rpc Unary(bytes) returns (bytes);
//	  rpc Stream(stream bytes) returns (stream bytes);
//	  rpc Slow(bytes) returns (bytes);
//	  rpc Reset(stream bytes) returns (stream bytes);
//	}
//
// The handlers ignore the unary interceptor argument: the server installs none.
var echoService = grpc.ServiceDesc{
	ServiceName: serviceName,
	HandlerType: (*interface{})(nil), // any server value will do
	Methods: []grpc.MethodDesc{
		{
			MethodName: "Unary",
			Handler: func(srv interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				var req []byte
				if err := dec(&req); err != nil {
					return nil, err
				}
				if srv.(*echoServer).rejectExpired && tokenExpired(ctx) {
					return nil, status.Error(codes.Unauthenticated, "token expired")
				}
				return req, nil
			},
		},
		{
			MethodName: "Slow",
			Handler: func(srv interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				var req []byte
				if err := dec(&req); err != nil {
					return nil, err
				}
				return srv.(*echoServer).holdSlow(ctx, req)
			},
		},
	},
	Streams: []grpc.StreamDesc{
		{StreamName: "Stream", Handler: echoStream, ServerStreams: true, ClientStreams: true},
		{StreamName: "Reset", Handler: resetStream, ServerStreams: true, ClientStreams: true},
	},
}

// tokenExpired says whether the call's "authorization: Bearer" JWT has an exp in the past. The
// signature is not checked: the agent in front verifies it, and only needs the upstream to answer
// as an authenticating service would.
func tokenExpired(ctx context.Context) bool {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		parts := strings.Split(strings.TrimPrefix(v, "Bearer "), ".")
		if len(parts) != 3 {
			continue
		}
		payload, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err != nil {
			continue
		}
		var claims struct {
			Exp *int64 `json:"exp"`
		}
		if json.Unmarshal(payload, &claims) == nil && claims.Exp != nil && *claims.Exp < time.Now().Unix() {
			return true
		}
	}
	return false
}

// holdSlow answers after s.slow, unless the call ends first (client RST_STREAM CANCEL, deadline).
func (s *echoServer) holdSlow(ctx context.Context, req []byte) (interface{}, error) {
	t := time.NewTimer(s.slow)
	defer t.Stop()
	select {
	case <-t.C:
		return req, nil
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// echoStream sends every message back until the client half-closes.
func echoStream(_ interface{}, stream grpc.ServerStream) error {
	for {
		var msg []byte
		if err := stream.RecvMsg(&msg); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := stream.SendMsg(msg); err != nil {
			return err
		}
	}
}

// resetStream makes grpc-go reset the stream from the server side. It returns at once, without
// reading the request. grpc-go then writes the status as trailers and, if the client has not
// half-closed the stream yet, follows them with RST_STREAM NO_ERROR so that the client stops
// sending (http2Server.WriteStatus: "Send a RST_STREAM after the trailers if the client has not
// already half-closed"). As nothing was sent before, the trailers are a Trailers-Only response:
//
//	server -> client  HEADERS  END_STREAM|END_HEADERS  :status 200, content-type application/grpc,
//	                           grpc-status 10 (ABORTED), grpc-message "reset by the Reset method"
//	server -> client  RST_STREAM  NO_ERROR (0)
//
// grpc-go skips the RST_STREAM once its frame reader, which runs alongside the handler, has seen
// the client's END_STREAM, so whether it is sent depends on the client:
//   - the grpcpeer client never half-closes a Reset call: always RST_STREAM (and grpc-go's client
//     sends its own RST_STREAM NO_ERROR too, on seeing END_STREAM while its side is still open);
//   - a client that sends a small request with END_STREAM at once (nghttp -d) practically never
//     gets one: the reader has processed END_STREAM before the handler runs;
//   - a request larger than the 64 KiB initial stream window cannot end before the server reads,
//     which this handler never does, so RST_STREAM follows — unless the BDP estimator grows the
//     window in time (seen in about 1 in 30 nghttp runs); -static-window rules that out.
func resetStream(_ interface{}, _ grpc.ServerStream) error {
	return status.Error(codes.Aborted, "reset by the Reset method")
}

func runServer(args []string) {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address (host:port, IPv6 as [::1]:0)")
	maxStreams := fs.Uint("max-streams", 0, "SETTINGS_MAX_CONCURRENT_STREAMS to announce (0: grpc-go default, not announced)")
	slow := fs.Duration("slow", 10*time.Second, "how long /test.Echo/Slow holds a call")
	staticWindow := fs.Bool("static-window", false, "keep the 64 KiB flow-control windows: no BDP PINGs, no window growth")
	gcEvery := fs.Duration("gc-every", 0, "force a garbage collection (with its stop-the-world pauses) this often; 0: never")
	gcOnSignal := fs.Bool("gc-on-signal", false, "with -gc-every: collect only while switched on; each SIGUSR1 switches it on or off")
	rejectExpired := fs.Bool("reject-expired", false, "Unary answers UNAUTHENTICATED when the call's bearer JWT has an exp in the past")
	tlsCert := fs.String("tls-cert", "", "serve TLS with this PEM certificate (chain) instead of h2c; read again when it changes")
	tlsKey := fs.String("tls-key", "", "with -tls-cert: its PEM private key")
	tlsClientCA := fs.String("tls-client-ca", "", "with -tls-cert: require a client certificate this PEM CA signed (mTLS)")
	fs.Parse(args)
	if (*tlsCert == "") != (*tlsKey == "") || *tlsClientCA != "" && *tlsCert == "" {
		fatalf("-tls-cert and -tls-key go together; -tls-client-ca needs them")
	}
	var tlsFiles *tlsFiles
	if *tlsCert != "" {
		var err error
		if tlsFiles, err = newTLSFiles(*tlsCert, *tlsKey, *tlsClientCA); err != nil {
			fatalf("tls: %v", err)
		}
	}
	if *gcEvery > 0 {
		var gcOn int32 = 1
		if *gcOnSignal {
			gcOn = 0
			toggles := make(chan os.Signal, 1)
			signal.Notify(toggles, syscall.SIGUSR1)
			go func() {
				for range toggles {
					on := 1 - atomic.LoadInt32(&gcOn)
					atomic.StoreInt32(&gcOn, on)
					say("gc %s", map[int32]string{0: "off", 1: "on"}[on])
				}
			}()
		}
		go func() {
			for range time.Tick(*gcEvery) {
				if atomic.LoadInt32(&gcOn) == 1 {
					runtime.GC()
				}
			}
		}()
	}

	opts := []grpc.ServerOption{
		grpc.CustomCodec(serverCodec{}),
		grpc.MaxRecvMsgSize(maxMessage),
	}
	if *staticWindow {
		// Setting either window turns grpc-go's BDP estimator off: no more PINGs whenever data
		// arrives, nor SETTINGS_INITIAL_WINDOW_SIZE and WINDOW_UPDATE frames growing the windows.
		// A stream window then only reopens as the handler reads.
		opts = append(opts, grpc.InitialWindowSize(65535), grpc.InitialConnWindowSize(65535))
	}
	if *maxStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(*maxStreams)))
	}
	if tlsFiles != nil {
		opts = append(opts, grpc.Creds(tlsFiles.serverCredentials()))
	}
	srv := grpc.NewServer(opts...)
	srv.RegisterService(&echoService, &echoServer{slow: *slow, rejectExpired: *rejectExpired})
	// grpc.health.v1.Health beside it (the proxy benchmark's call): SERVING for "", the server.
	healthSrv := health.NewServer()
	healthSrv.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, healthSrv)

	// Catch the signals before announcing the address, so that a test may stop the server as
	// soon as it has read the line.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	// A test may stop reading stdout after "listening" (grpc_server does): a later line must not
	// kill the server with SIGPIPE, as Go does on a broken stdout unless SIGPIPE is ignored.
	signal.Ignore(syscall.SIGPIPE)

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fatalf("listen: %v", err)
	}
	// The socket queues connections from here on; Serve accepts them.
	say("listening %s", ln.Addr())
	if tlsFiles != nil {
		// The first certificate's line, after the line every test waits for first.
		tlsFiles.announce()
	}

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		fatalf("serve: %v", err)
	case <-sigs:
	}
	// GracefulStop sends GOAWAY on every connection, lets the calls in flight finish (a Slow call
	// holds it up to -slow) and closes the connections. A second signal cuts this short.
	go func() {
		<-sigs
		srv.Stop()
	}()
	srv.GracefulStop()
	say("stopped")
}
