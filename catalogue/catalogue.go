// Package catalogue holds the operator's model catalogue (models.toml, the
// existing cortex format): profiles, aliases, residency priorities. A
// Catalogue is immutable once built; reloads build a new one and swap it.
package catalogue

import "sort"

// DefaultPriority is the residency priority of a profile that sets none, and
// of a model unknown to the catalogue.
const DefaultPriority = 100

// PinnedDefaultPriority is the priority of a profile with a non-empty
// pinned_on and no explicit priority (legacy catalogues: pinned meant "never
// evict").
const PinnedDefaultPriority = 1000

// Profile is one [[models]] entry.
type Profile struct {
	ID              string   `toml:"id"`
	Harness         string   `toml:"harness"`
	Quant           string   `toml:"quant"`
	VRAMMB          int64    `toml:"vram_mb"`
	MinDevices      int      `toml:"min_devices"`        // 0 in the file means 1
	MinDeviceVRAMMB int64    `toml:"min_device_vram_mb"` // 0: no floor
	PinnedOn        []string `toml:"pinned_on"`
	// ResidencyPriority nil means unset (see Priority).
	ResidencyPriority *int     `toml:"residency_priority"`
	Source            string   `toml:"source"`
	Capabilities      []string `toml:"capabilities"`
	Limit             *Limit   `toml:"limit"`
	// Cost nil means "not priced"; zeros mean "intentionally free".
	Cost *Cost `toml:"cost"`
}

// Limit is the advertised token budget.
type Limit struct {
	Context int64 `toml:"context" json:"context,omitempty"`
	Input   int64 `toml:"input" json:"input,omitempty"`
	Output  int64 `toml:"output" json:"output,omitempty"`
}

// Cost is USD per 1M tokens. Absent tiers are nil and omitted on /v1/models.
type Cost struct {
	Input      *float64 `toml:"input" json:"input,omitempty"`
	Output     *float64 `toml:"output" json:"output,omitempty"`
	CacheRead  *float64 `toml:"cache_read" json:"cache_read,omitempty"`
	CacheWrite *float64 `toml:"cache_write" json:"cache_write,omitempty"`
}

// Devices is min_devices with its default of 1.
func (p *Profile) Devices() int {
	if p.MinDevices < 1 {
		return 1
	}
	return p.MinDevices
}

// Priority is residency_priority with routing.md's defaults: 100, or 1000
// for a pinned profile that sets none.
func (p *Profile) Priority() int {
	if p.ResidencyPriority != nil {
		return *p.ResidencyPriority
	}
	if len(p.PinnedOn) > 0 {
		return PinnedDefaultPriority
	}
	return DefaultPriority
}

// PinnedTo reports whether node is in pinned_on.
func (p *Profile) PinnedTo(node string) bool {
	for _, n := range p.PinnedOn {
		if n == node {
			return true
		}
	}
	return false
}

// AllowedOn reports whether pinned_on permits node (an empty list permits all).
func (p *Profile) AllowedOn(node string) bool {
	return len(p.PinnedOn) == 0 || p.PinnedTo(node)
}

// LoadID is the model_id sent to /models/load: "source:id" when source is set.
func (p *Profile) LoadID() string {
	if p.Source != "" {
		return p.Source + ":" + p.ID
	}
	return p.ID
}

// Catalogue is an immutable, validated catalogue.
type Catalogue struct {
	models  []*Profile // sorted by ID
	byID    map[string]*Profile
	aliases map[string]string
	// hidden names the aliases from [hidden_aliases]: they route like any
	// alias but are left out of GET /v1/models.
	hidden map[string]bool
	// Hash is the hex SHA-256 of the file content it was built from.
	Hash string
	// warnings are the problems Parse tolerated (see Warnings).
	warnings []Problem
}

// New builds a catalogue from profiles and aliases without validating them;
// Parse is the entry point for files. Profiles are sorted by ID.
func New(models []*Profile, aliases map[string]string, hash string) *Catalogue {
	c := &Catalogue{
		models:  append([]*Profile(nil), models...),
		byID:    make(map[string]*Profile, len(models)),
		aliases: make(map[string]string, len(aliases)),
		Hash:    hash,
	}
	sort.Slice(c.models, func(i, j int) bool { return c.models[i].ID < c.models[j].ID })
	for _, p := range c.models {
		c.byID[p.ID] = p
	}
	for k, v := range aliases {
		c.aliases[k] = v
	}
	return c
}

// Empty is a catalogue with no models and no aliases.
func Empty() *Catalogue { return New(nil, nil, "") }

// ResolveAlias returns the alias target, or id itself when it is not an
// alias. One flat lookup, never chained.
func (c *Catalogue) ResolveAlias(id string) string {
	if t, ok := c.aliases[id]; ok {
		return t
	}
	return id
}

// IsAlias reports whether id is an alias.
func (c *Catalogue) IsAlias(id string) bool {
	_, ok := c.aliases[id]
	return ok
}

// Profile returns the profile for a concrete id, or nil.
func (c *Catalogue) Profile(id string) *Profile { return c.byID[id] }

// Models returns the profiles sorted by ID. Callers must not modify them.
func (c *Catalogue) Models() []*Profile { return c.models }

// Aliases returns alias → target, hidden aliases included. Callers must
// not modify it.
func (c *Catalogue) Aliases() map[string]string { return c.aliases }

// Hidden reports whether alias comes from [hidden_aliases]: it routes, but
// GET /v1/models does not list it.
func (c *Catalogue) Hidden(alias string) bool { return c.hidden[alias] }

// WithHidden returns a copy of c in which the named aliases are hidden
// (names that are not aliases are ignored). Parse uses it for
// [hidden_aliases]; tests use it to build catalogues in code.
func (c *Catalogue) WithHidden(names ...string) *Catalogue {
	n := *c
	n.hidden = make(map[string]bool, len(names))
	for _, a := range names {
		if _, ok := c.aliases[a]; ok {
			n.hidden[a] = true
		}
	}
	return &n
}

// Priority is the residency priority of a concrete id; a model unknown to
// the catalogue ranks DefaultPriority.
func (c *Catalogue) Priority(id string) int {
	if p := c.byID[id]; p != nil {
		return p.Priority()
	}
	return DefaultPriority
}

// MayDisplace reports whether incoming may evict resident: a class rule, so
// equal ranks swap both ways.
func (c *Catalogue) MayDisplace(incoming, resident string) bool {
	return c.Priority(incoming) >= c.Priority(resident)
}

// Warnings lists what Parse tolerated rather than rejected: unknown keys
// (neurons and operators add fields) and aliases whose target is not a
// catalogue model. They never block a load; callers log them.
func (c *Catalogue) Warnings() []Problem { return c.warnings }
