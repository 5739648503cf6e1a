package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// binaries are the two commands under test, built once by TestMain.
type binaries struct {
	cortex, sim string
}

// buildBinaries builds cmd/cortex-extproc and cmd/neuron-sim into dir.
func buildBinaries(dir string) (binaries, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	root, err := filepath.Abs("..")
	if err != nil {
		return binaries{}, err
	}
	cmd := exec.Command(goBin, "build", "-o", dir+string(filepath.Separator), "./cmd/cortex-extproc", "./cmd/neuron-sim")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return binaries{}, fmt.Errorf("go build ./cmd/cortex-extproc ./cmd/neuron-sim: %v\n%s", err, out)
	}
	return binaries{cortex: filepath.Join(dir, "cortex-extproc"), sim: filepath.Join(dir, "neuron-sim")}, nil
}

// proc is a child process whose output is kept for diagnostics and for
// reading the addresses it bound.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited

	mu    sync.Mutex
	lines []string
}

func startProc(name, bin string, args ...string) (*proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = procAttr()
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	pw.Close()
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
		pr.Close()
	}()
	go func() {
		_ = cmd.Wait()
		<-scanned
		close(p.done)
	}()
	return p, nil
}

// output is everything the process wrote so far.
func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// lineCount is how many output lines the process has written so far.
func (p *proc) lineCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

// linesFrom returns the output lines from index n on.
func (p *proc) linesFrom(n int) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines[min(n, len(p.lines)):]...)
}

// waitLine returns the first output line match accepts, polling until
// timeout or the process exits.
func (p *proc) waitLine(timeout time.Duration, match func(string) bool) (string, error) {
	deadline := time.Now().Add(timeout)
	seen := 0
	for {
		p.mu.Lock()
		lines := p.lines[seen:]
		seen = len(p.lines)
		p.mu.Unlock()
		for _, l := range lines {
			if match(l) {
				return l, nil
			}
		}
		select {
		case <-p.done:
			return "", fmt.Errorf("%s exited (%s) before printing the expected line; output:\n%s", p.name, p.cmd.ProcessState, p.output())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s did not print the expected line within %s; output:\n%s", p.name, timeout, p.output())
		}
	}
}

// exited reports whether the process ended within timeout.
func (p *proc) exited(timeout time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// stop ends the process: SIGTERM, then SIGKILL after a grace period.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if !p.exited(10 * time.Second) {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

var listenRE = regexp.MustCompile(`listen=(\S+)`)

// simSpec is one neuron-sim process.
type simSpec struct {
	name string
	args []string // besides --name, --listen
}

// sim is a running neuron-sim with a tap in front of its management API.
type sim struct {
	proc *proc
	url  string // the sim itself: inference goes here (Envoy's cluster)
	tap  *neuronTap
}

func startSim(bin string, spec simSpec) (*sim, error) {
	args := append([]string{"--name", spec.name, "--listen", "127.0.0.1:0"}, spec.args...)
	p, err := startProc("neuron-sim "+spec.name, bin, args...)
	if err != nil {
		return nil, err
	}
	line, err := p.waitLine(15*time.Second, func(l string) bool { return strings.Contains(l, "neuron-sim serving") })
	if err != nil {
		p.stop()
		return nil, err
	}
	m := listenRE.FindStringSubmatch(line)
	if m == nil {
		p.stop()
		return nil, fmt.Errorf("neuron-sim %s: no listen= in %q", spec.name, line)
	}
	u := "http://" + m[1]
	tap, err := newNeuronTap(u)
	if err != nil {
		p.stop()
		return nil, err
	}
	return &sim{proc: p, url: u, tap: tap}, nil
}

func (s *sim) stop() {
	s.tap.close()
	s.proc.stop()
}

// models is the sim's own GET /models (status by id).
func (s *sim) models(ctx context.Context) (map[string]string, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/models", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var ms []struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ms); err != nil {
		return nil, fmt.Errorf("%s/models: %w", s.url, err)
	}
	out := map[string]string{}
	for _, m := range ms {
		out[m.ID] = m.Status
	}
	return out, nil
}

// neuronTap is a reverse proxy between cortex-extproc and a neuron-sim's
// management API. It counts POST /models/load per model and can hold
// loads until released, which a separate sim process cannot do itself.
type neuronTap struct {
	srv   *httptest.Server
	proxy *httputil.ReverseProxy

	mu       sync.Mutex
	loads    map[string]int
	gate     chan struct{} // non-nil: loads wait for it to close
	loadSeen chan string   // a load arrived (buffered, best effort)
}

func newNeuronTap(target string) (*neuronTap, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	t := &neuronTap{proxy: httputil.NewSingleHostReverseProxy(u), loads: map[string]int{}, loadSeen: make(chan string, 64)}
	t.srv = httptest.NewServer(http.HandlerFunc(t.serve))
	return t, nil
}

func (t *neuronTap) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && r.URL.Path == "/models/load" {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		var spec struct {
			ModelID string `json:"model_id"`
		}
		_ = json.Unmarshal(body, &spec)
		t.mu.Lock()
		t.loads[spec.ModelID]++
		gate := t.gate
		t.mu.Unlock()
		select {
		case t.loadSeen <- spec.ModelID:
		default:
		}
		if gate != nil {
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
		}
	}
	t.proxy.ServeHTTP(w, r)
}

// url is what cortex-extproc is configured with for this neuron.
func (t *neuronTap) url() string { return t.srv.URL }

// loadCount is how many POST /models/load asked for model.
func (t *neuronTap) loadCount(model string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.loads[model]
}

// holdLoads makes loads wait until release is called.
func (t *neuronTap) holdLoads() (release func()) {
	ch := make(chan struct{})
	t.mu.Lock()
	t.gate = ch
	t.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			t.mu.Lock()
			t.gate = nil
			t.mu.Unlock()
			close(ch)
		})
	}
}

func (t *neuronTap) close() { t.srv.Close() }

// cortex is a running cortex-extproc.
type cortex struct {
	proc      *proc
	grpcAddr  string
	adminAddr string
}

// cortexConfig renders cortex-extproc.toml for the sims.
func cortexConfig(catalogue string, sims map[string]*sim, opts stackOptions) string {
	pollInterval := opts.pollInterval
	if pollInterval == "" {
		pollInterval = "200ms"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "models_config = %q\n", catalogue)
	b.WriteString(`
[extproc]
listen = "127.0.0.1:0"
max_message_timeout = "1h"
drain_timeout = "10s"
shutdown_delay = "0s"   # envoyLite does not health-check cortex-extproc

[admin]
listen = "127.0.0.1:0"

[poll]
interval = "` + pollInterval + `"
timeout = "2s"
failure_threshold = 3

[cold_load]
timeout = "20s"

[upstream]
mode = "cluster_header"
cluster_header = "x-cortex-cluster"

[log]
level = "info"
format = "json"
`)
	b.WriteString(opts.extraConfig)
	for _, n := range slices.Sorted(maps.Keys(sims)) {
		fmt.Fprintf(&b, "\n[[neurons]]\nname = %q\nendpoint = %q\n", n, sims[n].tap.url())
	}
	return b.String()
}

// startCortex runs `cortex-extproc serve --config cfgFile` and waits until
// its gRPC readiness health service is SERVING.
func startCortex(bin, cfgFile string) (*cortex, error) {
	p, err := startProc("cortex-extproc", bin, "serve", "--config", cfgFile)
	if err != nil {
		return nil, err
	}
	var addrs struct {
		Msg     string `json:"msg"`
		ExtProc string `json:"extproc"`
		Admin   string `json:"admin"`
	}
	_, err = p.waitLine(15*time.Second, func(l string) bool {
		return json.Unmarshal([]byte(l), &addrs) == nil && addrs.Msg == "cortex-extproc serving"
	})
	if err != nil {
		p.stop()
		return nil, err
	}
	c := &cortex{proc: p, grpcAddr: addrs.ExtProc, adminAddr: addrs.Admin}
	if err := c.waitReady(15 * time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return c, nil
}

// waitReady polls grpc.health.v1 service "readiness" until SERVING.
func (c *cortex) waitReady(timeout time.Duration) error {
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last string
	for {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{Service: "readiness"})
		ccancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		last = fmt.Sprint(resp.GetStatus(), err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("cortex-extproc not ready within %s (last health answer: %s); output:\n%s", timeout, last, c.proc.output())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// admin GETs an admin endpoint.
func (c *cortex) admin(ctx context.Context, path string) (int, []byte, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.adminAddr+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// stack is a fleet of neuron-sims, cortex-extproc and envoyLite in front.
type stack struct {
	dir    string
	sims   map[string]*sim
	cortex *cortex
	envoy  *envoyLite
	front  *httptest.Server
}

// stackOptions change a stack from the demo's settings.
type stackOptions struct {
	// extraConfig is appended to cortex-extproc.toml.
	extraConfig string
	// pollInterval is poll.interval ("" is 200ms).
	pollInterval string
	// envoy configures envoyLite; startStack sets ExtProcAddr and Clusters.
	envoy envoyLiteConfig
}

// startStack starts the sims, writes the config, starts cortex-extproc and
// serves envoyLite with one cluster per sim (neuron-<name>).
func startStack(bins binaries, dir string, specs []simSpec, extraConfig string) (st *stack, err error) {
	return startStackWith(bins, dir, specs, stackOptions{extraConfig: extraConfig})
}

// startStackWith is startStack with options.
func startStackWith(bins binaries, dir string, specs []simSpec, opts stackOptions) (st *stack, err error) {
	st = &stack{dir: dir, sims: map[string]*sim{}}
	defer func() {
		if err != nil {
			st.close()
			st = nil
		}
	}()
	catalogue, err := filepath.Abs(filepath.Join("testdata", "models.toml"))
	if err != nil {
		return nil, err
	}
	for _, spec := range specs {
		spec.args = append(spec.args, "--catalogue", catalogue)
		s, err := startSim(bins.sim, spec)
		if err != nil {
			return nil, err
		}
		st.sims[spec.name] = s
	}
	cfgFile := filepath.Join(dir, "cortex-extproc.toml")
	if err := os.WriteFile(cfgFile, []byte(cortexConfig(catalogue, st.sims, opts)), 0o600); err != nil {
		return nil, err
	}
	if st.cortex, err = startCortex(bins.cortex, cfgFile); err != nil {
		return nil, err
	}
	clusters := map[string]string{}
	for n, s := range st.sims {
		clusters["neuron-"+n] = s.url
	}
	ec := opts.envoy
	ec.ExtProcAddr, ec.Clusters = st.cortex.grpcAddr, clusters
	if st.envoy, err = newEnvoyLite(ec); err != nil {
		return nil, err
	}
	st.front = httptest.NewServer(st.envoy)
	return st, nil
}

func (st *stack) close() {
	if st.front != nil {
		st.front.Close()
	}
	if st.envoy != nil {
		_ = st.envoy.Close()
	}
	if st.cortex != nil {
		st.cortex.proc.stop()
	}
	for _, s := range st.sims {
		s.stop()
	}
}

// logs is every process's output, for a failing test.
func (st *stack) logs() string {
	var b strings.Builder
	if st.cortex != nil {
		fmt.Fprintf(&b, "--- cortex-extproc ---\n%s\n", st.cortex.proc.output())
	}
	for n, s := range st.sims {
		fmt.Fprintf(&b, "--- neuron-sim %s ---\n%s\n", n, s.proc.output())
	}
	return b.String()
}

var errNoStack = errors.New("the process stack is not running (-short, or TestMain failed to start it)")
