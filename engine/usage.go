package engine

import (
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// LayerUsage is the disk use of one layer.
type LayerUsage struct {
	ID     string `json:"id"`
	Bytes  int64  `json:"bytes"`
	Inodes int64  `json:"inodes"`
}

// CacheUsage is the disk use of one cache: every layer it keeps on disk,
// with inodes shared between layers (compaction links files) counted once.
type CacheUsage struct {
	Key    Key          `json:"cache"`
	Bytes  int64        `json:"bytes"`
	Inodes int64        `json:"inodes"`
	Layers []LayerUsage `json:"layers"`
}

type inodeKey struct{ dev, ino uint64 }

type counter struct {
	seen          map[inodeKey]bool
	bytes, inodes int64
}

func newCounter() *counter { return &counter{seen: map[inodeKey]bool{}} }

// add counts st once: only an inode with more than one link (a hard-linked
// file; a directory has none) is remembered, so that a tree of a million
// files costs no map of a million entries.
func (c *counter) add(st *unix.Stat_t) bool {
	if st.Nlink > 1 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
		k := inodeKey{uint64(st.Dev), st.Ino}
		if c.seen[k] {
			return false
		}
		c.seen[k] = true
	}
	c.bytes += st.Blocks * 512
	c.inodes++
	return true
}

// Usage measures cache k. It walks layers without following symlinks.
func (s *Store) Usage(k Key) (CacheUsage, error) {
	u := CacheUsage{Key: k, Layers: []LayerUsage{}}
	if err := k.Validate(); err != nil {
		return u, err
	}
	root, err := openRoot(s.root)
	if err != nil {
		return u, err
	}
	defer root.Close()
	ids, err := s.layerIDs(k)
	if err != nil {
		return u, err
	}
	total := newCounter()
	for _, id := range ids {
		own := newCounter()
		err := s.measureLayer(root, k, id, own, total)
		if errors.Is(err, unix.ENOENT) {
			continue // removed by GC meanwhile
		}
		if err != nil {
			return u, err
		}
		u.Layers = append(u.Layers, LayerUsage{ID: id, Bytes: own.bytes, Inodes: own.inodes})
	}
	u.Bytes, u.Inodes = total.bytes, total.inodes
	return u, nil
}

// measureLayer counts layer id of k: a directory's tree, walked without
// following symlinks, or an image's one file (what it takes on disk; its
// mount is never walked).
func (s *Store) measureLayer(root *dir, k Key, id string, counters ...*counter) error {
	var st unix.Stat_t
	err := unix.Fstatat(root.fd(), filepath.Join(dirCaches, k.Namespace, k.Name, dirLayers, id+imageSuffix), &st, unix.AT_SYMLINK_NOFOLLOW)
	if err == nil {
		for _, c := range counters {
			c.add(&st)
		}
		return nil
	}
	if !errors.Is(err, unix.ENOENT) {
		return err
	}
	d, err := root.openBeneath(filepath.Join(dirCaches, k.Namespace, k.Name, dirLayers, id))
	if err != nil {
		return err
	}
	defer d.Close()
	return measure(d, counters...)
}

// VolumeUsage measures the private upper layer of volume id: what the
// volume's writers added.
func (s *Store) VolumeUsage(id string) (bytes, inodes int64, err error) {
	if err := ValidateVolumeID(id); err != nil {
		return 0, 0, err
	}
	return s.measureDir(filepath.Join(dirVolumes, id, "upper"))
}

// measureDir measures the directory rel below the store root, without
// following symlinks; a missing directory is ErrNotFound.
func (s *Store) measureDir(rel string) (bytes, inodes int64, err error) {
	root, err := openRoot(s.root)
	if err != nil {
		return 0, 0, err
	}
	defer root.Close()
	d, err := root.openBeneath(rel)
	if errors.Is(err, unix.ENOENT) {
		return 0, 0, fmt.Errorf("%s: %w", rel, ErrNotFound)
	}
	if err != nil {
		return 0, 0, err
	}
	defer d.Close()
	c := newCounter()
	if err := measure(d, c); err != nil {
		return 0, 0, err
	}
	return c.bytes, c.inodes, nil
}

func measure(d *dir, counters ...*counter) error {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd(), &st); err != nil {
		return err
	}
	for _, c := range counters {
		c.add(&st)
	}
	return d.walk(func(_ *dir, _ string, st *unix.Stat_t) error {
		for _, c := range counters {
			c.add(st)
		}
		return nil
	})
}
