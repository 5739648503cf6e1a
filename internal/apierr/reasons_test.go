package apierr_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/helexa/cortex-extproc/internal/apierr"
)

// TestEveryErrorIsMadeWithAReason reads the module's source: every
// apierr.Unavailable (the one constructor without a default reason) must be
// given one with .WithReason where it is made, and every apierr.Error
// literal must set Reason. An error without one would be counted as
// "unclassified" on /metrics; this finds it before it ships.
func TestEveryErrorIsMadeWithAReason(t *testing.T) {
	root := filepath.Join("..", "..")
	fset := token.NewFileSet()
	checked := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		alias := importName(f)
		if alias == "" {
			return nil
		}
		withReason := map[*ast.CallExpr]bool{}
		ast.Inspect(f, func(n ast.Node) bool {
			if call, ok := n.(*ast.CallExpr); ok {
				if sel, ok := call.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == "WithReason" {
					if inner, ok := sel.X.(*ast.CallExpr); ok {
						withReason[inner] = true
					}
				}
			}
			return true
		})
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CallExpr:
				if isSel(n.Fun, alias, "Unavailable") {
					checked++
					if !withReason[n] {
						t.Errorf("%s: apierr.Unavailable without .WithReason(apierr.Reason…)", fset.Position(n.Pos()))
					}
				}
			case *ast.CompositeLit:
				if isSel(n.Type, alias, "Error") {
					checked++
					if !hasKey(n, "Reason") {
						t.Errorf("%s: apierr.Error literal without Reason", fset.Position(n.Pos()))
					}
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("found only %d places that make errors; is the walk reading the module?", checked)
	}
}

func importName(f *ast.File) string {
	for _, imp := range f.Imports {
		if strings.Trim(imp.Path.Value, `"`) == "github.com/helexa/cortex-extproc/internal/apierr" {
			if imp.Name != nil {
				return imp.Name.Name
			}
			return "apierr"
		}
	}
	return ""
}

func isSel(e ast.Expr, pkg, name string) bool {
	sel, ok := e.(*ast.SelectorExpr)
	if !ok || sel.Sel.Name != name {
		return false
	}
	id, ok := sel.X.(*ast.Ident)
	return ok && id.Name == pkg
}

func hasKey(lit *ast.CompositeLit, key string) bool {
	for _, el := range lit.Elts {
		if kv, ok := el.(*ast.KeyValueExpr); ok {
			if id, ok := kv.Key.(*ast.Ident); ok && id.Name == key {
				return true
			}
		}
	}
	return false
}

// Reasons are metric label values: short snake_case, listed once.
func TestReasonsAreLabelValues(t *testing.T) {
	ok := regexp.MustCompile(`^[a-z][a-z_]*[a-z]$`)
	seen := map[apierr.Reason]bool{}
	for _, r := range apierr.Reasons {
		if !ok.MatchString(string(r)) || len(r) > 32 {
			t.Errorf("reason %q is not a short snake_case label value", r)
		}
		if seen[r] {
			t.Errorf("reason %q listed twice", r)
		}
		seen[r] = true
	}
	if seen[apierr.ReasonUnclassified] {
		t.Error("unclassified is what a missing reason is counted as, not a reason to give")
	}
	// Every constant in apierr.go is in Reasons.
	src, err := os.ReadFile("apierr.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s*Reason\w+\s+Reason = "([a-z_]+)"`).FindAllStringSubmatch(string(src), -1) {
		if r := apierr.Reason(m[1]); r != apierr.ReasonUnclassified && !seen[r] {
			t.Errorf("reason %q is declared but missing from apierr.Reasons", r)
		}
	}
}

func TestDefaultsAndClassified(t *testing.T) {
	for _, c := range []struct {
		err  *apierr.Error
		want apierr.Reason
	}{
		{apierr.InvalidRequest("x"), apierr.ReasonInvalidBody},
		{apierr.ModelNotFound("x"), apierr.ReasonUnknownModel},
		{apierr.NotFound("x"), apierr.ReasonPathNotRouted},
		{apierr.NoFeasible("x"), apierr.ReasonNoFeasible},
		{apierr.TooLarge("x"), apierr.ReasonBodyTooLarge},
		{apierr.Unavailable(5, "x"), apierr.ReasonUnclassified},
		{apierr.Unavailable(5, "x").WithReason(apierr.ReasonNoHealthy), apierr.ReasonNoHealthy},
	} {
		if got := c.err.Classified(); got != c.want {
			t.Errorf("%v: reason %q, want %q", c.err, got, c.want)
		}
	}
	// The reason is ours: it never reaches the client.
	e := apierr.Unavailable(5, "x").WithReason(apierr.ReasonNoHealthy)
	if strings.Contains(string(e.OpenAIBody()), "no_healthy") || strings.Contains(string(e.AnthropicBody()), "no_healthy") {
		t.Errorf("the reason leaks into the client's error body: %s", e.OpenAIBody())
	}
}
