package modellist_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/anthropics/anthropic-sdk-go/v2/packages/pagination"
	"github.com/anthropics/anthropic-sdk-go/v2/packages/respjson"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// nullable are the SDK fields that may be JSON null; every other field the
// SDK declares must be present with a value of the right type.
var nullable = map[string]bool{"FirstID": true, "LastID": true, "DeprecatedAt": true, "Line": true, "RetiresAt": true}

var fieldType = reflect.TypeFor[respjson.Field]()

// requireAllFields fails for every field of an SDK response type (and of
// the SDK types nested in it) that our JSON left out or sent with the wrong
// type.
func requireAllFields(t *testing.T, path string, v reflect.Value) {
	t.Helper()
	for _, p := range fieldProblems(path, v) {
		t.Error(p)
	}
}

// fieldProblems reads the SDK's JSON metadata, which records for each
// field it declares whether the JSON had it, null, or a wrong type.
func fieldProblems(path string, v reflect.Value) []string {
	var out []string
	switch v.Kind() {
	case reflect.Slice:
		for i := range v.Len() {
			out = append(out, fieldProblems(path+"["+itoa(i)+"]", v.Index(i))...)
		}
		return out
	case reflect.Struct:
	default:
		return nil
	}
	meta := v.FieldByName("JSON")
	if !meta.IsValid() {
		return nil
	}
	for i := range meta.NumField() {
		sf := meta.Type().Field(i)
		if !sf.IsExported() || sf.Type != fieldType {
			continue
		}
		f := meta.Field(i).Interface().(respjson.Field)
		name := path + "." + sf.Name
		switch {
		case f.Valid():
		case f.Raw() == respjson.Null && nullable[sf.Name]:
			continue
		case f.Raw() == respjson.Omitted:
			out = append(out, name+": missing")
			continue
		default:
			out = append(out, name+": "+f.Raw()+" is not what the SDK expects")
			continue
		}
		out = append(out, fieldProblems(name, v.FieldByName(sf.Name))...)
	}
	return out
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

// openAIOrder is the ids of List() and their created times, in order.
func openAIOrder(t *testing.T, l *modellist.List) (ids []string, created map[string]int64) {
	t.Helper()
	var list struct {
		Data []struct {
			ID      string `json:"id"`
			Created int64  `json:"created"`
		} `json:"data"`
	}
	if err := json.Unmarshal(l.List(), &list); err != nil {
		t.Fatal(err)
	}
	created = map[string]int64{}
	for _, e := range list.Data {
		ids = append(ids, e.ID)
		created[e.ID] = e.Created
	}
	return ids, created
}

// The Anthropic list decodes with the official SDK's own types, every field
// they declare present, and holds the OpenAI list's entries in its order.
func TestAnthropicListDecodesWithTheSDKTypes(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	var page pagination.Page[anthropic.ModelInfo]
	body := l.AnthropicList()
	if err := json.Unmarshal(body, &page); err != nil {
		t.Fatalf("SDK page type: %v\n%s", err, body)
	}
	requireAllFields(t, "page", reflect.ValueOf(page))

	wantIDs, created := openAIOrder(t, l)
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if !slices.Equal(ids, wantIDs) {
		t.Fatalf("Anthropic ids %v\nwant the OpenAI list's %v", ids, wantIDs)
	}
	if page.HasMore || !page.JSON.HasMore.Valid() || page.FirstID != wantIDs[0] || page.LastID != wantIDs[len(wantIDs)-1] {
		t.Errorf("has_more %v first_id %q last_id %q, want false, %q, %q", page.HasMore, page.FirstID, page.LastID, wantIDs[0], wantIDs[len(wantIDs)-1])
	}

	type want struct {
		display           string
		maxInput, maxToks int64
		vision, thinks    bool
	}
	cases := map[string]want{
		"Qwen/Qwen3.6-27B":        {display: "Qwen/Qwen3.6-27B", maxInput: 28672, maxToks: 4096, thinks: true},
		"Qwen/Qwen3-8B":           {display: "Qwen/Qwen3-8B", maxInput: 30000, maxToks: 8192},
		"helexa/balanced":         {display: "helexa/balanced (Qwen/Qwen3-8B)", maxInput: 30000, maxToks: 8192},
		"helexa/large":            {display: "helexa/large (Qwen/Qwen3.6-27B)", maxInput: 28672, maxToks: 4096, thinks: true},
		"helexa/ghost":            {display: "helexa/ghost (Nobody/Has-This)"},
		"mistral/Local-7B":        {display: "mistral/Local-7B", maxInput: 8192, maxToks: 1024, vision: true}, // no input limit: the context
		"unsloth/Qwen3-0.6B-GGUF": {display: "unsloth/Qwen3-0.6B-GGUF"},
	}
	for _, m := range page.Data {
		w, ok := cases[m.ID]
		if !ok {
			t.Errorf("unexpected model %s", m.ID)
			continue
		}
		if m.Type != "model" || m.DisplayName != w.display || m.Lifecycle != anthropic.ModelInfoLifecycleActive {
			t.Errorf("%s: type %q display_name %q lifecycle %q, want model, %q, active", m.ID, m.Type, m.DisplayName, m.Lifecycle, w.display)
		}
		if !m.CreatedAt.Equal(time.Unix(created[m.ID], 0)) {
			t.Errorf("%s: created_at %v, want the OpenAI entry's created %d", m.ID, m.CreatedAt, created[m.ID])
		}
		if m.MaxInputTokens != w.maxInput || m.MaxTokens != w.maxToks {
			t.Errorf("%s: max_input_tokens %d max_tokens %d, want %d %d", m.ID, m.MaxInputTokens, m.MaxTokens, w.maxInput, w.maxToks)
		}
		c := m.Capabilities
		if c.ImageInput.Supported != w.vision {
			t.Errorf("%s: image_input %v, want %v", m.ID, c.ImageInput.Supported, w.vision)
		}
		if c.Thinking.Supported != w.thinks || c.Thinking.Types.Enabled.Supported != w.thinks || !c.Thinking.Types.Disabled.Supported {
			t.Errorf("%s: thinking %s, want supported=%v and disabled always accepted", m.ID, c.Thinking.RawJSON(), w.thinks)
		}
		if c.Batch.Supported || c.PDFInput.Supported || c.ServerTools.Supported || c.Effort.Supported {
			t.Errorf("%s: claims a capability only Anthropic's servers have: %s", m.ID, c.RawJSON())
		}
		if m.JSON.Line.Raw() != "null" || m.JSON.DeprecatedAt.Raw() != "null" || m.JSON.RetiresAt.Raw() != "null" {
			t.Errorf("%s: line %s deprecated_at %s retires_at %s, want null", m.ID, m.JSON.Line.Raw(), m.JSON.DeprecatedAt.Raw(), m.JSON.RetiresAt.Raw())
		}
	}
}

// The checker above is what makes "every field present" a test: an object
// missing one fails it.
func TestRequireAllFieldsCatchesAMissingField(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	b, _ := l.AnthropicGet("Qwen/Qwen3-8B")
	for _, drop := range []string{"display_name", "created_at", "type", "id", "capabilities", "max_tokens"} {
		var obj map[string]any
		if err := json.Unmarshal(b, &obj); err != nil {
			t.Fatal(err)
		}
		delete(obj, drop)
		cut, _ := json.Marshal(obj)
		var m anthropic.ModelInfo
		if err := json.Unmarshal(cut, &m); err != nil {
			t.Fatal(err)
		}
		if p := fieldProblems("m", reflect.ValueOf(m)); len(p) != 1 || !strings.Contains(p[0], "missing") {
			t.Errorf("an object without %s: problems %q, want one missing field", drop, p)
		}
	}
}

func TestAnthropicGet(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	for _, id := range []string{"Qwen/Qwen3-8B", "helexa/balanced", "mistral/Local-7B"} {
		b, ok := l.AnthropicGet(id)
		if !ok {
			t.Fatalf("AnthropicGet(%q) not found", id)
		}
		var m anthropic.ModelInfo
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		requireAllFields(t, id, reflect.ValueOf(m))
		if m.ID != id || m.Type != "model" {
			t.Errorf("AnthropicGet(%q) = %s", id, b)
		}
		// The object is the list's entry, byte for byte.
		if !strings.Contains(string(l.AnthropicList()), string(b)) {
			t.Errorf("AnthropicGet(%q) = %s is not the list's entry", id, b)
		}
	}
	for _, id := range []string{"helexa/internal", "Nobody/Has-This", "sick/Only-Here", "nope"} {
		if b, ok := l.AnthropicGet(id); ok {
			t.Errorf("AnthropicGet(%q) = %s, want not found", id, b)
		}
	}
}

func TestAnthropicEmptyList(t *testing.T) {
	l := modellist.New(catalogue.Empty, func() *fleet.Snapshot { return &fleet.Snapshot{} })
	// data is [] not null, and with no entries there are no ids.
	if got, want := string(l.AnthropicList()), `{"data":[],"has_more":false,"first_id":null,"last_id":null}`; got != want {
		t.Errorf("empty list = %s, want %s", got, want)
	}
}

// The Anthropic bodies are cached per snapshot like the OpenAI ones, and
// rebuilt when the fleet changes; the OpenAI list is not disturbed.
func TestAnthropicListFollowsSnapshotChanges(t *testing.T) {
	cat := mustCatalogue(t)
	var snap atomic.Pointer[fleet.Snapshot]
	snap.Store(fleetFixture())
	l := modellist.New(func() *catalogue.Catalogue { return cat }, snap.Load)

	openAI := string(l.List())
	first := l.AnthropicList()
	if again := l.AnthropicList(); &again[0] != &first[0] {
		t.Error("AnthropicList rebuilt its body with the snapshot unchanged")
	}
	if string(l.List()) != openAI {
		t.Error("the OpenAI list changed after AnthropicList")
	}
	if _, ok := l.AnthropicGet("new/Model"); ok {
		t.Fatal("new/Model listed before any neuron has it")
	}

	// The poller publishes a new snapshot: rig now also holds new/Model.
	old := snap.Load()
	rig := *old.Nodes[1]
	rig.Models = append(slices.Clone(rig.Models), &fleet.Model{Model: neuron.Model{ID: "new/Model", Status: neuron.StatusLoaded}})
	snap.Store(&fleet.Snapshot{Round: old.Round + 1, Nodes: []*fleet.Node{old.Nodes[0], &rig, old.Nodes[2]}})

	if _, ok := l.AnthropicGet("new/Model"); !ok {
		t.Error("AnthropicGet does not see a model of the new snapshot")
	}
	var page pagination.Page[anthropic.ModelInfo]
	if err := json.Unmarshal(l.AnthropicList(), &page); err != nil {
		t.Fatal(err)
	}
	wantIDs, _ := openAIOrder(t, l)
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if !slices.Contains(ids, "new/Model") || !slices.Equal(ids, wantIDs) {
		t.Errorf("after the snapshot changed: %v, want the OpenAI list's %v", ids, wantIDs)
	}
}

// serveAnthropic answers /v1/models as extproc does for a request with an
// anthropic-version header.
func serveAnthropic(l *modellist.List, requests *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if r.Header.Get("anthropic-version") == "" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		path := r.URL.EscapedPath()
		if path == "/v1/models" {
			w.Write(l.AnthropicList())
			return
		}
		if id, ok := strings.CutPrefix(path, "/v1/models/"); ok {
			id, _ = url.PathUnescape(id)
			if b, ok := l.AnthropicGet(id); ok {
				w.Write(b)
				return
			}
		}
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"type":"error","error":{"type":"not_found_error","message":"model not found"}}`))
	})
}

// Through the official Anthropic Go SDK: list (one page, auto-paging stops
// there), get by an id with a slash, and a 404 for a hidden alias.
func TestAnthropicSDKListsAndGetsModels(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	var requests atomic.Int32
	srv := httptest.NewServer(serveAnthropic(l, &requests))
	defer srv.Close()
	client := anthropic.NewClient(option.WithBaseURL(srv.URL), option.WithAPIKey("test"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	wantIDs, _ := openAIOrder(t, l)
	var ids []string
	pager := client.Models.ListAutoPaging(ctx, anthropic.ModelListParams{})
	for pager.Next() {
		ids = append(ids, pager.Current().ID)
	}
	if err := pager.Err(); err != nil {
		t.Fatalf("Models.ListAutoPaging: %v", err)
	}
	if !slices.Equal(ids, wantIDs) || requests.Load() != 1 {
		t.Errorf("SDK listed %v in %d request(s), want %v in one", ids, requests.Load(), wantIDs)
	}

	m, err := client.Models.Get(ctx, "helexa/balanced", anthropic.ModelGetParams{})
	if err != nil {
		t.Fatalf("Models.Get(helexa/balanced): %v", err)
	}
	if m.ID != "helexa/balanced" || m.DisplayName != "helexa/balanced (Qwen/Qwen3-8B)" || m.CreatedAt.IsZero() {
		t.Errorf("Get = %s", m.RawJSON())
	}

	_, err = client.Models.Get(ctx, "helexa/internal", anthropic.ModelGetParams{})
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound {
		t.Errorf("Get(hidden alias) err = %v, want a 404 API error", err)
	}
}
