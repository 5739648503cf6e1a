package e2e

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestReadmeLayoutMatchesTree holds the README's "Layout" section to the
// repository: every folder it names exists, and every top-level folder and
// every Go package is named.
func TestReadmeLayoutMatchesTree(t *testing.T) {
	root := ".."
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n## Layout\n")
	if !ok {
		t.Fatal("README.md has no \"## Layout\" section")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	block := regexp.MustCompile("(?s)```\n(.*?)```").FindStringSubmatch(section)
	if block == nil {
		t.Fatal("README.md's Layout section has no tree in a code block")
	}
	// Lines are "name/  description", indented two spaces per level.
	listed := map[string]bool{}
	var parents []string
	for _, line := range strings.Split(block[1], "\n") {
		trimmed := strings.TrimLeft(line, " ")
		name, _, _ := strings.Cut(trimmed, " ")
		if !strings.HasSuffix(name, "/") {
			continue
		}
		depth := (len(line) - len(trimmed)) / 2
		parents = append(parents[:min(depth, len(parents))], strings.TrimSuffix(name, "/"))
		listed[filepath.Join(parents...)] = true
	}
	for dir := range listed {
		if st, err := os.Stat(filepath.Join(root, dir)); err != nil || !st.IsDir() {
			t.Errorf("README's layout names %s/, which is not a folder of the repository", dir)
		}
	}
	// A folder is covered when it is listed, or when a listed folder above
	// it lists nothing below itself (deploy/ covers deploy/helm); a folder
	// that lists some of its subfolders (internal/) must list them all.
	hasListedChild := map[string]bool{}
	for dir := range listed {
		for d := filepath.Dir(dir); d != "."; d = filepath.Dir(d) {
			hasListedChild[d] = true
		}
	}
	covered := func(dir string) bool {
		if listed[dir] {
			return true
		}
		for d := filepath.Dir(dir); d != "."; d = filepath.Dir(d) {
			if listed[d] {
				return !hasListedChild[d]
			}
		}
		return false
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") && !listed[e.Name()] {
			t.Errorf("top-level folder %s/ is missing from README's layout", e.Name())
		}
	}
	reported := map[string]bool{}
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") && rel != "." || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".go") && !strings.HasSuffix(path, "_test.go") {
			if dir := filepath.Dir(rel); dir != "." && !covered(dir) && !reported[dir] {
				reported[dir] = true
				t.Errorf("package %s/ is missing from README's layout", dir)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
