package docs

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "write docs/api.md from the CRDs instead of checking it")

// docs/api.md is generated from the CRDs (themselves generated from the
// API types), so that the reference cannot drift from the API:
// `make manifests` regenerates both.
func TestAPIPageIsGenerated(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(root, "config", "crd", "bases", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRDs in config/crd/bases (%v)", err)
	}
	var b strings.Builder
	b.WriteString("# API reference\n\n<!-- Generated from config/crd/bases by `make manifests` (internal/docs); do not edit. -->\n\n")
	b.WriteString("The custom resources of `layercache.io/v1alpha1`. What they are for: [design.md](design.md#cache-resource); the labels, annotations and PV attributes: [reference.md](reference.md).\n")
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.UnmarshalStrict(raw, crd); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		writeCRD(&b, crd)
	}
	path := filepath.Join(root, "docs", "api.md")
	if *update {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	have, err := os.ReadFile(path)
	if err != nil || string(have) != b.String() {
		t.Errorf("docs/api.md is not what the CRDs generate (%v): run make manifests and commit it", err)
	}
}

func writeCRD(b *strings.Builder, crd *apiextensionsv1.CustomResourceDefinition) {
	for _, v := range crd.Spec.Versions {
		s := v.Schema.OpenAPIV3Schema
		fmt.Fprintf(b, "\n## %s\n\n`%s/%s`, %s (`kubectl get %s`", crd.Spec.Names.Kind, crd.Spec.Group, v.Name,
			strings.ToLower(string(crd.Spec.Scope)), crd.Spec.Names.Plural)
		if len(crd.Spec.Names.ShortNames) > 0 {
			fmt.Fprintf(b, ", `%s`", strings.Join(crd.Spec.Names.ShortNames, "`, `"))
		}
		fmt.Fprintf(b, ").\n\n%s\n", oneLine(s.Description))
		if len(v.AdditionalPrinterColumns) > 0 {
			b.WriteString("\nColumns:")
			for i, c := range v.AdditionalPrinterColumns {
				sep := ","
				if i == 0 {
					sep = ""
				}
				fmt.Fprintf(b, "%s %s (`%s`)", sep, c.Name, c.JSONPath)
			}
			b.WriteString(".\n")
		}
		for _, part := range []string{"spec", "status"} {
			p, ok := s.Properties[part]
			if !ok {
				continue
			}
			fmt.Fprintf(b, "\n### %s.%s\n\n| field | type | description |\n|---|---|---|\n", crd.Spec.Names.Kind, part)
			writeFields(b, part, p)
		}
	}
}

// writeFields writes one row per field below s, depth first, in name order.
func writeFields(b *strings.Builder, prefix string, s apiextensionsv1.JSONSchemaProps) {
	if s.Items != nil && s.Items.Schema != nil {
		writeFields(b, prefix+"[]", *s.Items.Schema)
		return
	}
	names := make([]string, 0, len(s.Properties))
	for n := range s.Properties {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p := s.Properties[n]
		path := prefix + "." + n
		desc := oneLine(p.Description)
		if slices.Contains(s.Required, n) {
			desc = "**Required.** " + desc
		}
		if len(p.Enum) > 0 {
			var vals []string
			for _, e := range p.Enum {
				vals = append(vals, "`"+strings.Trim(string(e.Raw), `"`)+"`")
			}
			desc += " One of " + strings.Join(vals, ", ") + "."
		}
		if p.Default != nil {
			desc += " Default `" + strings.Trim(string(p.Default.Raw), `"`) + "`."
		}
		fmt.Fprintf(b, "| `%s` | %s | %s |\n", path, typeOf(p), desc)
		writeFields(b, path, p)
	}
}

func typeOf(p apiextensionsv1.JSONSchemaProps) string {
	switch {
	case p.Type == "array" && p.Items != nil && p.Items.Schema != nil:
		return "[]" + typeOf(*p.Items.Schema)
	case p.Format != "":
		return p.Type + " (" + p.Format + ")"
	case p.XIntOrString:
		return "int or string"
	}
	return p.Type
}

// oneLine joins a description's lines, for a table cell.
func oneLine(s string) string {
	return strings.ReplaceAll(strings.Join(strings.Fields(s), " "), "|", `\|`)
}
