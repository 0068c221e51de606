// Package docs checks the project's Markdown: every relative link leads to
// a file that exists, every #anchor to a heading of its page, every page
// of docs/ is reachable from the index, docs/README.md, and the reference
// names every key of the API.
package docs

import (
	"bufio"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// root is the repository, two levels up from this package.
const root = "../.."

// link matches an inline Markdown link's target: [text](target).
var link = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// pages lists the Markdown files a reader is sent to: the top level, docs/
// and the chart's.
func pages(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, glob := range []string{"*.md", "docs/*.md", "docs/decisions/*.md", "dist/chart/*.md"} {
		m, err := filepath.Glob(filepath.Join(root, glob))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m...)
	}
	return out
}

// slug is GitHub's anchor for a heading: lower case, punctuation dropped
// (hyphens and underscores kept), spaces made hyphens.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// parse returns a page's anchors and its links, outside fenced code.
func parse(t *testing.T, path string) (anchors map[string]bool, links []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	anchors = map[string]bool{}
	seen := map[string]int{}
	fenced := false
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if fenced {
			continue
		}
		if h, ok := strings.CutPrefix(strings.TrimLeft(line, "#"), " "); ok && strings.HasPrefix(line, "#") {
			s := slug(h)
			if n := seen[s]; n > 0 {
				anchors[s+"-"+string(rune('0'+n))] = true
			} else {
				anchors[s] = true
			}
			seen[s]++
		}
		for _, m := range link.FindAllStringSubmatch(line, -1) {
			links = append(links, m[1])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return anchors, links
}

// Every relative link of every page leads somewhere: a file or directory
// of the repository and, with a #fragment, a heading of that page.
func TestLinksResolve(t *testing.T) {
	anchors := map[string]map[string]bool{}
	linksOf := map[string][]string{}
	for _, p := range pages(t) {
		anchors[filepath.Clean(p)], linksOf[p] = parse(t, p)
	}
	for page, links := range linksOf {
		for _, l := range links {
			if strings.Contains(l, "://") || strings.HasPrefix(l, "mailto:") {
				continue
			}
			file, frag, _ := strings.Cut(l, "#")
			target := filepath.Clean(page)
			if file != "" {
				target = filepath.Clean(filepath.Join(filepath.Dir(page), file))
			}
			if _, err := os.Stat(target); err != nil {
				t.Errorf("%s: link %q: %v", rel(page), l, err)
				continue
			}
			if frag == "" {
				continue
			}
			a, ok := anchors[target]
			if !ok {
				if strings.HasSuffix(target, ".md") {
					a, _ = parse(t, target)
					anchors[target] = a
				} else {
					t.Errorf("%s: link %q: an anchor into a file that is not Markdown", rel(page), l)
					continue
				}
			}
			if !a[frag] {
				t.Errorf("%s: link %q: %s has no heading #%s", rel(page), l, rel(target), frag)
			}
		}
	}
}

// Every page of docs/ is linked from the index, and the README links the
// index: a newcomer finds each page from the front page.
func TestEveryPageIsInTheIndex(t *testing.T) {
	_, fromReadme := parse(t, filepath.Join(root, "README.md"))
	if !contains(fromReadme, "docs/README.md") {
		t.Error("README.md does not link docs/README.md, the index")
	}
	_, fromIndex := parse(t, filepath.Join(root, "docs", "README.md"))
	m, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := filepath.Glob(filepath.Join(root, "docs", "decisions", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range append(m, d...) {
		name, _ := filepath.Rel(filepath.Join(root, "docs"), p)
		if name != "README.md" && !contains(fromIndex, name) {
			t.Errorf("docs/README.md does not link %s", name)
		}
	}
}

func contains(links []string, file string) bool {
	for _, l := range links {
		if f, _, _ := strings.Cut(l, "#"); f == file {
			return true
		}
	}
	return false
}

func rel(p string) string {
	r, err := filepath.Rel(root, p)
	if err != nil {
		return p
	}
	return r
}

// Every label, annotation, finalizer and PV attribute that api/v1alpha1
// names (a string constant "layercache.io/...") is in the reference page.
func TestReferenceNamesEveryKey(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root, "docs", "reference.md"))
	if err != nil {
		t.Fatal(err)
	}
	ref := string(b)
	keys := apiKeys(t)
	if len(keys) < 10 {
		t.Fatalf("found only %d keys in api/v1alpha1: %v", len(keys), keys)
	}
	for name, key := range keys {
		if !strings.Contains(ref, "`"+key+"`") {
			t.Errorf("docs/reference.md does not name %s (v1alpha1.%s)", key, name)
		}
	}
}

// apiKeys returns the string constants of api/v1alpha1 that are keys of
// layercache's own ("layercache.io/NAME"), by constant name. A prefix
// (ending in "-") is not a key.
func apiKeys(t *testing.T) map[string]string {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(root, "api", "v1alpha1", "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]string{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range file.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.CONST {
				continue
			}
			for _, spec := range g.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, v := range vs.Values {
					lit, ok := v.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue
					}
					s, err := strconv.Unquote(lit.Value)
					if err == nil && strings.HasPrefix(s, "layercache.io/") && !strings.HasSuffix(s, "-") && !strings.Contains(s, "/v1") {
						keys[vs.Names[i].Name] = s
					}
				}
			}
		}
	}
	return keys
}
