package config

import (
	"os"
	"path/filepath"
	"testing"
)

func TestExplore(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"a.toml": "[poll]\ninterval='banana'\nfailure_threshold='abc'\n[cold_load]\ntimeout=[1]\n",
		"b.toml": "neurons='x'\n",
		"c.toml": "[poll\n",
		"d.toml": "poll=3\n",
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o644)
		r, err := Load(p)
		t.Logf("%s: err=%v unknown=%v", name, err, r.Unknown)
	}
}
