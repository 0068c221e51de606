// Command release pushes layercache's images for a release: for each
// image, one platform image per architecture from a root directory, an OCI
// image index of them pushed by digest (and tagged with the version), and
// an SPDX SBOM per platform image attached as an OCI referrer. It writes
// the pushed references to OUT/images.txt and the SBOMs to OUT/sbom/.
// hack/release.sh (make release) builds the root directories and calls it.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// semver is what a release's version must look like.
var semver = regexp.MustCompile(`^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$`)

// imageFlag is one --image: NAME=ARCH:ROOT:BINARY[,ARCH:ROOT:BINARY...].
type imageFlag struct {
	name      string
	platforms []platformFlag
}

type platformFlag struct{ arch, root, binary string }

type options struct {
	version, registry, out, created string
	insecure                        bool
	images                          []imageFlag
	debs                            []debianPackage
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if err == nil {
		err = run(o)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "release:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("release", flag.ContinueOnError)
	fs.StringVar(&o.version, "version", "", "the release's version, vMAJOR.MINOR.PATCH[-PRERELEASE]")
	fs.StringVar(&o.registry, "registry", "", "where to push: HOST[:PORT]/PREFIX (image NAME goes to PREFIX/NAME)")
	fs.StringVar(&o.out, "out", "dist/release", "where to write images.txt and the SBOMs")
	fs.StringVar(&o.created, "created", "1970-01-01T00:00:00Z", "the SBOMs' creation time (the source's commit time)")
	fs.BoolVar(&o.insecure, "insecure", false, "plain HTTP to the registry")
	fs.Func("image", "NAME=ARCH:ROOT:BINARY[,ARCH:ROOT:BINARY...] (repeatable)", func(v string) error {
		img, err := parseImage(v)
		if err == nil {
			o.images = append(o.images, img)
		}
		return err
	})
	fs.Func("deb", "NAME=VERSION: a Debian package (architecture all) the images carry (repeatable)", func(v string) error {
		n, ver, ok := strings.Cut(v, "=")
		if !ok || n == "" || ver == "" {
			return fmt.Errorf("--deb %q: want NAME=VERSION", v)
		}
		o.debs = append(o.debs, debianPackage{name: n, version: ver, arch: "all"})
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch {
	case !semver.MatchString(o.version):
		return nil, fmt.Errorf("--version %q: want vMAJOR.MINOR.PATCH[-PRERELEASE], for example v0.2.0", o.version)
	case o.registry == "" || !strings.Contains(o.registry, "/"):
		return nil, fmt.Errorf("--registry %q: want HOST[:PORT]/PREFIX, for example registry.example.com/layercache", o.registry)
	case len(o.images) == 0:
		return nil, errors.New("no --image given")
	}
	if _, err := name.NewRepository(o.registry+"/x", name.StrictValidation); err != nil {
		return nil, fmt.Errorf("--registry %q: %w", o.registry, err)
	}
	return o, nil
}

func parseImage(v string) (imageFlag, error) {
	n, list, ok := strings.Cut(v, "=")
	img := imageFlag{name: n}
	if !ok || n == "" {
		return img, fmt.Errorf("--image %q: want NAME=ARCH:ROOT:BINARY[,...]", v)
	}
	for _, p := range strings.Split(list, ",") {
		parts := strings.Split(p, ":")
		if len(parts) != 3 || parts[0] == "" {
			return img, fmt.Errorf("--image %q: platform %q: want ARCH:ROOT:BINARY", v, p)
		}
		if fi, err := os.Stat(parts[1]); err != nil || !fi.IsDir() {
			return img, fmt.Errorf("--image %q: root %q is not a directory", v, parts[1])
		}
		img.platforms = append(img.platforms, platformFlag{arch: parts[0], root: parts[1], binary: parts[2]})
	}
	return img, nil
}

func run(o *options) error {
	if err := os.MkdirAll(filepath.Join(o.out, "sbom"), 0o755); err != nil {
		return err
	}
	var lines []string
	for _, img := range o.images {
		ref, err := release(o, img)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.name, err)
		}
		lines = append(lines, img.name+" "+ref)
	}
	return os.WriteFile(filepath.Join(o.out, "images.txt"), []byte(strings.Join(lines, "\n")+"\n"), 0o644)
}

// keychain: the Docker configuration ($DOCKER_CONFIG/config.json), or
// anonymous.
var keychain = authn.DefaultKeychain
