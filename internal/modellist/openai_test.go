package modellist_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/modellist"
)

// serve answers /v1/models the way extproc does behind Envoy: the list, one
// entry by its path-escaped id, or a 404.
func serve(l *modellist.List) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		path := r.URL.EscapedPath()
		if path == "/v1/models" {
			w.Write(l.List())
			return
		}
		if id, ok := strings.CutPrefix(path, "/v1/models/"); ok {
			id, _ = url.PathUnescape(id)
			if b, ok := l.Get(id); ok {
				w.Write(b)
				return
			}
		}
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"error":{"message":"not found","type":"invalid_request_error","code":"model_not_found"}}`))
	})
}

// The official OpenAI Go SDK is what many clients use: our list and entries
// must parse with it, ids with slashes included.
func TestOpenAISDKParsesModelList(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	srv := httptest.NewServer(serve(l))
	defer srv.Close()
	client := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("test"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	page, err := client.Models.List(ctx)
	if err != nil {
		t.Fatalf("Models.List: %v", err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
		if m.Object != "model" || m.OwnedBy == "" || m.Created <= 0 {
			t.Errorf("%s: object=%q owned_by=%q created=%d", m.ID, m.Object, m.OwnedBy, m.Created)
		}
	}
	if len(ids) != 7 || ids[0] != "Qwen/Qwen3-8B" {
		t.Errorf("SDK saw ids %v, want the 7 listed models sorted", ids)
	}
	// The cortex extras survive in the SDK's raw JSON for clients that read them.
	if raw := page.Data[0].RawJSON(); !strings.Contains(raw, `"loaded":true`) || !strings.Contains(raw, `"locations"`) {
		t.Errorf("raw JSON lacks cortex fields: %s", raw)
	}

	m, err := client.Models.Get(ctx, "helexa/balanced")
	if err != nil {
		t.Fatalf("Models.Get(helexa/balanced): %v", err)
	}
	if m.ID != "helexa/balanced" || m.OwnedBy != "helexa" {
		t.Errorf("Get = %+v", m)
	}
	if !strings.Contains(m.RawJSON(), `"alias_of":"Qwen/Qwen3-8B"`) {
		t.Errorf("alias entry lacks alias_of: %s", m.RawJSON())
	}

	_, err = client.Models.Get(ctx, "helexa/internal")
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound {
		t.Errorf("Get(hidden alias) err = %v, want a 404 API error", err)
	}
}
