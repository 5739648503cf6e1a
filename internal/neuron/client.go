package neuron

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// MaxResponseBytes caps how much of a neuron's answer is read: a neuron (or
// whatever answers on its port) sending an endless body must not exhaust our
// memory.
const MaxResponseBytes = 8 << 20

// maxErrorBodyBytes caps how much of a non-2xx answer is read; only its start
// is kept for the error.
const maxErrorBodyBytes = 64 << 10

// maxErrorBodyShown is how much of a non-2xx body a StatusError carries.
const maxErrorBodyShown = 512

// ErrNotFound is wrapped by the error Endpoint and Unload return when the
// neuron answers 404: it does not know that model.
var ErrNotFound = errors.New("model not known to the neuron")

// ErrUnconfirmed is wrapped by the error Load and Unload return when the
// neuron answered 2xx but not with the status neuron-api.md gives
// ({"status": "loaded"}, {"status": "unloaded"}): garbage, or an answer from
// something that is not a neuron. Whether the model was loaded or unloaded
// is then unknown: a caller must not assume either.
var ErrUnconfirmed = errors.New("the answer does not confirm the operation")

// StatusError is a non-2xx answer from a neuron.
type StatusError struct {
	Node   string // the neuron's configured name
	Op     string // e.g. "POST /models/load"
	URL    string
	Status int
	// Body is the start of the answer, at most ~512 bytes.
	Body string
	// Reason is the neuron's explanation: the "error", "message" or "code"
	// of a JSON body, else the raw (truncated) body.
	Reason string

	wrapped error
}

func (e *StatusError) Error() string {
	msg := fmt.Sprintf("neuron %q: %s answered %d %s", e.Node, e.Op, e.Status, http.StatusText(e.Status))
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	return msg
}

// Unwrap returns ErrNotFound for a 404 on endpoint and unload calls.
func (e *StatusError) Unwrap() error { return e.wrapped }

// Client speaks the neuron management API over HTTP. It holds no per-call
// timeout: callers bound each call with ctx (the poller uses poll.timeout,
// loads use cold_load.timeout).
type Client struct {
	name string
	base *url.URL
	hc   *http.Client
}

var _ API = (*Client)(nil)

// New returns a client for the neuron called name at endpoint, e.g.
// "http://beast.internal:13131". hc nil means a default http.Client.
func New(name, endpoint string, hc *http.Client) (*Client, error) {
	base, err := parseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("neuron %q: %w", name, err)
	}
	if hc == nil {
		hc = &http.Client{}
	}
	return &Client{name: name, base: base, hc: hc}, nil
}

func parseEndpoint(endpoint string) (*url.URL, error) {
	const want = "set it to http(s)://host[:port], e.g. http://beast.internal:13131"
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q is not a URL (%v); %s", endpoint, err, want)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("endpoint %q must use http or https; %s", endpoint, want)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("endpoint %q has no host; %s", endpoint, want)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("endpoint %q must not have a query or fragment; %s", endpoint, want)
	}
	return u, nil
}

// Name is the neuron's configured name.
func (c *Client) Name() string { return c.name }

// BaseURL is the neuron's configured management endpoint.
func (c *Client) BaseURL() string { return c.base.String() }

// Discovery is GET /discovery.
func (c *Client) Discovery(ctx context.Context) (*Discovery, error) {
	var d Discovery
	if err := c.getJSON(ctx, "/discovery", '{', &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// Models is GET /models.
func (c *Client) Models(ctx context.Context) ([]Model, error) {
	var ms []Model
	if err := c.getJSON(ctx, "/models", '[', &ms); err != nil {
		return nil, err
	}
	for i := range ms {
		if ms[i].ID == "" {
			return nil, fmt.Errorf("neuron %q: GET /models: entry %d has no id; check that %s is a neuron", c.name, i, c.base)
		}
	}
	if ms == nil {
		ms = []Model{}
	}
	return ms, nil
}

// Health is GET /health.
func (c *Client) Health(ctx context.Context) (*Health, error) {
	var h Health
	if err := c.getJSON(ctx, "/health", '{', &h); err != nil {
		return nil, err
	}
	return &h, nil
}

// Endpoint is GET /models/{id}/endpoint with the loopback host rewritten
// (see RewriteLoopback). A 404 wraps ErrNotFound.
func (c *Client) Endpoint(ctx context.Context, modelID string) (string, error) {
	var answer struct {
		URL string `json:"url"`
	}
	// The id is one path segment: "Qwen/Qwen3-8B" must travel as
	// "Qwen%2FQwen3-8B", or the neuron would see two segments.
	if err := c.getJSON(ctx, "/models/"+url.PathEscape(modelID)+"/endpoint", '{', &answer); err != nil {
		return "", err
	}
	op := "GET /models/{id}/endpoint"
	if answer.URL == "" {
		return "", fmt.Errorf("neuron %q: %s for model %q: answer has no url", c.name, op, modelID)
	}
	u, err := RewriteLoopback(answer.URL, c.base.String())
	if err != nil {
		return "", fmt.Errorf("neuron %q: %s for model %q: %w", c.name, op, modelID, err)
	}
	return u, nil
}

// Load is POST /models/load. It blocks until the weights are resident or ctx
// ends; give it a long ctx (cold_load.timeout).
func (c *Client) Load(ctx context.Context, spec LoadSpec) error {
	body, err := json.Marshal(spec)
	if err != nil {
		return fmt.Errorf("neuron %q: encoding load spec for %q: %w", c.name, spec.ModelID, err)
	}
	answer, err := c.do(ctx, http.MethodPost, "/models/load", body)
	var se *StatusError
	// A concurrent load of the same model (another request, another
	// gateway, the neuron's own pre-warm) won the race: the model is
	// resident, which is all the caller wanted.
	if errors.As(err, &se) && se.Status == http.StatusBadRequest && strings.Contains(strings.ToLower(se.Body), "already loaded") {
		return nil
	}
	if err != nil {
		return err
	}
	return c.confirm("POST /models/load", answer, "loaded")
}

// Unload is POST /models/unload. A 404 (the model is not there) wraps
// ErrNotFound.
func (c *Client) Unload(ctx context.Context, modelID string) error {
	body, err := json.Marshal(map[string]string{"model_id": modelID})
	if err != nil {
		return fmt.Errorf("neuron %q: encoding unload of %q: %w", c.name, modelID, err)
	}
	answer, err := c.do(ctx, http.MethodPost, "/models/unload", body)
	if err != nil {
		return err
	}
	return c.confirm("POST /models/unload", answer, "unloaded")
}

// confirm checks a 2xx answer to a load or unload: a JSON object whose
// "status" is want. Anything else wraps ErrUnconfirmed.
func (c *Client) confirm(op string, answer []byte, want string) error {
	var a struct {
		Status *string `json:"status"`
	}
	if err := json.Unmarshal(answer, &a); err == nil && a.Status != nil && *a.Status == want {
		return nil
	}
	return fmt.Errorf("neuron %q: %s: answered 2xx without {\"status\": %q} (the answer starts %q), so whether it took effect is unknown; check that %s is a neuron of a compatible version: %w",
		c.name, op, want, truncate(string(bytes.TrimSpace(answer)), 40), c.base, ErrUnconfirmed)
}

// getJSON GETs rawPath (already escaped) and decodes the answer into v,
// which must be a JSON value starting with want ('{' or '[').
func (c *Client) getJSON(ctx context.Context, rawPath string, want byte, v any) error {
	b, err := c.do(ctx, http.MethodGet, rawPath, nil)
	if err != nil {
		return err
	}
	op := opName(http.MethodGet, rawPath)
	trimmed := bytes.TrimLeft(b, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != want {
		kind := "object"
		if want == '[' {
			kind = "array"
		}
		return fmt.Errorf("neuron %q: %s: answer is not a JSON %s (starts %q); check that %s is a neuron", c.name, op, kind, truncate(string(trimmed), 40), c.base)
	}
	if err := json.Unmarshal(trimmed, v); err != nil {
		return fmt.Errorf("neuron %q: %s: invalid answer: %v; check that %s is a neuron of a compatible version", c.name, op, err, c.base)
	}
	return nil
}

// do sends one request and returns the 2xx body, or a *StatusError.
func (c *Client) do(ctx context.Context, method, rawPath string, body []byte) ([]byte, error) {
	op := opName(method, rawPath)
	u := c.url(rawPath)
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, fmt.Errorf("neuron %q: %s: %w", c.name, op, err)
	}
	// NewRequest re-parses the string; set the URL itself so that the
	// escaped id (%2F) is sent exactly as built.
	req.URL = u
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("neuron %q: %s: %w", c.name, op, err)
	}
	defer resp.Body.Close()

	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBodyBytes))
		se := &StatusError{
			Node:   c.name,
			Op:     op,
			URL:    u.String(),
			Status: resp.StatusCode,
			Body:   truncate(string(b), maxErrorBodyShown),
			Reason: reason(b),
		}
		if resp.StatusCode == http.StatusNotFound && (strings.HasSuffix(rawPath, "/endpoint") || rawPath == "/models/unload") {
			se.wrapped = ErrNotFound
		}
		return nil, se
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBytes+1))
	if err != nil {
		return nil, fmt.Errorf("neuron %q: %s: reading answer: %w", c.name, op, err)
	}
	if len(b) > MaxResponseBytes {
		return nil, fmt.Errorf("neuron %q: %s: response larger than %d MiB; check that %s is a neuron", c.name, op, MaxResponseBytes>>20, c.base)
	}
	return b, nil
}

// url joins the configured endpoint (which may carry a path prefix) and an
// escaped API path.
func (c *Client) url(rawPath string) *url.URL {
	u := *c.base
	escaped := strings.TrimSuffix(c.base.EscapedPath(), "/") + rawPath
	p, err := url.PathUnescape(escaped)
	if err != nil {
		// Unreachable: both halves are valid escaped paths.
		p = escaped
	}
	u.Path = p
	u.RawPath = escaped
	return &u
}

// opName names an API call for errors without the model id, e.g.
// "GET /models/{id}/endpoint".
func opName(method, rawPath string) string {
	if strings.HasPrefix(rawPath, "/models/") && strings.HasSuffix(rawPath, "/endpoint") {
		rawPath = "/models/{id}/endpoint"
	}
	return method + " " + rawPath
}

// reason extracts the neuron's explanation from an error body. Neurons
// answer {"error": "..."}, {"error": {"message": ...}}, {"message": ...} or
// {"code": ...}; anything else is shown raw.
func reason(b []byte) string {
	var m map[string]any
	if json.Unmarshal(b, &m) == nil {
		var parts []string
		add := func(v any) {
			switch v := v.(type) {
			case string:
				if v != "" {
					parts = append(parts, v)
				}
			case map[string]any:
				for _, k := range []string{"code", "message", "reason"} {
					if s, ok := v[k].(string); ok && s != "" {
						parts = append(parts, s)
					}
				}
			}
		}
		for _, k := range []string{"code", "error", "message", "detail", "reason"} {
			add(m[k])
		}
		if len(parts) > 0 {
			return truncate(strings.Join(parts, ": "), maxErrorBodyShown)
		}
	}
	return truncate(strings.TrimSpace(string(b)), maxErrorBodyShown)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// RewriteLoopback returns a neuron's endpoint answer usable from elsewhere.
// A neuron answers its inference URL as it sees itself, often
// "http://localhost:13131": a loopback host (localhost, 127.0.0.0/8, ::1,
// or the unspecified 0.0.0.0/::) is only meaningful on the neuron host, so
// it is replaced by the host of the neuron's configured endpoint, keeping the
// answer's scheme, port and path. Any trailing slash is dropped so callers
// can append "/v1/...". An answer that is not an absolute URL is an error.
func RewriteLoopback(answer, neuronEndpoint string) (string, error) {
	u, err := url.Parse(answer)
	if err != nil {
		return "", fmt.Errorf("endpoint answer %q is not a URL: %v", answer, err)
	}
	if u.Scheme == "" || u.Host == "" || u.Hostname() == "" {
		return "", fmt.Errorf("endpoint answer %q is not an absolute URL (scheme://host[:port])", answer)
	}
	if isLoopback(u.Hostname()) {
		base, err := url.Parse(neuronEndpoint)
		if err != nil || base.Hostname() == "" {
			return "", fmt.Errorf("cannot rewrite loopback endpoint %q: neuron endpoint %q has no host", answer, neuronEndpoint)
		}
		host := base.Hostname()
		if port := u.Port(); port != "" {
			u.Host = net.JoinHostPort(host, port)
		} else if strings.Contains(host, ":") {
			u.Host = "[" + host + "]"
		} else {
			u.Host = host
		}
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = strings.TrimRight(u.RawPath, "/")
	return u.String(), nil
}

func isLoopback(host string) bool {
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && (ip.IsLoopback() || ip.IsUnspecified())
}
