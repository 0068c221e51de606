package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// inspect reads an image index back from the registry, as `crane
// manifest` or `docker manifest inspect` would, and returns one line per
// platform: its digest and the SBOMs that the registry lists as its
// referrers. It fails unless every architecture in want is there, each
// with an SBOM: what was pushed is what a node pulls.
func inspect(ref name.Digest, want []string, ropts []remote.Option) ([]string, error) {
	idx, err := remote.Index(ref, ropts...)
	if err != nil {
		return nil, fmt.Errorf("reading back %s: %w", ref, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("reading back %s: %w", ref, err)
	}
	var lines, have []string
	for _, d := range m.Manifests {
		if d.Platform == nil {
			return nil, fmt.Errorf("%s: manifest %s has no platform", ref, d.Digest)
		}
		sboms, err := referrers(ref.Context().Digest(d.Digest.String()), ropts)
		if err != nil {
			return nil, err
		}
		if len(sboms) == 0 {
			return nil, fmt.Errorf("%s: %s (%s) has no SBOM among its referrers", ref, d.Platform, d.Digest)
		}
		have = append(have, d.Platform.Architecture)
		lines = append(lines, fmt.Sprintf("%s %s sbom %s", d.Platform, d.Digest, strings.Join(sboms, ",")))
	}
	for _, arch := range want {
		if !slices.Contains(have, arch) {
			return nil, fmt.Errorf("%s: no linux/%s manifest (the registry has %v)", ref, arch, have)
		}
	}
	return lines, nil
}

// referrers lists the digests of the SPDX documents that refer to d.
func referrers(d name.Digest, ropts []remote.Option) ([]string, error) {
	idx, err := remote.Referrers(d, append(ropts, remote.WithFilter("artifactType", sbomType))...)
	if err != nil {
		return nil, fmt.Errorf("the referrers of %s: %w", d, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("the referrers of %s: %w", d, err)
	}
	var out []string
	for _, r := range m.Manifests {
		if r.ArtifactType == sbomType {
			out = append(out, r.Digest.String())
		}
	}
	return out, nil
}
