package service_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
)

// tlsCA is a certificate authority made for one test.
type tlsCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTLSCA(t *testing.T, name string) *tlsCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &tlsCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue signs a leaf certificate for 127.0.0.1; client selects the usage.
func (ca *tlsCA) issue(t *testing.T, name string, client bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	usage := x509.ExtKeyUsageServerAuth
	if client {
		usage = x509.ExtKeyUsageClientAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

func tlsWriteFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startTLS runs a service with no neurons on a TLS gRPC listener; withCA
// also requires client certificates from ca.
func tlsStart(t *testing.T, ca *tlsCA, withCA bool) *fxService {
	t.Helper()
	dir := t.TempDir()
	certPEM, keyPEM := ca.issue(t, "cortex-extproc", false)
	cfg := fxConfig(t, "")
	cfg.ExtProc.TLSCertFile = tlsWriteFile(t, dir, "server.pem", certPEM)
	cfg.ExtProc.TLSKeyFile = tlsWriteFile(t, dir, "server.key", keyPEM)
	if withCA {
		cfg.ExtProc.ClientCAFile = tlsWriteFile(t, dir, "ca.pem", ca.pem)
	}
	return fxStart(t, cfg)
}

// check asks gRPC health for service over creds and returns the status or
// the error.
func tlsCheck(t *testing.T, addr string, creds credentials.TransportCredentials, svc string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		return 0, err
	}
	return r.Status, nil
}

func tlsClient(ca *tlsCA, certs ...tls.Certificate) credentials.TransportCredentials {
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	return credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: certs, MinVersion: tls.VersionTLS12})
}

func TestTLSListener(t *testing.T) {
	fxLeakCheck(t)
	ca := newTLSCA(t, "test CA")
	h := tlsStart(t, ca, false)
	addr := h.svc.GRPCAddr()

	st, err := tlsCheck(t, addr, tlsClient(ca), "")
	if err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("TLS client: %v %v, want SERVING", st, err)
	}
	if st, err := tlsCheck(t, addr, tlsClient(ca), service.HealthExtProc); err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("TLS client, %s: %v %v", service.HealthExtProc, st, err)
	}
	if _, err := tlsCheck(t, addr, insecure.NewCredentials(), ""); err == nil {
		t.Error("a plaintext client was served by the TLS listener")
	}
	if _, err := tlsCheck(t, addr, tlsClient(newTLSCA(t, "other CA")), ""); err == nil {
		t.Error("a client that does not trust the server's CA connected")
	}
}

func TestMutualTLSListener(t *testing.T) {
	fxLeakCheck(t)
	ca := newTLSCA(t, "test CA")
	h := tlsStart(t, ca, true)
	addr := h.svc.GRPCAddr()

	if _, err := tlsCheck(t, addr, tlsClient(ca), ""); err == nil {
		t.Error("mTLS: a client without a certificate was served")
	}
	other := newTLSCA(t, "other CA")
	oc, ok := other.issue(t, "intruder", true)
	strange, err := tls.X509KeyPair(oc, ok)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tlsCheck(t, addr, tlsClient(ca, strange), ""); err == nil {
		t.Error("mTLS: a client certificate from another CA was accepted")
	}
	gc, gk := ca.issue(t, "envoy", true)
	good, err := tls.X509KeyPair(gc, gk)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := tlsCheck(t, addr, tlsClient(ca, good), ""); err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("mTLS with a certificate from the CA: %v %v, want SERVING", st, err)
	}
}

func TestTLSMisconfigurationFailsAtStart(t *testing.T) {
	dir := t.TempDir()
	ca := newTLSCA(t, "test CA")
	certPEM, keyPEM := ca.issue(t, "cortex-extproc", false)
	cert, key := tlsWriteFile(t, dir, "server.pem", certPEM), tlsWriteFile(t, dir, "server.key", keyPEM)
	for _, c := range []struct {
		name      string
		set       func(*config.Config)
		mentioned string
	}{
		{"missing key", func(c *config.Config) {
			c.ExtProc.TLSCertFile, c.ExtProc.TLSKeyFile = cert, filepath.Join(dir, "nope.key")
		}, "tls_key_file"},
		{"key is not a key", func(c *config.Config) { c.ExtProc.TLSCertFile, c.ExtProc.TLSKeyFile = cert, cert }, "tls_key_file"},
		{"CA without PEM", func(c *config.Config) {
			c.ExtProc.TLSCertFile, c.ExtProc.TLSKeyFile = cert, key
			c.ExtProc.ClientCAFile = tlsWriteFile(t, dir, "empty.pem", []byte("not a certificate"))
		}, "client_ca_file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := fxConfig(t, "")
			c.set(&cfg)
			svc, err := service.New(cfg, slog.New(slog.DiscardHandler))
			if err == nil {
				t.Fatalf("service started with a broken TLS setup (%s)", svc.GRPCAddr())
			}
			if !strings.Contains(err.Error(), c.mentioned) {
				t.Errorf("error %q does not name %s", err, c.mentioned)
			}
		})
	}
}

// The admin listener shows the fleet's topology: by default it binds
// loopback only, as does the ext_proc listener.
func TestListenersBindLoopbackByDefault(t *testing.T) {
	t.Setenv("CORTEX_ADMIN__LISTEN", "")
	t.Setenv("CORTEX_EXTPROC__LISTEN", "")
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	for key, addr := range map[string]string{"admin.listen": res.Config.Admin.Listen, "extproc.listen": res.Config.ExtProc.Listen} {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("%s default %q: %v", key, addr, err)
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			t.Errorf("%s defaults to %q; it must bind loopback unless configured", key, addr)
		}
	}
}
