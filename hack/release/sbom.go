package main

import (
	"bytes"
	"debug/buildinfo"
	"fmt"
	"strings"

	spdxjson "github.com/spdx/tools-golang/json"
	"github.com/spdx/tools-golang/spdx/v2/common"
	spdx "github.com/spdx/tools-golang/spdx/v2/v2_3"
)

// debianPackage is a Debian package whose files an image carries.
type debianPackage struct{ name, version, arch string }

// sbom describes one platform's image of name at version: its Go binary's
// main module and dependencies (from the binary's build information) and
// the Debian packages it carries. Dated by the source's commit time, so
// that a release made twice from one tree writes the same document.
func sbom(name, version, arch, binary, created string, debs []debianPackage) ([]byte, error) {
	info, err := buildinfo.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("reading the build information of %s: %w", binary, err)
	}
	doc := &spdx.Document{
		SPDXVersion: spdx.Version, DataLicense: spdx.DataLicense, SPDXIdentifier: "DOCUMENT",
		DocumentName:      fmt.Sprintf("layercache-%s-%s-linux-%s", name, version, arch),
		DocumentNamespace: fmt.Sprintf("https://github.com/layercache/layercache/releases/%s/sbom/%s-linux-%s", version, name, arch),
		CreationInfo: &spdx.CreationInfo{Created: created,
			Creators: []common.Creator{{CreatorType: "Tool", Creator: "layercache-release"}}},
	}
	root := goPackage("main", info.Main.Path, version)
	root.PackageComment = "built with " + info.GoVersion + " for linux/" + arch
	doc.Packages = append(doc.Packages, root)
	doc.Relationships = append(doc.Relationships, &spdx.Relationship{
		RefA: common.MakeDocElementID("", "DOCUMENT"), RefB: common.MakeDocElementID("", string(root.PackageSPDXIdentifier)), Relationship: "DESCRIBES"})
	for i, dep := range info.Deps {
		d := dep
		if d.Replace != nil {
			d = d.Replace
		}
		p := goPackage(fmt.Sprintf("go-%d", i), d.Path, d.Version)
		doc.Packages = append(doc.Packages, p)
		doc.Relationships = append(doc.Relationships, &spdx.Relationship{
			RefA: common.MakeDocElementID("", string(root.PackageSPDXIdentifier)), RefB: common.MakeDocElementID("", string(p.PackageSPDXIdentifier)), Relationship: "DEPENDS_ON"})
	}
	for i, deb := range debs {
		p := &spdx.Package{PackageName: deb.name, PackageVersion: deb.version,
			PackageSPDXIdentifier: common.ElementID(fmt.Sprintf("Package-deb-%d", i)), PackageDownloadLocation: "NOASSERTION",
			PackageSupplier: &common.Supplier{SupplierType: "Organization", Supplier: "Debian"},
			PackageExternalReferences: []*spdx.PackageExternalReference{{Category: "PACKAGE-MANAGER", RefType: "purl",
				Locator: fmt.Sprintf("pkg:deb/debian/%s@%s?arch=%s", deb.name, deb.version, deb.arch)}}}
		doc.Packages = append(doc.Packages, p)
		doc.Relationships = append(doc.Relationships, &spdx.Relationship{
			RefA: common.MakeDocElementID("", "DOCUMENT"), RefB: common.MakeDocElementID("", string(p.PackageSPDXIdentifier)), Relationship: "DESCRIBES"})
	}
	var buf bytes.Buffer
	if err := spdxjson.Write(doc, &buf, spdxjson.Indent("  ")); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// goPackage is a Go module, named by its path, with its purl.
func goPackage(id, path, version string) *spdx.Package {
	return &spdx.Package{PackageName: path, PackageVersion: version,
		PackageSPDXIdentifier: common.ElementID("Package-" + id), PackageDownloadLocation: "NOASSERTION",
		PackageExternalReferences: []*spdx.PackageExternalReference{{Category: "PACKAGE-MANAGER", RefType: "purl",
			Locator: "pkg:golang/" + strings.ToLower(path) + "@" + version}}}
}
