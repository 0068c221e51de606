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
	var bin trashBin
	defer bin.empty(s)
	lock, err := s.lockCache(k)
	if err != nil {
		return err
	}
	defer lock.unlock()

	refs, err := s.references(k)
	if err != nil {
		return err
	}
	if err := s.gcGenerations(k, refs, res); err != nil {
		return err
	}
	layers, removed, err := s.gcLayers(k, refs.layers, res, &bin)
	if err != nil {
		return err
	}
	if err := s.removeStaleDigests(k); err != nil {
		return err
	}
	if !refs.hasHead && layers == removed && len(refs.generations) == 0 && !refs.volumesOn {
		// Nothing left of this cache: a commit that never published, or
		// a cache whose volumes all went away before any commit.
		if err := s.unmountImages(k); err != nil {
			return err
		}
		if err := bin.trash(s, s.cacheDir(k)); err != nil {
			return err
		}
		res.Caches++
	}
	return nil
}

// gcRefs is what keeps a cache's generations and layers.
type gcRefs struct {
	hasHead     bool
	generations map[int64]bool  // the head, and the snapshots of volumes
	layers      map[string]bool // of those, of commits under way, of mounts
	volumes     map[string]bool // the IDs of every volume of the store
	volumesOn   bool            // volumes of this cache exist
}

// references reads what keeps cache k's data: its head, the volumes (of k,
// or started from k) and the live overlay mounts. The caller holds k's
// lock: a volume of k cannot be created, hence not mounted, meanwhile.
func (s *Store) references(k Key) (gcRefs, error) {
	refs := gcRefs{generations: map[int64]bool{}, layers: map[string]bool{}, volumes: map[string]bool{}}
	mounts, err := readMountInfo()
	if err != nil {
		return refs, err
	}
	vols, err := s.Volumes()
	if err != nil {
		return refs, err
	}
	head, hasHead, err := s.head(k)
	if err != nil {
		return refs, err
	}
	if refs.hasHead = hasHead; hasHead {
		refs.generations[head.Number] = true
	}
	for _, v := range vols {
		refs.volumes[v.ID] = true
		if v.LayersOf() == k {
			refs.generations[v.Generation] = true
			for _, l := range v.Layers {
				refs.layers[l] = true
			}
		}
		if v.Cache == k {
			refs.volumesOn = true
			for _, l := range []string{v.CommitLayer, v.BaseLayer} {
				if l != "" {
					refs.layers[l] = true
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
				refs.layers[id] = true
			}
		}
	}
	return refs, nil
}

// gcGenerations removes the generations nothing keeps, and adds the layers
// of those kept to refs.
func (s *Store) gcGenerations(k Key, refs gcRefs, res *GCResult) error {
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
		if refs.generations[n] || (g.Volume != "" && refs.volumes[g.Volume]) {
			for _, l := range g.Layers {
				refs.layers[l] = true
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
	return removeTmpFiles(s.cacheDir(k))
}

// gcLayers moves the layers not in keep to the trash and deletes them; it
// returns how many layers there were and how many it removed.
func (s *Store) gcLayers(k Key, keep map[string]bool, res *GCResult, bin *trashBin) (int, int, error) {
	layersDir := filepath.Join(s.cacheDir(k), dirLayers)
	ids, err := s.layerIDs(k)
	if err != nil {
		return 0, 0, err
	}
	var garbage []string
	for _, id := range ids {
		if !keep[id] {
			garbage = append(garbage, id)
		}
	}
	if len(garbage) == 0 {
		return len(ids), 0, nil
	}
	t, err := s.newTempDir("trash")
	if err != nil {
		return 0, 0, err
	}
	bin.keep(t)
	for _, id := range garbage {
		if err := s.trashLayer(k, id, t.path); err != nil {
			return 0, 0, fmt.Errorf("removing layer %s: %w", id, err)
		}
		res.Layers++
	}
	failpoint("gc/layers-moved")
	return len(ids), len(garbage), syncDir(layersDir)
}

// trashLayer moves layer id of k into dir. An image is unmounted first,
// and its mount point goes before its file: a crash between the two
// leaves a whole image layer (mounted again when read), never an empty
// directory that would pass for a layer.
func (s *Store) trashLayer(k Key, id, dir string) error {
	image, err := s.isImageLayer(k, id)
	if err != nil {
		return err
	}
	if image {
		if err := unmountImage(s.layerPath(k, id)); err != nil {
			return err
		}
		failpoint("gc/image-unmounted")
	}
	if err := os.Rename(s.layerPath(k, id), filepath.Join(dir, id)); err != nil && !(image && errors.Is(err, os.ErrNotExist)) {
		return err
	}
	if !image {
		return nil
	}
	failpoint("gc/image-mountpoint-moved")
	return os.Rename(s.imagePath(k, id), filepath.Join(dir, id+imageSuffix))
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
// holds a flock on its entry. Under the temporary area's exclusive lock
// (so that no entry is between its creation and its lock), the dead ones
// are renamed ".dead-..."; they are removed after.
func (s *Store) gcTemp(res *GCResult) error {
	tmp, err := openRoot(filepath.Join(s.root, dirTmp))
	if err != nil {
		return err
	}
	defer tmp.Close()
	dead, err := s.pickDeadTemp(tmp)
	for _, name := range dead {
		if rerr := tmp.removeAll(name); rerr != nil {
			return errors.Join(err, rerr)
		}
		res.Temporary++
	}
	return err
}

const deadPrefix = ".dead-"

// pickDeadTemp renames the entries of tmp whose writer is gone, and
// returns their new names (and those renamed before, by a GC that died).
func (s *Store) pickDeadTemp(tmp *dir) ([]string, error) {
	area, err := s.lockTmp(unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer area.Close()
	names, err := tmp.names()
	if err != nil {
		return nil, err
	}
	var dead []string
	for _, name := range names {
		if strings.HasPrefix(name, deadPrefix) {
			dead = append(dead, name)
			continue
		}
		fd, err := unix.Openat(tmp.fd(), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err == nil && unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) != nil {
			unix.Close(fd)
			continue // its writer is alive
		}
		// Its writer is gone, or it is not a directory a writer could lock
		// (a stray file or symlink).
		to := deadPrefix + randomID()
		rerr := unix.Renameat(tmp.fd(), name, tmp.fd(), to)
		if err == nil {
			unix.Close(fd)
		}
		if rerr != nil && !errors.Is(rerr, unix.ENOENT) {
			return dead, fmt.Errorf("removing temporary entry %s: %w", name, rerr)
		}
		if rerr == nil {
			dead = append(dead, to)
		}
	}
	return dead, nil
}
