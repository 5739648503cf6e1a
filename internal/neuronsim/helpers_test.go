package neuronsim

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startSim serves a Sim on a loopback httptest server, closed with the test.
func startSim(t *testing.T, o Options) (*Sim, *httptest.Server) {
	t.Helper()
	if o.Name == "" {
		o.Name = "beast"
	}
	if len(o.Devices) == 0 {
		o.Devices = []int64{24564, 24564}
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
	s, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	srv := httptest.NewServer(s)
	t.Cleanup(func() {
		srv.Close()
		s.Close()
	})
	return s, srv
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func do(t *testing.T, srv *httptest.Server, method, path string, body any) response {
	t.Helper()
	return doCtx(context.Background(), t, srv, method, path, body)
}

func doCtx(ctx context.Context, t *testing.T, srv *httptest.Server, method, path string, body any) response {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return response{}
		}
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, b}
}

// getJSON GETs path, expects 200 and decodes the body into v.
func getJSON(t *testing.T, srv *httptest.Server, path string, v any) {
	t.Helper()
	r := do(t, srv, http.MethodGet, path, nil)
	if r.status != http.StatusOK {
		t.Fatalf("GET %s: status %d, body %s", path, r.status, r.body)
	}
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("GET %s: %v in %s", path, err, r.body)
	}
}

// eventually polls cond until it holds, failing the test after a generous
// bound (it never measures speed).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
