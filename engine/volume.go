package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Volume is a private view of a cache: the layers of the generation that
// was the head when the volume was created, plus its own upper dir.
type Volume struct {
	ID    string `json:"id"`
	Cache Key    `json:"cache"`
	// Generation and Layers are the snapshot the volume started from
	// (generation 0 and no layers for a cache with no commit yet).
	Generation int64    `json:"generation"`
	Layers     []string `json:"layers"`
	// From, if set, is the fallback cache the snapshot is of (Cache had
	// nothing): Generation and Layers are From's. A commit still goes to
	// Cache, which then gets its own copy of the base (hard links).
	From *Key `json:"from,omitempty"`
	// BaseLayer is set while the commit of a volume started from a
	// fallback is under way: the layer of Cache that holds From's layers
	// merged.
	BaseLayer string `json:"baseLayer,omitempty"`
	// Writable volumes may be committed.
	Writable bool              `json:"writable"`
	Created  time.Time         `json:"created"`
	Labels   map[string]string `json:"labels,omitempty"`
	// CommitLayer is set while a commit is under way: the layer ID the
	// upper dir is renamed to. A commit interrupted by a crash is finished
	// by the next Commit of the same volume.
	CommitLayer string `json:"commitLayer,omitempty"`
	// NoCommit, if set, says why the volume's writes must never be
	// committed (for example: it outgrew its size).
	NoCommit string `json:"noCommit,omitempty"`
	// Setuid volumes are mounted without nosuid (still nodev).
	Setuid bool `json:"setuid,omitempty"`
}

// VolumeOptions parameterise CreateVolume.
type VolumeOptions struct {
	Writable bool
	// Labels are stored with the volume and copied into the generation
	// its commit creates (for example the pod that wrote it).
	Labels map[string]string
	// From lists fallback caches: when the cache has no generation, the
	// volume starts from the head of the first of them that has one.
	// Reading them never writes them: a commit goes to the volume's cache.
	From []Key
	// Setuid mounts the volume without nosuid: setuid binaries in its
	// layers run with their owner's rights.
	Setuid bool
}

// LayersOf is the cache whose layers the volume's snapshot lists: From
// for a volume started from a fallback, else Cache.
func (v *Volume) LayersOf() Key {
	if v.From != nil {
		return *v.From
	}
	return v.Cache
}

func (s *Store) upperDir(id string) string { return filepath.Join(s.volumeDir(id), "upper") }
func (s *Store) workDir(id string) string  { return filepath.Join(s.volumeDir(id), "work") }

// CreateVolume creates volume id on cache k from the cache's current head,
// or, when k has no generation, from the head of the first cache of
// opts.From that has one. Creating a volume that exists on the same cache
// returns it unchanged.
func (s *Store) CreateVolume(id string, k Key, opts VolumeOptions) (*Volume, error) {
	if err := ValidateVolumeID(id); err != nil {
		return nil, err
	}
	if err := k.Validate(); err != nil {
		return nil, err
	}
	for _, f := range opts.From {
		if f == k {
			continue
		}
		if err := f.Validate(); err != nil {
			return nil, fmt.Errorf("fallback cache: %w", err)
		}
		if v, err := s.createVolume(id, k, &f, opts); v != nil || err != nil {
			return v, err
		}
	}
	return s.createVolume(id, k, nil, opts)
}

// createVolume creates volume id on k from k's head, or, with from, from
// from's head if k has none (nil, nil if from has none either). Both caches
// are locked meanwhile (in a fixed order), so that neither a commit nor GC
// moves them underneath.
func (s *Store) createVolume(id string, k Key, from *Key, opts VolumeOptions) (*Volume, error) {
	keys := []Key{k}
	if from != nil {
		keys = append(keys, *from)
		slices.SortFunc(keys, func(a, b Key) int { return strings.Compare(a.String(), b.String()) })
	}
	for _, key := range keys {
		lock, err := s.lockCache(key)
		if err != nil {
			return nil, err
		}
		defer lock.unlock()
	}

	if v, err := s.Volume(id); err == nil {
		if v.Cache != k {
			return nil, fmt.Errorf("volume %s exists on cache %s, not %s: %w", id, v.Cache, k, ErrConflict)
		}
		return v, nil
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}

	g, _, err := s.head(k)
	if err != nil {
		return nil, err
	}
	if from != nil {
		if len(g.Layers) > 0 {
			from = nil // k has content of its own meanwhile
		} else if g, _, err = s.head(*from); err != nil {
			return nil, err
		} else if len(g.Layers) == 0 {
			return nil, nil
		}
	}
	v := &Volume{
		ID: id, Cache: k, Generation: g.Number, Layers: g.Layers, From: from,
		Writable: opts.Writable, Setuid: opts.Setuid, Created: time.Now().UTC(), Labels: opts.Labels,
	}
	if v.Layers == nil {
		v.Layers = []string{}
	}
	if err := s.writeVolume(v); err != nil {
		return nil, err
	}
	if v.Generation > 0 {
		s.touchLastUsed(v.LayersOf())
	}
	return v, nil
}

// writeVolume creates volume v's directory (its metadata, upper and work
// dirs) in the temporary area and renames it into place: a crash leaves
// the whole volume or none of it.
func (s *Store) writeVolume(v *Volume) error {
	t, err := s.newTempDir("volume")
	if err != nil {
		return err
	}
	defer t.release()
	for _, d := range []string{"upper", "work"} {
		if err := os.Mkdir(filepath.Join(t.path, d), 0o755); err != nil {
			return fmt.Errorf("creating volume %s: %w", v.ID, err)
		}
	}
	if err := writeJSONAtomic(t.path, fileVolume, v); err != nil {
		return fmt.Errorf("creating volume %s: %w", v.ID, err)
	}
	failpoint("volume/prepared")
	if err := os.Rename(t.path, s.volumeDir(v.ID)); err != nil {
		return fmt.Errorf("creating volume %s: %w", v.ID, err)
	}
	failpoint("volume/published")
	return syncDir(filepath.Join(s.root, dirVolumes))
}

// lockVolume reads volume id and locks its cache, reading the volume again
// under the lock (a commit or a discard may have changed it meanwhile). The
// caller unlocks.
func (s *Store) lockVolume(id string) (*Volume, *flock, error) {
	v, err := s.Volume(id)
	if err != nil {
		return nil, nil, err
	}
	lock, err := s.lockCache(v.Cache)
	if err != nil {
		return nil, nil, err
	}
	if v, err = s.Volume(id); err != nil {
		lock.unlock()
		return nil, nil, err
	}
	return v, lock, nil
}

// Volume reads volume id.
func (s *Store) Volume(id string) (*Volume, error) {
	if err := ValidateVolumeID(id); err != nil {
		return nil, err
	}
	var v Volume
	err := readJSON(filepath.Join(s.volumeDir(id), fileVolume), &v)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	if v.ID != id {
		return nil, fmt.Errorf("volume %s: metadata names volume %q", id, v.ID)
	}
	if err := v.Cache.Validate(); err != nil {
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	for _, l := range append(slices.Clone(v.Layers), v.CommitLayer) {
		if l == "" {
			continue
		}
		if err := validateLayerID(l); err != nil {
			return nil, fmt.Errorf("volume %s: %w", id, err)
		}
	}
	return &v, nil
}

// Volumes lists the volumes in the store.
func (s *Store) Volumes() ([]*Volume, error) {
	entries, err := os.ReadDir(filepath.Join(s.root, dirVolumes))
	if err != nil {
		return nil, fmt.Errorf("listing volumes: %w", err)
	}
	var out []*Volume
	for _, e := range entries {
		if ValidateVolumeID(e.Name()) != nil {
			continue
		}
		v, err := s.Volume(e.Name())
		if errors.Is(err, ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// MountPoints returns where volume id is mounted (from mountinfo).
func (s *Store) MountPoints(id string) ([]string, error) {
	if err := ValidateVolumeID(id); err != nil {
		return nil, err
	}
	mounts, err := readMountInfo()
	if err != nil {
		return nil, err
	}
	upper := s.upperDir(id)
	var out []string
	for _, m := range mounts {
		if m.FSType == "overlay" && m.Upper == upper {
			out = append(out, m.MountPoint)
		}
	}
	return out, nil
}

// VolumeAt returns the ID of the store's volume mounted at target.
func (s *Store) VolumeAt(target string) (string, error) {
	mounts, err := readMountInfo()
	if err != nil {
		return "", err
	}
	volumes := filepath.Join(s.root, dirVolumes) + "/"
	for _, m := range mounts {
		if m.MountPoint != target || m.FSType != "overlay" {
			continue
		}
		rel, ok := strings.CutPrefix(m.Upper, volumes)
		if !ok {
			continue
		}
		id, rest, _ := strings.Cut(rel, "/")
		if rest == "upper" && ValidateVolumeID(id) == nil {
			return id, nil
		}
	}
	return "", fmt.Errorf("no layercache volume of %s is mounted at %s: %w", s.root, target, ErrNotFound)
}

// Mount mounts volume id at target (created if missing). Mounting a volume
// where it is already mounted does nothing.
func (s *Store) Mount(id, target string) error {
	if !filepath.IsAbs(target) {
		return fmt.Errorf("mount target %q: must be an absolute path", target)
	}
	target = filepath.Clean(target)
	v, lock, err := s.lockVolume(id)
	if err != nil {
		return err
	}
	defer lock.unlock()
	if v.CommitLayer != "" {
		return fmt.Errorf("volume %s is being committed: %w", id, ErrConflict)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fmt.Errorf("creating mount target: %w", err)
	}
	if real, err := filepath.EvalSymlinks(target); err == nil {
		target = real
	}
	points, err := s.MountPoints(id)
	if err != nil {
		return err
	}
	if slices.Contains(points, target) {
		return nil
	}
	lowers := make([]string, 0, len(v.Layers)+1)
	for i := len(v.Layers) - 1; i >= 0; i-- {
		lower, err := s.readyLayer(v.LayersOf(), v.Layers[i])
		if err != nil {
			return err
		}
		lowers = append(lowers, lower)
	}
	if len(lowers) == 0 {
		lowers = append(lowers, filepath.Join(s.root, dirEmpty))
	}
	return mountOverlay(lowers, s.upperDir(id), s.workDir(id), target, v.Setuid)
}

// StopWrites makes volume id read-only wherever it is mounted (for a
// volume over its bound whose pod cannot be stopped): its pods' writes
// fail with EROFS from then on. It does nothing to a volume not mounted.
func (s *Store) StopWrites(id string) error {
	points, err := s.MountPoints(id)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range points {
		errs = append(errs, makeReadOnly(p))
	}
	return errors.Join(errs...)
}

// Unmount unmounts volume id from everywhere it is mounted.
func (s *Store) Unmount(id string) error {
	points, err := s.MountPoints(id)
	if err != nil {
		return err
	}
	for _, p := range points {
		if err := unmount(p); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) ensureUnmounted(id string) error {
	points, err := s.MountPoints(id)
	if err != nil {
		return err
	}
	if len(points) > 0 {
		return fmt.Errorf("volume %s is mounted at %s: %w", id, points[0], ErrMounted)
	}
	return nil
}

// Discard removes volume id without committing it. It must be unmounted.
// Discarding a volume that does not exist is not an error.
func (s *Store) Discard(id string) error {
	v, err := s.Volume(id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var bin trashBin
	defer bin.empty(s)
	lock, err := s.lockCache(v.Cache)
	if err != nil {
		return err
	}
	defer lock.unlock()
	if err := s.ensureUnmounted(id); err != nil {
		return err
	}
	return bin.trash(s, s.volumeDir(id))
}

// CommitResult says what a commit did.
type CommitResult struct {
	// Committed is false when the volume had nothing to commit (its upper
	// dir was empty); the volume is removed either way.
	Committed  bool   `json:"committed"`
	Generation int64  `json:"generation,omitempty"`
	Layer      string `json:"layer,omitempty"`
	// ID is the new generation's identity (see Generation.ID).
	ID string `json:"id,omitempty"`
	// ChainLength is the number of layers in the new head.
	ChainLength int `json:"chainLength,omitempty"`
}

// ForbidCommit marks volume id so that its writes are never committed,
// saying why. It may be mounted.
func (s *Store) ForbidCommit(id, why string) error {
	v, lock, err := s.lockVolume(id)
	if err != nil {
		return err
	}
	defer lock.unlock()
	if v.CommitLayer != "" {
		return fmt.Errorf("volume %s is being committed: %w", id, ErrConflict)
	}
	if v.NoCommit != "" {
		return nil
	}
	v.NoCommit = why
	return writeJSONAtomic(s.volumeDir(id), fileVolume, v)
}

// CommitOptions bound a commit.
type CommitOptions struct {
	// MaxBytes, if positive, is the largest the cache's new generation
	// (its layers, shared files counted once) may be; a larger commit
	// fails with a *SizeError and leaves the volume as it was.
	MaxBytes int64
}

// SizeError says that a commit would make the cache too large. It
// matches ErrTooLarge.
type SizeError struct {
	Bytes, MaxBytes int64
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("the cache would be %d bytes, more than its %d", e.Bytes, e.MaxBytes)
}

// Is makes errors.Is(err, ErrTooLarge) true.
func (e *SizeError) Is(target error) bool { return target == ErrTooLarge }

// Commit commits volume id with no bound: see CommitWith.
func (s *Store) Commit(id string) (CommitResult, error) {
	return s.CommitWith(id, CommitOptions{})
}

// CommitWith makes volume id's upper layer the cache's next generation:
// the volume's base layers plus the upper dir, renamed into the cache. The
// head moves atomically and the last writer wins. The volume must be
// writable, not forbidden to commit, and unmounted; it is removed on
// success. Committing a volume that a crash interrupted finishes that
// commit.
func (s *Store) CommitWith(id string, opts CommitOptions) (CommitResult, error) {
	var bin trashBin
	defer bin.empty(s)
	v, lock, err := s.lockVolume(id)
	if err != nil {
		return CommitResult{}, err
	}
	defer lock.unlock()
	if !v.Writable {
		return CommitResult{}, fmt.Errorf("committing volume %s: %w", id, ErrNotWritable)
	}
	if err := s.ensureUnmounted(id); err != nil {
		return CommitResult{}, err
	}
	if v.NoCommit != "" && v.CommitLayer == "" {
		return CommitResult{}, fmt.Errorf("committing volume %s: %s: %w", id, v.NoCommit, ErrNotWritable)
	}
	failpoint("commit/locked")

	layer := v.CommitLayer
	if layer == "" {
		var empty bool
		if layer, empty, err = s.recordCommitIntent(v, opts, &bin); err != nil || empty {
			return CommitResult{}, err
		}
	}
	if err := s.placeCommitLayer(v, layer); err != nil {
		return CommitResult{}, fmt.Errorf("committing volume %s: %w", id, err)
	}
	base := slices.Clone(v.Layers)
	if v.From != nil && len(base) > 0 {
		adopted, err := s.adoptBase(v)
		if err != nil {
			return CommitResult{}, fmt.Errorf("committing volume %s: copying the base of fallback cache %s: %w", id, *v.From, err)
		}
		base = []string{adopted}
	}
	failpoint("commit/base-ready")
	g, err := s.publishCommit(v, append(base, layer))
	if err != nil {
		return CommitResult{}, fmt.Errorf("committing volume %s: %w", id, err)
	}
	failpoint("commit/published")
	if err := bin.trash(s, s.volumeDir(id)); err != nil {
		return CommitResult{}, err
	}
	return CommitResult{Committed: true, Generation: g.Number, Layer: layer, ID: g.ID(), ChainLength: len(g.Layers)}, nil
}

// recordCommitIntent makes v's upper dir durable, checks its size, and
// records the layer ID it will be renamed to (a crash after the rename is
// then finished by the next Commit instead of losing the upper dir). An
// empty upper dir commits nothing: the volume is removed, empty is true.
func (s *Store) recordCommitIntent(v *Volume, opts CommitOptions, bin *trashBin) (layer string, empty bool, err error) {
	upper, err := openRoot(s.upperDir(v.ID))
	if err != nil {
		return "", false, fmt.Errorf("committing volume %s: %w", v.ID, err)
	}
	empty, err = upper.isEmpty()
	if err == nil {
		// Make the layer's content durable before anything points at it.
		err = upper.syncfs()
	}
	upper.Close()
	if err != nil {
		return "", false, fmt.Errorf("committing volume %s: %w", v.ID, err)
	}
	if empty {
		return "", true, bin.trash(s, s.volumeDir(v.ID))
	}
	if opts.MaxBytes > 0 {
		if err := s.checkCommitSize(v, opts.MaxBytes); err != nil {
			return "", false, err
		}
	}
	failpoint("commit/synced")
	v.CommitLayer = randomID()
	if err := writeJSONAtomic(s.volumeDir(v.ID), fileVolume, v); err != nil {
		return "", false, fmt.Errorf("committing volume %s: %w", v.ID, err)
	}
	failpoint("commit/intent-recorded")
	return v.CommitLayer, false, nil
}

// placeCommitLayer renames v's upper dir to layer of its cache (done
// already, after a crash) and makes the rename durable.
func (s *Store) placeCommitLayer(v *Volume, layer string) error {
	if err := s.ensureCacheDirs(v.Cache); err != nil {
		return err
	}
	failpoint("commit/cache-ready")
	dst := s.layerPath(v.Cache, layer)
	if err := os.Rename(s.upperDir(v.ID), dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	failpoint("commit/layer-renamed")
	if _, err := os.Stat(dst); err != nil {
		return fmt.Errorf("layer %s is missing: %w", layer, err)
	}
	if err := syncDir(filepath.Dir(dst)); err != nil {
		return err
	}
	if err := syncDir(s.volumeDir(v.ID)); err != nil {
		return err
	}
	failpoint("commit/layer-durable")
	return nil
}

// publishCommit publishes the generation of v's commit (layers, the
// committed one on top) as its cache's head: the head moves atomically and
// the last writer wins. After a crash that came once the generation was
// written, it finds that generation and publishes it if the head is older.
func (s *Store) publishCommit(v *Volume, layers []string) (Generation, error) {
	top := layers[len(layers)-1]
	head, _, err := s.head(v.Cache)
	if err != nil {
		return Generation{}, err
	}
	if published, err := s.generationWithLayer(v.Cache, top); err != nil {
		return Generation{}, err
	} else if published != nil {
		if head.Number < published.Number {
			return *published, s.publish(v.Cache, *published)
		}
		return *published, nil
	}
	g := Generation{
		Layers:  layers,
		Created: time.Now().UTC(), Source: "commit", Volume: v.ID, Labels: v.Labels, Identity: top,
	}
	if g.Number, err = s.nextGeneration(v.Cache); err != nil {
		return Generation{}, err
	}
	return g, s.publish(v.Cache, g)
}

// adoptBase gives v's cache its own copy of the fallback layers v started
// from, merged into one layer of hard links (as compaction does: one link
// per file, not a copy of the bytes), and returns its ID. The layer's ID is
// recorded in the volume first, so that a commit finished after a crash
// reuses a merge that completed. The caller holds v.Cache's lock; v keeps
// the fallback's layers from GC until it is removed.
func (s *Store) adoptBase(v *Volume) (string, error) {
	if v.BaseLayer == "" {
		v.BaseLayer = randomID()
		if err := writeJSONAtomic(s.volumeDir(v.ID), fileVolume, v); err != nil {
			return "", err
		}
	}
	dst := s.layerPath(v.Cache, v.BaseLayer)
	if _, err := os.Lstat(dst); err == nil {
		return v.BaseLayer, nil
	}
	t, err := s.newTempDir("adopt")
	if err != nil {
		return "", err
	}
	defer t.done(s)
	if err := s.mergeLayers(*v.From, v.Layers, t.path, false); err != nil {
		return "", err
	}
	failpoint("commit/base-merged")
	if err := os.Rename(filepath.Join(t.path, "layer"), dst); err != nil {
		return "", err
	}
	return v.BaseLayer, syncDir(filepath.Dir(dst))
}

// checkCommitSize measures what the generation committing v would hold:
// v's base layers and its upper dir, files shared between layers counted
// once.
func (s *Store) checkCommitSize(v *Volume, maxBytes int64) error {
	root, err := openRoot(s.root)
	if err != nil {
		return err
	}
	defer root.Close()
	total := newCounter()
	upper := filepath.Join(dirVolumes, v.ID, "upper")
	d, err := root.openBeneath(upper)
	if err != nil {
		return fmt.Errorf("measuring %s: %w", upper, err)
	}
	err = measure(d, total)
	d.Close()
	if err != nil {
		return fmt.Errorf("measuring %s: %w", upper, err)
	}
	for _, l := range v.Layers {
		if err := s.measureLayer(root, v.LayersOf(), l, total); err != nil {
			return fmt.Errorf("measuring layer %s: %w", l, err)
		}
	}
	if total.bytes > maxBytes {
		return fmt.Errorf("committing volume %s: %w", v.ID, &SizeError{Bytes: total.bytes, MaxBytes: maxBytes})
	}
	return nil
}
