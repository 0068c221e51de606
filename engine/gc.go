package engine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// GCResult says what GC removed.
type GCResult struct {
	Layers      int `json:"layers"`
	Generations int `json:"generations"`
	Temporary   int `json:"temporary"`
	Caches      int `json:"caches"`
}

// GC removes what nothing references: generations that are neither a
// cache's head nor a volume's snapshot, layers that no kept generation, no
// volume and no live overlay mount uses, empty caches, and the leftovers of
// crashed writers. Its view is rebuilt from disk and /proc/self/mountinfo
// on every run, never from memory, so it is as safe after a restart as
// before.
func (s *Store) GC() (GCResult, error) {
	var res GCResult
	keys, err := s.Keys()
	if err != nil {
		return res, err
	}
	var errs []error
	for _, k := range keys {
		if err := s.gcCache(k, &res); err != nil {
			errs = append(errs, fmt.Errorf("collecting %s: %w", k, err))
		}
	}
	if err := s.gcTemp(&res); err != nil {
		errs = append(errs, err)
	}
	return res, errors.Join(errs...)
}

func (s *Store) gcCache(k Key, res *GCResult) error {
	lock, err := s.lockCache(k)
	if err != nil {
		return err
	}
	defer lock.unlock()

	// Read the mounts under the lock: a volume of this cache cannot be
	// created, hence not mounted, while we hold it.
	mounts, err := readMountInfo()
	if err != nil {
		return err
	}
	vols, err := s.Volumes()
	if err != nil {
		return err
	}
	head, hasHead, err := s.head(k)
	if err != nil {
		return err
	}
	keepGen := map[int64]bool{}
	keepLayer := map[string]bool{}
	volumeIDs := map[string]bool{}
	volumesOn := false // volumes of this cache exist
	if hasHead {
		keepGen[head.Number] = true
	}
	for _, v := range vols {
		volumeIDs[v.ID] = true
		if v.LayersOf() == k {
			keepGen[v.Generation] = true
			for _, l := range v.Layers {
				keepLayer[l] = true
			}
		}
		if v.Cache == k {
			volumesOn = true
			for _, l := range []string{v.CommitLayer, v.BaseLayer} {
				if l != "" {
					keepLayer[l] = true
				}
			}
		}
	}
	layersDir := filepath.Join(s.cacheDir(k), dirLayers) + "/"
	for _, m := range mounts {
		if m.FSType != "overlay" {
			continue
		}
		for _, l := range m.Lowers {
			if id, ok := strings.CutPrefix(l, layersDir); ok {
				keepLayer[id] = true
			}
		}
	}

	genDir := filepath.Join(s.cacheDir(k), dirGenerations)
	nums, err := s.generationNumbers(k)
	if err != nil {
		return err
	}
	for _, n := range nums {
		g, err := s.generation(k, n)
		if err != nil {
			return err // never delete on a view we could not read
		}
		// A commit's generation is kept while its volume exists, so an
		// interrupted commit that is retried finds it and does not publish
		// twice.
		if keepGen[n] || (g.Volume != "" && volumeIDs[g.Volume]) {
			for _, l := range g.Layers {
				keepLayer[l] = true
			}
			continue
		}
		if err := os.Remove(filepath.Join(genDir, generationFile(n))); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		res.Generations++
	}
	if err := removeTmpFiles(genDir); err != nil {
		return err
	}
	if err := removeTmpFiles(s.cacheDir(k)); err != nil {
		return err
	}

	entries, err := os.ReadDir(layersDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var garbage []string
	for _, e := range entries {
		if !keepLayer[e.Name()] {
			garbage = append(garbage, e.Name())
		}
	}
	if len(garbage) > 0 {
		t, err := s.newTempDir("trash")
		if err != nil {
			return err
		}
		defer func() {
			t.release()
			s.removeTemp(t.path)
		}()
		for _, id := range garbage {
			if err := os.Rename(filepath.Join(layersDir, id), filepath.Join(t.path, id)); err != nil {
				return fmt.Errorf("removing layer %s: %w", id, err)
			}
			res.Layers++
		}
		failpoint("gc/layers-moved")
		if err := syncDir(layersDir); err != nil {
			return err
		}
	}
	if err := s.removeStaleDigests(k); err != nil {
		return err
	}
	if !hasHead && len(entries) == len(garbage) && len(keepGen) == 0 && !volumesOn {
		// Nothing left of this cache: a commit that never published, or
		// a cache whose volumes all went away before any commit.
		if err := s.trash(s.cacheDir(k)); err != nil {
			return err
		}
		res.Caches++
	}
	return nil
}

func removeTmpFiles(dirPath string) error {
	entries, err := os.ReadDir(dirPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if isTmpName(e.Name()) && !e.IsDir() {
			if err := os.Remove(filepath.Join(dirPath, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// gcTemp removes entries of ROOT/tmp whose writer is gone: a live writer
// holds a flock on its entry.
func (s *Store) gcTemp(res *GCResult) error {
	tmp, err := openRoot(filepath.Join(s.root, dirTmp))
	if err != nil {
		return err
	}
	defer tmp.Close()
	names, err := tmp.names()
	if err != nil {
		return err
	}
	for _, name := range names {
		fd, err := unix.Openat(tmp.fd(), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			// Not a directory we can lock (a stray file or symlink): remove.
			if err := tmp.removeAll(name); err != nil {
				return err
			}
			res.Temporary++
			continue
		}
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(fd)
			continue // its writer is alive
		}
		err = tmp.removeAll(name)
		unix.Close(fd)
		if err != nil {
			return err
		}
		res.Temporary++
	}
	return nil
}
