package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// DefaultRoot is where the node agent and the CLI keep their store.
const DefaultRoot = "/var/lib/layercache"

// DefaultCompactThreshold is the chain length at which a cache is compacted.
const DefaultCompactThreshold = 8

const (
	dirCaches      = "caches"
	dirVolumes     = "volumes"
	dirLocks       = "locks"
	dirTmp         = "tmp"
	dirEmpty       = "empty"
	dirLayers      = "layers"
	dirGenerations = "generations"
	dirDigests     = "digests"
	fileHead       = "HEAD"
	fileLastUsed   = "LAST_USED"
	fileVolume     = "volume.json"
	fileOwner      = "OWNER"
	filePushed     = "PUSHED"
)

// Errors callers can test with errors.Is.
var (
	ErrNotFound    = errors.New("not found")
	ErrInUse       = errors.New("in use")
	ErrMounted     = errors.New("volume is mounted")
	ErrNotWritable = errors.New("volume is not writable")
	ErrConflict    = errors.New("conflict")
	ErrTooLarge    = errors.New("too large")
	// ErrStale: an import holds content committed no later than the
	// cache's head; it matches ErrConflict. It is an answer, not a failure
	// to retry: the node has newer content than what it was offered.
	ErrStale = fmt.Errorf("older than the cache's head: %w", ErrConflict)
	// ErrLayerGone: a layer that an import meant to reuse was removed
	// (GC, an eviction) since it was found; it matches ErrConflict. The
	// import may be tried again, fetching that layer.
	ErrLayerGone = fmt.Errorf("a layer to reuse is gone: %w", ErrConflict)
)

// Options tune a Store.
type Options struct {
	// CompactThreshold is the chain length at which CompactIfNeeded merges
	// a cache's layers into one. Zero means DefaultCompactThreshold.
	CompactThreshold int
	// LayerFormat is how imported layers are kept (empty: auto).
	LayerFormat LayerFormat
}

// Store is a node-local layered store rooted at one directory.
type Store struct {
	root string
	opts Options
	// hostDirMu serialises the mounts of host directories: one overlay
	// per directory.
	hostDirMu sync.Mutex
	// imageMu serialises this process' mounts of image layers.
	imageMu    sync.Mutex
	formatOnce sync.Once
	format     LayerFormat
	formatErr  error
}

// Generation is one immutable state of a cache: an ordered list of layers.
type Generation struct {
	Number  int64     `json:"generation"`
	Layers  []string  `json:"layers"` // bottom first
	Created time.Time `json:"created"`
	// Source is "commit" or "compact".
	Source string `json:"source"`
	// Volume and Labels describe the committed volume (Source "commit").
	// A compaction keeps the labels of the head it compacts; an import
	// has those it was given.
	Volume string            `json:"volume,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	// ContentTime is when the content was committed, where that is not
	// Created: the commit a compaction or an import carries on.
	ContentTime *time.Time `json:"contentTime,omitempty"`
	// Identity names the content: the layer a commit added, kept by a
	// compaction (same content) and new for an import. Unlike Number,
	// which starts again at 1 once a cache is deleted, it never comes
	// back. See ID.
	Identity string `json:"identity,omitempty"`
}

// ID is the generation's identity (its top layer's ID for a generation
// written before identities were recorded).
func (g Generation) ID() string {
	if g.Identity != "" {
		return g.Identity
	}
	if len(g.Layers) > 0 {
		return g.Layers[len(g.Layers)-1]
	}
	return ""
}

// Committed is when the generation's content was committed: Created for a
// commit, the original commit's time for a compaction or an import.
func (g Generation) Committed() time.Time {
	if g.ContentTime != nil {
		return *g.ContentTime
	}
	return g.Created
}

type headFile struct {
	Generation int64 `json:"generation"`
}

// Open opens (creating if needed) the store at root.
func Open(root string, opts Options) (*Store, error) {
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("store root %q: must be an absolute path", root)
	}
	if opts.CompactThreshold == 0 {
		opts.CompactThreshold = DefaultCompactThreshold
	}
	if opts.CompactThreshold < 2 {
		return nil, fmt.Errorf("compact threshold %d: must be at least 2", opts.CompactThreshold)
	}
	if opts.LayerFormat == "" {
		opts.LayerFormat = LayerFormatAuto
	}
	if _, err := ParseLayerFormat(string(opts.LayerFormat)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("creating store root: %w", err)
	}
	// Mount options and /proc/self/mountinfo name layers by path: use the
	// path the kernel reports, and refuse characters that those formats
	// treat as separators.
	real, err := filepath.EvalSymlinks(root)
	if err != nil {
		return nil, fmt.Errorf("resolving store root: %w", err)
	}
	if strings.ContainsAny(real, ",:\\ \t\n") {
		return nil, fmt.Errorf("store root %q: must not contain ',', ':', '\\' or white space (overlay mount options cannot carry them)", real)
	}
	s := &Store{root: real, opts: opts}
	for _, d := range []string{dirCaches, dirVolumes, dirLocks, dirTmp, dirEmpty} {
		if err := os.MkdirAll(filepath.Join(real, d), 0o700); err != nil {
			return nil, fmt.Errorf("creating store layout: %w", err)
		}
	}
	return s, nil
}

// Owner returns what SetOwner last recorded ("" if nothing): who the
// store's data belongs to, such as the UID of the Kubernetes Node.
func (s *Store) Owner() (string, error) {
	data, err := os.ReadFile(filepath.Join(s.root, fileOwner))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return strings.TrimSpace(string(data)), err
}

// SetOwner records owner durably (see Owner).
func (s *Store) SetOwner(owner string) error {
	return writeFileAtomic(s.root, fileOwner, []byte(owner+"\n"))
}

// Root returns the store's directory.
func (s *Store) Root() string { return s.root }

// CompactThreshold returns the chain length that triggers compaction.
func (s *Store) CompactThreshold() int { return s.opts.CompactThreshold }

func (s *Store) cacheDir(k Key) string {
	return filepath.Join(s.root, dirCaches, k.Namespace, k.Name)
}

func (s *Store) layerPath(k Key, id string) string {
	return filepath.Join(s.cacheDir(k), dirLayers, id)
}

func (s *Store) volumeDir(id string) string {
	return filepath.Join(s.root, dirVolumes, id)
}

func generationFile(n int64) string { return fmt.Sprintf("%012d.json", n) }

func parseGenerationFile(name string) (int64, bool) {
	num, ok := strings.CutSuffix(name, ".json")
	if !ok || len(num) != 12 {
		return 0, false
	}
	n, err := strconv.ParseInt(num, 10, 64)
	return n, err == nil && n > 0
}

// head returns the cache's current generation; ok is false for a cache that
// has never been committed. The caller holds the cache lock, or accepts a
// snapshot that a concurrent commit may replace (never a torn one).
func (s *Store) head(k Key) (Generation, bool, error) {
	var h headFile
	err := readJSON(filepath.Join(s.cacheDir(k), fileHead), &h)
	if errors.Is(err, fs.ErrNotExist) {
		return Generation{}, false, nil
	}
	if err != nil {
		return Generation{}, false, fmt.Errorf("reading head of %s: %w", k, err)
	}
	g, err := s.generation(k, h.Generation)
	if err != nil {
		return Generation{}, false, fmt.Errorf("reading head of %s: %w", k, err)
	}
	return g, true, nil
}

func (s *Store) generation(k Key, n int64) (Generation, error) {
	var g Generation
	if err := readJSON(filepath.Join(s.cacheDir(k), dirGenerations, generationFile(n)), &g); err != nil {
		return g, fmt.Errorf("generation %d: %w", n, err)
	}
	for _, id := range g.Layers {
		if err := validateLayerID(id); err != nil {
			return g, fmt.Errorf("generation %d: %w", n, err)
		}
	}
	return g, nil
}

// generationNumbers lists the generations on disk, oldest first.
func (s *Store) generationNumbers(k Key) ([]int64, error) {
	entries, err := os.ReadDir(filepath.Join(s.cacheDir(k), dirGenerations))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int64
	for _, e := range entries {
		if n, ok := parseGenerationFile(e.Name()); ok {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

// publish writes generation g and moves the head to it. The head moves by a
// single rename: a crash leaves the old head or the new one. The caller
// holds the cache lock.
func (s *Store) publish(k Key, g Generation) error {
	dir := s.cacheDir(k)
	if err := writeJSONAtomic(filepath.Join(dir, dirGenerations), generationFile(g.Number), g); err != nil {
		return err
	}
	failpoint("publish/generation-written")
	return writeJSONAtomic(dir, fileHead, headFile{Generation: g.Number})
}

// nextGeneration returns a number above every generation on disk.
func (s *Store) nextGeneration(k Key) (int64, error) {
	nums, err := s.generationNumbers(k)
	if err != nil {
		return 0, err
	}
	if len(nums) == 0 {
		return 1, nil
	}
	return nums[len(nums)-1] + 1, nil
}

// ensureCacheDirs creates a cache's directories (on its first commit).
func (s *Store) ensureCacheDirs(k Key) error {
	dir := s.cacheDir(k)
	for _, d := range []string{dirLayers, dirGenerations} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return fmt.Errorf("creating cache %s: %w", k, err)
		}
	}
	// The new directories' entries, then the path to them, are made
	// durable before a layer and a head are written into them: after a
	// power loss, a first commit is whole or absent, never unreachable.
	if err := syncDir(dir); err != nil {
		return err
	}
	if err := syncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	return syncDir(filepath.Join(s.root, dirCaches))
}

func validateLayerID(id string) error {
	if len(id) != 24 {
		return fmt.Errorf("invalid layer ID %q", id)
	}
	for i := 0; i < len(id); i++ {
		if !isLowerAlnum(id[i]) {
			return fmt.Errorf("invalid layer ID %q", id)
		}
	}
	return nil
}

// Keys lists the caches in the store, sorted.
func (s *Store) Keys() ([]Key, error) {
	var keys []Key
	nss, err := os.ReadDir(filepath.Join(s.root, dirCaches))
	if err != nil {
		return nil, fmt.Errorf("listing caches: %w", err)
	}
	for _, ns := range nss {
		if !ns.IsDir() || ValidateName(ns.Name()) != nil {
			continue
		}
		names, err := os.ReadDir(filepath.Join(s.root, dirCaches, ns.Name()))
		if err != nil {
			return nil, fmt.Errorf("listing caches: %w", err)
		}
		for _, n := range names {
			if n.IsDir() && ValidateName(n.Name()) == nil {
				keys = append(keys, Key{Namespace: ns.Name(), Name: n.Name()})
			}
		}
	}
	return keys, nil
}

// CacheInfo describes a cache: one consistent snapshot, read under the
// cache's lock.
type CacheInfo struct {
	Key Key `json:"cache"`
	// Head is the current generation; nil for a cache with no commit.
	Head *Generation `json:"head,omitempty"`
	// Generations lists the generations kept on disk (the head and those
	// that volumes still use).
	Generations []int64 `json:"generations"`
	// Volumes lists the IDs of the volumes that use the cache: its own,
	// and those of other caches started from it as a fallback.
	Volumes []string `json:"volumes"`
	// LastUsed is when a volume was last created from the cache, or its
	// head committed, whichever is later.
	LastUsed time.Time `json:"lastUsed"`
	// Pushed is what RecordPush last recorded for the cache, if anything.
	Pushed *PushRecord `json:"pushed,omitempty"`
	// Layers lists the layers on disk, in either format.
	Layers []LayerInfo `json:"layers"`
}

// Inspect describes one cache, from one snapshot taken under its lock.
func (s *Store) Inspect(k Key) (CacheInfo, error) {
	lock, err := s.lockCache(k)
	if err != nil {
		return CacheInfo{}, err
	}
	defer lock.unlock()
	return s.inspect(k)
}

// inspect is Inspect for a caller that holds the cache's lock.
func (s *Store) inspect(k Key) (CacheInfo, error) {
	info := CacheInfo{Key: k, Generations: []int64{}, Volumes: []string{}}
	if _, err := os.Stat(s.cacheDir(k)); errors.Is(err, fs.ErrNotExist) {
		return info, fmt.Errorf("cache %s: %w", k, ErrNotFound)
	}
	g, ok, err := s.head(k)
	if err != nil {
		return info, err
	}
	if ok {
		info.Head = &g
		info.LastUsed = g.Created
	}
	if st, err := os.Stat(filepath.Join(s.cacheDir(k), fileLastUsed)); err == nil && st.ModTime().After(info.LastUsed) {
		info.LastUsed = st.ModTime().UTC()
	}
	if info.Generations, err = s.generationNumbers(k); err != nil {
		return info, err
	}
	if info.Volumes, err = s.users(k); err != nil {
		return info, err
	}
	if info.Layers, err = s.layerInfos(k); err != nil {
		return info, err
	}
	info.Pushed, err = s.pushed(k)
	return info, err
}

// users lists the volumes that use cache k: its own volumes, and those
// started from it as a fallback (their snapshot is k's layers). A volume
// of k or started from k can only be created under k's lock, so the list
// is complete for a caller that holds it.
func (s *Store) users(k Key) ([]string, error) {
	vols, err := s.Volumes()
	if err != nil {
		return nil, err
	}
	users := []string{}
	for _, v := range vols {
		if v.Cache == k || v.LayersOf() == k {
			users = append(users, v.ID)
		}
	}
	return users, nil
}

// DeleteCache removes a cache and all its data. It fails with ErrInUse
// while a volume uses the cache (its own, or one started from it as a
// fallback).
func (s *Store) DeleteCache(k Key) error {
	return s.deleteCache(k, -1)
}

// EvictIfIdle removes cache k like DeleteCache, and only if it has not
// been used for idle (zero: whenever no volume uses it). Idleness is
// judged under the cache's lock: a volume created or a commit made since
// the caller looked keeps the cache, with ErrInUse.
func (s *Store) EvictIfIdle(k Key, idle time.Duration) error {
	return s.deleteCache(k, idle)
}

func (s *Store) deleteCache(k Key, idle time.Duration) error {
	var bin trashBin
	defer bin.empty(s)
	lock, err := s.lockCache(k)
	if err != nil {
		return err
	}
	defer lock.unlock()
	info, err := s.inspect(k)
	if err != nil {
		return err
	}
	if len(info.Volumes) > 0 {
		return fmt.Errorf("cache %s is used by volume(s) %s: %w", k, strings.Join(info.Volumes, ", "), ErrInUse)
	}
	if since := time.Since(info.LastUsed); idle >= 0 && since < idle {
		return fmt.Errorf("cache %s was used %s ago, less than %s: %w", k, since.Round(time.Second), idle, ErrInUse)
	}
	if err := s.unmountImages(k); err != nil {
		return err
	}
	return bin.trash(s, s.cacheDir(k))
}

// PushRecord says that a generation of a cache was pushed elsewhere (a
// registry): what the node agent reports, kept with the cache's data so
// that it goes with them.
type PushRecord struct {
	// ID is the generation's identity (Generation.ID); Number its number
	// then.
	ID     string `json:"id"`
	Number int64  `json:"number,omitempty"`
	// Ref is where it went (an image reference by digest).
	Ref string `json:"ref"`
	// Committed is the generation's content time, Pushed when it was sent.
	Committed time.Time `json:"committed"`
	Pushed    time.Time `json:"pushed"`
}

// RecordPush records durably that a generation of cache k was pushed. It
// fails with ErrNotFound if the node no longer holds the cache (deleted or
// evicted meanwhile): the record never outlives the data.
func (s *Store) RecordPush(k Key, p PushRecord) error {
	if p.ID == "" {
		return errors.New("a push record needs the generation's identity")
	}
	lock, err := s.lockCache(k)
	if err != nil {
		return err
	}
	defer lock.unlock()
	if _, err := os.Stat(filepath.Join(s.cacheDir(k), fileHead)); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("cache %s: %w", k, ErrNotFound)
	}
	return writeJSONAtomic(s.cacheDir(k), filePushed, p)
}

func (s *Store) pushed(k Key) (*PushRecord, error) {
	var p PushRecord
	err := readJSON(filepath.Join(s.cacheDir(k), filePushed), &p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the push record of %s: %w", k, err)
	}
	return &p, nil
}

// trash removes path at once: renamed into the temporary area (atomic),
// then deleted.
func (s *Store) trash(path string) error {
	var bin trashBin
	defer bin.empty(s)
	return bin.trash(s, path)
}

// trashBin holds what an operation renamed away under a cache's lock, to be
// deleted once the lock is released: deleting a tree of 300,000 files then
// stalls no other operation of the cache. Each entry stays a locked
// temporary entry until deleted, so GC leaves it alone; after a crash, GC
// deletes it. The pattern: "var bin trashBin; defer bin.empty(s)" before
// the lock is taken, so that it runs after the unlock.
type trashBin struct{ dirs []*tempDir }

// trash renames path into a temporary entry of the bin; a path that does
// not exist is not an error.
func (b *trashBin) trash(s *Store, path string) error {
	t, err := s.newTempDir("trash")
	if err != nil {
		return err
	}
	if err := os.Rename(path, filepath.Join(t.path, "x")); err != nil {
		t.done(s)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("removing %s: %w", path, err)
	}
	b.dirs = append(b.dirs, t)
	failpoint("trash/renamed")
	return syncDir(filepath.Dir(path))
}

// keep adds a temporary entry the caller filled to the bin.
func (b *trashBin) keep(t *tempDir) { b.dirs = append(b.dirs, t) }

// empty deletes what the bin holds. A failure is not the caller's: what is
// left is an unlocked temporary entry, which GC deletes.
func (b *trashBin) empty(s *Store) {
	for _, t := range b.dirs {
		failpoint("trash/deleting")
		t.done(s)
	}
	b.dirs = nil
}

// removeTemp deletes an entry of ROOT/tmp without following symlinks.
func (s *Store) removeTemp(path string) error {
	tmp, err := openRoot(filepath.Join(s.root, dirTmp))
	if err != nil {
		return err
	}
	defer tmp.Close()
	// A probe of image mounts that crashed left its mount here.
	if err := unmountImage(filepath.Join(path, "mnt")); err != nil {
		return err
	}
	return tmp.removeAll(filepath.Base(path))
}

// generationWithLayer returns the generation on disk whose top layer is id
// (the one a commit of that layer wrote), or nil.
func (s *Store) generationWithLayer(k Key, id string) (*Generation, error) {
	nums, err := s.generationNumbers(k)
	if err != nil {
		return nil, err
	}
	for i := len(nums) - 1; i >= 0; i-- {
		g, err := s.generation(k, nums[i])
		if err != nil {
			return nil, err
		}
		if g.Source == "commit" && len(g.Layers) > 0 && g.Layers[len(g.Layers)-1] == id {
			return &g, nil
		}
	}
	return nil, nil
}

// CommittedBy returns the generation that volume id's commit made, if it
// is still on disk (the head, or one that volumes or retention keep), or
// nil: how a caller that lost track after a commit (a crash, a failed
// report) finds out what it committed.
func (s *Store) CommittedBy(k Key, id string) (*Generation, error) {
	if err := k.Validate(); err != nil {
		return nil, err
	}
	nums, err := s.generationNumbers(k)
	if err != nil {
		return nil, err
	}
	for i := len(nums) - 1; i >= 0; i-- {
		g, err := s.generation(k, nums[i])
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed by GC meanwhile
		}
		if err != nil {
			return nil, err
		}
		if g.Source == "commit" && g.Volume == id {
			return &g, nil
		}
	}
	return nil, nil
}

// LayerPath returns the directory of layer id of cache k (for tools that
// read a layer; a layer must never be modified), an image layer mounted.
func (s *Store) LayerPath(k Key, id string) (string, error) {
	if err := k.Validate(); err != nil {
		return "", err
	}
	if err := validateLayerID(id); err != nil {
		return "", err
	}
	return s.readyLayer(k, id)
}

// touchLastUsed records that cache k was used now (best effort: it only
// informs eviction).
func (s *Store) touchLastUsed(k Key) {
	path := filepath.Join(s.cacheDir(k), fileLastUsed)
	now := time.Now()
	if err := os.Chtimes(path, now, now); errors.Is(err, fs.ErrNotExist) {
		if f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			f.Close()
		}
	}
}
