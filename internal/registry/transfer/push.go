// Package transfer is the node side of registry sync: it pushes a
// generation of a node's store as an OCI image (zstd tars, overlay
// whiteouts as OCI whiteouts) and pulls an image, by its manifest's digest,
// into the store. Layers the registry has are not sent again; layers the
// node has are not fetched again.
package transfer

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
)

// Manifest annotations.
const (
	// AnnotationCommitted is when the generation's content was committed
	// (RFC 3339): pulled generations keep it, and it orders pushes.
	AnnotationCommitted = "io.layercache.committed"
	// AnnotationNode is the node that pushed it.
	AnnotationNode = "io.layercache.node"
	// LabelDigest, on a generation pulled from the registry, is its
	// manifest's digest.
	LabelDigest = "layercache.io/digest"
)

// Pushed says what a push did.
type Pushed struct {
	Digest, Tag string
	// Bytes is what was uploaded; Layers the generation's layers,
	// LayersSent those the registry did not have yet.
	Bytes              int64
	Layers, LayersSent int
}

// Push uploads generation g of cache k as an image: the layers the
// registry lacks (by digest), then the manifest, tagged with the
// generation's commit time. node is recorded in the manifest.
func Push(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, g engine.Generation, node string) (Pushed, error) {
	repo, err := c.Repository(registry.Cache(k))
	if err != nil {
		return Pushed{}, err
	}
	return PushTo(ctx, c, s, k, g, node, repo.Tag(commitTag(g.Committed().UTC())))
}

// PushTo is Push to tag, anywhere (the CLI's push).
func PushTo(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, g engine.Generation, node string, tag name.Tag) (Pushed, error) {
	if len(g.Layers) == 0 {
		return Pushed{}, fmt.Errorf("generation %d of %s has no layers", g.Number, k)
	}
	layers := make([]*storeLayer, len(g.Layers))
	adds := make([]mutate.Addendum, len(g.Layers))
	for i, id := range g.Layers {
		d, err := describe(s, k, id)
		if err != nil {
			return Pushed{}, fmt.Errorf("layer %s of %s: %w", id, k, err)
		}
		layers[i] = &storeLayer{store: s, key: k, id: id, desc: d, sent: new(atomic.Int64)}
		adds[i] = mutate.Addendum{Layer: layers[i], MediaType: layerMediaType}
	}
	committed := g.Committed().UTC()
	var err error
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.Append(img, adds...); err != nil {
		return Pushed{}, err
	}
	if img, err = mutate.CreatedAt(img, v1.Time{Time: committed}); err != nil {
		return Pushed{}, err
	}
	img = mutate.Annotations(img, map[string]string{
		AnnotationCommitted: committed.Format(time.RFC3339Nano), AnnotationNode: node,
	}).(v1.Image)
	digest, err := img.Digest()
	if err != nil {
		return Pushed{}, err
	}
	p := Pushed{Digest: digest.String(), Tag: tag.TagStr(), Layers: len(layers)}
	if err := remote.Write(tag, img, c.RemoteOptions(remote.WithContext(ctx))...); err != nil {
		return p, fmt.Errorf("pushing %s to %s: %w", k, tag.Context(), err)
	}
	for _, l := range layers {
		if n := l.sent.Load(); n > 0 {
			p.Bytes += n
			p.LayersSent++
		}
	}
	return p, nil
}

// commitTag is the tag of a generation committed at t: tags sort as the
// commits, for pruning.
func commitTag(t time.Time) string { return fmt.Sprintf("c%020d", t.UnixNano()) }
