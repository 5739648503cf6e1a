package deploy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
	"github.com/helexa/cortex-extproc/internal/service"
)

// TestProbesWorkWithMTLS runs cortex-extproc with the shipped
// cortex-extproc.toml plus the documented mTLS option, and makes the
// Deployment's liveness and readiness probes exactly as the kubelet would
// (the port they name, resolved through the container's ports, to the
// listener cortex-extproc binds for it). They pass; a gRPC probe on the
// ext_proc port, which cannot do TLS, fails.
func TestProbesWorkWithMTLS(t *testing.T) {
	objs := manifests(t)
	cm := object[corev1.ConfigMap](t, objs, "configmap.yaml:ConfigMap/cortex-extproc-config")
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cortex-extproc.toml")
	for name, content := range cm.Data {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg := res.Config
	_, shippedAdmin := listenPort(t, cfg.Admin.Listen)
	// The documented TLS option, mTLS included.
	cfg.ExtProc.TLSCertFile, cfg.ExtProc.TLSKeyFile, cfg.ExtProc.ClientCAFile = writeTLS(t, dir)
	// Free ports on loopback instead of the pod's 0.0.0.0:9002/9090; the
	// probes are mapped to the admin listener by the port they name below.
	cfg.ExtProc.Listen, cfg.Admin.Listen = "127.0.0.1:0", "127.0.0.1:0"
	sim, err := neuronsim.New(neuronsim.Options{Name: "beast", Devices: []int64{24000}})
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	neuron := httptest.NewServer(sim)
	defer neuron.Close()
	cfg.Neurons = []config.Neuron{{Name: "beast", Endpoint: neuron.URL}}
	if ps := cfg.Validate(); len(ps) > 0 {
		t.Fatalf("config with mTLS: %v", ps)
	}

	svc, err := service.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- svc.Run(ctx) }()
	defer func() {
		cancel()
		svc.SkipShutdownDelay()
		if err := <-ran; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	select {
	case <-svc.Ready():
	case err := <-ran:
		t.Fatalf("service stopped: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready after 30s")
	}

	dep := object[appsv1.Deployment](t, objs, "deployment.yaml:Deployment/cortex-extproc")
	c := container(t, &dep.Spec.Template.Spec, dep.Name, "cortex-extproc")
	probe := func(p *corev1.Probe) int {
		t.Helper()
		if p == nil || p.HTTPGet == nil {
			t.Fatalf("probe %+v is not an HTTP GET", p)
		}
		if port := containerPort(t, c, p.HTTPGet.Port); port != shippedAdmin {
			t.Fatalf("probe goes to port %d, where cortex-extproc has no plain-HTTP listener (admin is %d)", port, shippedAdmin)
		}
		resp, err := http.Get(fmt.Sprintf("http://%s%s", svc.AdminAddr(), p.HTTPGet.Path))
		if err != nil {
			t.Fatalf("probe GET %s: %v", p.HTTPGet.Path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := probe(c.LivenessProbe); code != 200 {
		t.Errorf("liveness probe %d with mTLS on, want 200", code)
	}
	if code := probe(c.ReadinessProbe); code != 200 {
		t.Errorf("readiness probe %d with mTLS on, want 200", code)
	}

	// What a kubelet gRPC probe does: plain text to the ext_proc port.
	conn, err := grpc.NewClient(svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ccancel()
	if _, err := healthpb.NewHealthClient(conn).Check(cctx, &healthpb.HealthCheckRequest{Service: service.HealthReadiness}); err == nil {
		t.Error("a plain-text gRPC health check passed with mTLS on: the test setup is wrong")
	}

	// SIGTERM: not ready, still alive (the kubelet must not restart it).
	cancel()
	deadline := time.Now().Add(30 * time.Second)
	for probe(c.ReadinessProbe) != http.StatusServiceUnavailable {
		if time.Now().After(deadline) {
			t.Fatal("readiness probe still passing after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code := probe(c.LivenessProbe); code != 200 {
		t.Errorf("liveness probe %d during the shutdown delay, want 200", code)
	}
}

// writeTLS writes a CA, a server certificate for 127.0.0.1 it signed, and
// uses the same CA for client certificates.
func writeTLS(t *testing.T, dir string) (cert, key, ca string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "cortex-extproc"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caTmpl, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("tls.crt", "CERTIFICATE", srvDER), write("tls.key", "EC PRIVATE KEY", keyDER), write("ca.crt", "CERTIFICATE", caDER)
}
