package transfer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
)

// ErrCorrupt: what the registry sent does not match its digest.
var ErrCorrupt = errors.New("content does not match its digest")

// ErrTooLarge: the image is past a bound of a cache image, checked before
// anything is fetched past the manifest.
var ErrTooLarge = errors.New("image too large for a cache")

// Bounds of a cache image that a hostile registry could otherwise use to
// exhaust every agent that pulls or prefetches it. A cache's chain is
// compacted at 8 layers; the kernel mounts at most 500 lower layers.
const (
	MaxManifestBytes = 4 << 20
	MaxConfigBytes   = 4 << 20
	MaxLayers        = 64
)

// PullOptions bound a pull.
type PullOptions struct {
	// Import bounds each layer's extraction.
	Import engine.ImportOptions
	// Jobs is how many layers are fetched at once (zero: 4).
	Jobs int
}

// Pulled says what a pull did.
type Pulled struct {
	Generation engine.Generation
	// Bytes is what was downloaded; Layers the image's layers,
	// LayersFetched those the node did not have yet.
	Bytes                 int64
	Layers, LayersFetched int
}

// Pull brings the image with manifest digest of cache k down and makes it
// the cache's next generation: layers the cache already has (by digest)
// are reused, the others are fetched in parallel, each streamed through
// decompression into extraction and checked against its digest and diff
// ID. Nothing is published unless every layer checks out.
func Pull(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, digest string, opts PullOptions) (Pulled, error) {
	repo, err := c.Repository(registry.Cache(k))
	if err != nil {
		return Pulled{}, err
	}
	want, err := v1.NewHash(digest)
	if err != nil {
		return Pulled{}, fmt.Errorf("manifest digest %q: %w", digest, err)
	}
	return PullFrom(ctx, c, s, k, repo.Digest(want.String()), opts)
}

// PullFrom is Pull of the image ref names, anywhere (the CLI's pull): a
// tag is resolved to its manifest's digest first.
func PullFrom(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, ref name.Reference, opts PullOptions) (Pulled, error) {
	d, ok := ref.(name.Digest)
	if !ok {
		desc, err := remote.Head(ref, c.RemoteOptions(remote.WithContext(ctx))...)
		if err != nil {
			return Pulled{}, fmt.Errorf("resolving %s: %w", ref, err)
		}
		d = ref.Context().Digest(desc.Digest.String())
	}
	res, err := pull(ctx, c, s, k, d, opts)
	if errors.Is(err, engine.ErrLayerGone) {
		// A layer found on the node was collected before the import was
		// published: once more, fetching it.
		return pull(ctx, c, s, k, d, opts)
	}
	return res, err
}

func pull(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, ref name.Digest, opts PullOptions) (Pulled, error) {
	repo := ref.Context()
	want, err := v1.NewHash(ref.DigestStr())
	if err != nil {
		return Pulled{}, fmt.Errorf("manifest digest %q: %w", ref.DigestStr(), err)
	}
	m, cfg, committed, err := fetchManifest(ctx, c, ref, want, opts.Import.MaxBytes)
	if err != nil {
		return Pulled{}, err
	}
	res := Pulled{Layers: len(m.Layers)}
	staged := make([]*engine.StagedLayer, len(m.Layers))
	defer func() {
		for _, l := range staged {
			l.Discard(s) // a no-op for published or reused layers
		}
	}()
	if err := fetchLayers(ctx, c, s, k, repo, m, cfg, opts, staged, &res); err != nil {
		return res, fmt.Errorf("pulling %s: %w", ref, err)
	}
	g, err := s.PublishLayers(k, staged, engine.PublishOptions{
		Labels: map[string]string{LabelDigest: want.String()}, ContentTime: committed,
	})
	if err != nil {
		return res, err
	}
	res.Generation = g
	return res, nil
}

// fetchManifest fetches the manifest and config of ref and checks them
// against want and the config's digest; it returns them with the
// generation's commit time.
func fetchManifest(ctx context.Context, c *registry.Client, ref name.Digest, want v1.Hash, maxBytes int64) (*v1.Manifest, *v1.ConfigFile, time.Time, error) {
	img, err := remote.Image(ref, c.RemoteOptions(remote.WithContext(ctx))...)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("fetching %s: %w", ref, err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("fetching %s: %w", ref, err)
	}
	if got := sha(raw); got != want.String() {
		return nil, nil, time.Time{}, fmt.Errorf("manifest %s: got %s: %w", ref, got, ErrCorrupt)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	if err := checkBounds(len(raw), m, maxBytes); err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("%s: %w", ref, err)
	}
	rawConfig, err := img.RawConfigFile()
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("fetching the config of %s: %w", ref, err)
	}
	if got := sha(rawConfig); got != m.Config.Digest.String() {
		return nil, nil, time.Time{}, fmt.Errorf("config of %s: got %s: %w", ref, got, ErrCorrupt)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) || len(m.Layers) == 0 {
		return nil, nil, time.Time{}, fmt.Errorf("%s: %d layers and %d diff IDs: not a cache image", ref, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	committed := cfg.Created.Time
	if t, err := time.Parse(time.RFC3339Nano, m.Annotations[AnnotationCommitted]); err == nil {
		committed = t
	}
	return m, cfg, committed, nil
}

// checkBounds bounds the manifest, the config (before it is fetched: the
// fetch stops at its descriptor's size), the layer count and the blobs'
// total size.
func checkBounds(manifestBytes int, m *v1.Manifest, maxBytes int64) error {
	switch {
	case manifestBytes > MaxManifestBytes:
		return fmt.Errorf("manifest of %d bytes, more than %d: %w", manifestBytes, MaxManifestBytes, ErrTooLarge)
	case m.Config.Size > MaxConfigBytes || m.Config.Size < 0:
		return fmt.Errorf("config of %d bytes, more than %d: %w", m.Config.Size, MaxConfigBytes, ErrTooLarge)
	case len(m.Layers) > MaxLayers:
		return fmt.Errorf("%d layers, more than %d: %w", len(m.Layers), MaxLayers, ErrTooLarge)
	}
	return checkTotal(m, maxBytes)
}

// checkTotal bounds the whole image's blobs by the cache's size (each
// layer's extraction is bounded by it too); compression gets an eighth
// of slack.
func checkTotal(m *v1.Manifest, maxBytes int64) error {
	if maxBytes <= 0 {
		return nil
	}
	var total int64
	for _, l := range m.Layers {
		if l.Size < 0 {
			return fmt.Errorf("layer %s of size %d: %w", l.Digest, l.Size, ErrCorrupt)
		}
		total += l.Size
	}
	if limit := maxBytes + maxBytes/8; total > limit {
		return fmt.Errorf("layers of %d bytes in all, more than the cache's bound %d: %w", total, limit, ErrTooLarge)
	}
	return nil
}

// fetchLayers fills staged with the image's layers: those cache k has (by
// digest) reused, the others fetched, opts.Jobs at a time, each carrying
// its checked digests for the engine to record when it publishes them.
// The first failure cancels the others.
func fetchLayers(ctx context.Context, c *registry.Client, s *engine.Store, k engine.Key, repo name.Repository, m *v1.Manifest, cfg *v1.ConfigFile,
	opts PullOptions, staged []*engine.StagedLayer, res *Pulled) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := opts.Jobs
	if jobs <= 0 {
		jobs = 4
	}
	sem := make(chan struct{}, jobs)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, desc := range m.Layers {
		if id, ok, err := s.LayerWithDigest(k, desc.Digest.String()); err != nil {
			return err
		} else if ok {
			staged[i] = engine.Reuse(id)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
				defer func() { <-sem }()
			case <-ctx.Done():
				return
			}
			l, n, err := fetchLayer(ctx, c, s, repo, desc, cfg.RootFS.DiffIDs[i], opts.Import)
			mu.Lock()
			defer mu.Unlock()
			res.Bytes += n
			if err != nil {
				cancel(fmt.Errorf("layer %s: %w", desc.Digest, err))
				return
			}
			l.Digest = &engine.LayerDigest{Digest: desc.Digest.String(), DiffID: cfg.RootFS.DiffIDs[i].String(), Size: desc.Size, MediaType: string(desc.MediaType)}
			staged[i] = l
			res.LayersFetched++
		}()
	}
	wg.Wait()
	return context.Cause(ctx)
}

// fetchLayer stages one blob on the store's disk, hashing it as it comes,
// and extracts it only once its digest and size are the descriptor's: a
// registry that serves something else gets nothing of it extracted. The
// uncompressed stream is hashed during extraction, and the layer is kept
// only if it is the config's diff ID.
func fetchLayer(ctx context.Context, c *registry.Client, s *engine.Store, repo name.Repository, desc v1.Descriptor, diffID v1.Hash, opts engine.ImportOptions) (*engine.StagedLayer, int64, error) {
	f, done, n, err := stageBlob(ctx, c, s, repo, desc)
	if err != nil {
		return nil, n, err
	}
	defer done()
	var tarball io.Reader
	src := bufio.NewReaderSize(f, 1<<20)
	switch desc.MediaType {
	case types.OCILayerZStd:
		z, err := zstd.NewReader(src, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, n, err
		}
		defer z.Close()
		tarball = z
	case types.OCILayer, types.DockerLayer:
		z, err := gzip.NewReader(src)
		if err != nil {
			return nil, n, fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		defer z.Close()
		tarball = z
	default: // types.OCIUncompressedLayer: stageBlob refused the others
		tarball = src
	}
	diff := &hashingReader{r: tarball, h: sha256.New()}
	l, err := s.ImportLayer(diff, opts)
	if err == nil {
		// The tar's end may come before the stream's: read the rest, so
		// that the hash covers everything.
		_, err = io.Copy(io.Discard, diff)
	}
	if err == nil && diff.digest() != diffID.String() {
		err = fmt.Errorf("uncompressed: got %s, want %s: %w", diff.digest(), diffID, ErrCorrupt)
	}
	if err != nil {
		l.Discard(s)
		return nil, n, err
	}
	return l, n, nil
}

// stageBlob fetches desc's blob into a staging file of the store, reading
// no more than the descriptor's size (and one byte, to see a longer one),
// and returns it rewound once its digest and size are the descriptor's.
func stageBlob(ctx context.Context, c *registry.Client, s *engine.Store, repo name.Repository, desc v1.Descriptor) (*os.File, func(), int64, error) {
	switch desc.MediaType {
	case types.OCILayerZStd, types.OCILayer, types.DockerLayer, types.OCIUncompressedLayer:
	default:
		return nil, nil, 0, fmt.Errorf("media type %q: not a layer this can read", desc.MediaType)
	}
	layer, err := remote.Layer(repo.Digest(desc.Digest.String()), c.RemoteOptions(remote.WithContext(ctx))...)
	if err != nil {
		return nil, nil, 0, err
	}
	body, err := layer.Compressed()
	if err != nil {
		return nil, nil, 0, err
	}
	defer body.Close()
	f, done, err := s.StageFile("blob")
	if err != nil {
		return nil, nil, 0, err
	}
	blob := &hashingReader{r: io.LimitReader(body, desc.Size+1), h: sha256.New()}
	staged := &recordingWriter{w: f}
	_, readErr := io.Copy(staged, blob)
	switch {
	case ctx.Err() != nil:
		err = context.Cause(ctx)
	case staged.err != nil:
		// The node's disk (full, say), not the registry's blob.
		err = fmt.Errorf("staging blob %s: %w", desc.Digest, staged.err)
	case blob.digest() != desc.Digest.String() || blob.n != desc.Size:
		// Whatever the error (go-containerregistry's own check fails at
		// the end of a wrong blob), the blob is not the one named.
		err = fmt.Errorf("blob: got %s (%d bytes), want %s (%d bytes): %w", blob.digest(), blob.n, desc.Digest, desc.Size, ErrCorrupt)
		if readErr != nil {
			err = fmt.Errorf("%w (reading: %v)", err, readErr)
		}
	default:
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		done()
		return nil, nil, blob.n, err
	}
	return f, done, blob.n, nil
}

// recordingWriter remembers its writer's error, to tell it from a read's.
type recordingWriter struct {
	w   io.Writer
	err error
}

func (r *recordingWriter) Write(p []byte) (int, error) {
	n, err := r.w.Write(p)
	if err != nil {
		r.err = err
	}
	return n, err
}

type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (r *hashingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.h.Write(p[:n])
	r.n += int64(n)
	return n, err
}

func (r *hashingReader) digest() string { return "sha256:" + hex.EncodeToString(r.h.Sum(nil)) }

func sha(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
