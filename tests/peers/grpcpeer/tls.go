package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/credentials"
)

// tlsFiles serves the key pair (and client CAs) in files, read again when they change: every
// handshake stats the files, and only if one is another file (a rename puts another inode there)
// or has another size or mtime are they read. Files that do not load (a key that is not the
// certificate's, caught between the two renames of a rotation) keep the previous configuration
// and are tried again at the next handshake. Established connections keep their certificate.
type tlsFiles struct {
	cert, key, clientCA string

	mu     sync.Mutex
	stamp  string      // the stat of the files when last loaded
	failed string      // the stat of files that did not load, so that each failure is logged once
	config *tls.Config // what handshakes get
	serial []byte      // the serial number of config's certificate
}

func newTLSFiles(cert, key, clientCA string) (*tlsFiles, error) {
	f := &tlsFiles{cert: cert, key: key, clientCA: clientCA}
	stamp, err := f.filesStamp()
	if err != nil {
		return nil, err
	}
	if err := f.load(stamp); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *tlsFiles) paths() []string {
	if f.clientCA == "" {
		return []string{f.cert, f.key}
	}
	return []string{f.cert, f.key, f.clientCA}
}

// filesStamp is the identity of the files as they are now: inode, size and mtime of each.
func (f *tlsFiles) filesStamp() (string, error) {
	var b strings.Builder
	for _, p := range f.paths() {
		fi, err := os.Stat(p)
		if err != nil {
			return "", err
		}
		var ino uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		fmt.Fprintf(&b, "%d/%d/%d;", ino, fi.Size(), fi.ModTime().UnixNano())
	}
	return b.String(), nil
}

// load reads the files into f.config; f.mu held (or f not shared yet).
func (f *tlsFiles) load(stamp string) error {
	pair, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return err
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return err
	}
	config := &tls.Config{
		Certificates: []tls.Certificate{pair},
		// gRPC is HTTP/2 only; credentials.NewTLS adds h2 to the base configuration, not to the
		// one GetConfigForClient returns.
		NextProtos: []string{"h2"},
	}
	if f.clientCA != "" {
		pem, err := ioutil.ReadFile(f.clientCA)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s: no PEM certificate", f.clientCA)
		}
		config.ClientAuth = tls.RequireAndVerifyClientCert
		config.ClientCAs = pool
	}
	f.config, f.stamp, f.serial = config, stamp, leaf.SerialNumber.Bytes()
	return nil
}

// announce says "tls loaded SERIAL" for the certificate served, its serial number in upper-case
// hex as `openssl x509 -serial` prints it; f.mu held (or f not shared yet).
func (f *tlsFiles) announce() {
	say("tls loaded %X", f.serial)
}

// configForClient is tls.Config.GetConfigForClient: the configuration of the files as they are.
func (f *tlsFiles) configForClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	stamp, err := f.filesStamp()
	switch {
	case err != nil:
	case stamp == f.stamp || stamp == f.failed:
	default:
		if err = f.load(stamp); err != nil {
			f.failed = stamp
		} else {
			f.announce()
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpcpeer: tls: not loading %s: %v (keeping what is served)\n", strings.Join(f.paths(), ", "), err)
	}
	return f.config, nil
}

// serverCredentials is TLS with the files' certificate, re-read as they change, and with a
// client CA file, mTLS: a client certificate it signed is required.
func (f *tlsFiles) serverCredentials() credentials.TransportCredentials {
	return credentials.NewTLS(&tls.Config{GetConfigForClient: f.configForClient})
}

// clientCredentials trusts the CA in caFile, checks the server certificate against serverName
// (the address if ""), which is also the calls' :authority, and given certFile and keyFile,
// presents that client certificate. See tlsClientCreds for how a refusal shows.
func clientCredentials(caFile, certFile, keyFile, serverName string) (credentials.TransportCredentials, error) {
	pem, err := ioutil.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate", caFile)
	}
	config := &tls.Config{RootCAs: pool, ServerName: serverName}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return tlsClientCreds{credentials.NewTLS(config)}, nil
}

// tlsClientCreds makes a refused handshake end the dial at once, with the reason.
//
// grpc-go takes every handshake error for a temporary one (x509 errors have no Temporary method)
// and would retry until the dial times out with "context deadline exceeded": the error says it
// is not. And with TLS 1.3 a server refuses a client certificate only after the client's side of
// the handshake is done, with an alert that comes as the first read: the handshake therefore
// waits for the server's first bytes (gRPC servers send their SETTINGS at once) and reports the
// alert as the handshake's error. What came is read again by grpc-go.
type tlsClientCreds struct {
	credentials.TransportCredentials
}

// firstBytesWait bounds how long the handshake waits for the server to speak first.
const firstBytesWait = 3 * time.Second

func (c tlsClientCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, permanent{err}
	}
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(firstBytesWait))
	n, err := conn.Read(buf)
	conn.SetReadDeadline(time.Time{})
	var timeout net.Error
	if err != nil && !(errors.As(err, &timeout) && timeout.Timeout()) {
		conn.Close()
		return nil, nil, permanent{fmt.Errorf("the server refused the connection after the handshake: %w", err)}
	}
	return &replayConn{Conn: conn, pending: buf[:n]}, info, nil
}

func (c tlsClientCreds) Clone() credentials.TransportCredentials {
	return tlsClientCreds{c.TransportCredentials.Clone()}
}

// permanent is an error grpc-go does not retry (grpc.FailOnNonTempDialError).
type permanent struct{ error }

func (permanent) Temporary() bool { return false }
func (e permanent) Unwrap() error { return e.error }

// replayConn returns pending before reading on.
type replayConn struct {
	net.Conn
	pending []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}
