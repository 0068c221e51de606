package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// sbomType is the artifact type of an SPDX document attached to an image.
const sbomType = "application/spdx+json"

// release builds img's platform images and index, pushes them by digest,
// tags the index with the version, and attaches each platform's SBOM. It
// returns the index's reference by digest.
func release(o *options, img imageFlag) (string, error) {
	repo, err := name.NewRepository(o.registry+"/"+img.name, nameOpts(o)...)
	if err != nil {
		return "", err
	}
	ropts := []remote.Option{remote.WithAuthFromKeychain(keychain), remote.WithReferrersTagFallback(true)}
	var entries []platformEntry
	for _, p := range img.platforms {
		pi, err := platformImage(p.root, p.arch, []string{"/" + img.name})
		if err != nil {
			return "", fmt.Errorf("linux/%s: %w", p.arch, err)
		}
		entries = append(entries, platformEntry{arch: p.arch, image: pi})
	}
	idx := index(entries)
	d, err := idx.Digest()
	if err != nil {
		return "", err
	}
	if err := remote.WriteIndex(repo.Digest(d.String()), idx, ropts...); err != nil {
		return "", err
	}
	if err := remote.Tag(repo.Tag(o.version), idx, ropts...); err != nil {
		return "", err
	}
	for i, p := range img.platforms {
		doc, err := sbom(img.name, o.version, p.arch, p.binary, o.created, o.debs)
		if err != nil {
			return "", err
		}
		file := filepath.Join(o.out, "sbom", fmt.Sprintf("%s-linux-%s.spdx.json", img.name, p.arch))
		if err := os.WriteFile(file, doc, 0o644); err != nil {
			return "", err
		}
		if err := attach(repo, entries[i].image, doc, ropts); err != nil {
			return "", fmt.Errorf("attaching the SBOM of linux/%s: %w", p.arch, err)
		}
	}
	var archs []string
	for _, p := range img.platforms {
		archs = append(archs, p.arch)
	}
	lines, err := inspect(repo.Digest(d.String()), archs, ropts)
	if err != nil {
		return "", err
	}
	fmt.Printf("pushed %s\n  %s\n", repo.Digest(d.String()), strings.Join(lines, "\n  "))
	return repo.Digest(d.String()).String(), nil
}

func nameOpts(o *options) []name.Option {
	if o.insecure {
		return []name.Option{name.Insecure}
	}
	return nil
}

// attach pushes doc as an artifact whose subject is subject: what `oras
// discover` or the referrers API lists for the image.
func attach(repo name.Repository, subject v1.Image, doc []byte, ropts []remote.Option) error {
	sd, err := partial.Descriptor(subject)
	if err != nil {
		return err
	}
	layer := static.NewLayer(doc, sbomType)
	for _, l := range []v1.Layer{emptyConfig, layer} {
		if err := remote.WriteLayer(repo, l, ropts...); err != nil {
			return err
		}
	}
	ld, err := partial.Descriptor(layer)
	if err != nil {
		return err
	}
	cd, err := partial.Descriptor(emptyConfig)
	if err != nil {
		return err
	}
	m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, ArtifactType: sbomType,
		Config: *cd, Layers: []v1.Descriptor{*ld}, Subject: sd}
	raw, err := json.Marshal(m)
	if err != nil {
		return err
	}
	h, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return err
	}
	return remote.Put(repo.Digest(h.String()), rawManifest{raw: raw, mt: types.OCIManifestSchema1}, ropts...)
}

// rawManifest is a manifest already serialised, for remote.Put.
type rawManifest struct {
	raw []byte
	mt  types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.raw, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }
