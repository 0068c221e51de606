package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// LayerFormat is how imported layers are kept on the node.
type LayerFormat string

const (
	// LayerFormatAuto keeps imported layers as images where the kernel
	// mounts EROFS from a file, as directories elsewhere.
	LayerFormatAuto LayerFormat = "auto"
	// LayerFormatImage keeps each imported layer as one EROFS image.
	LayerFormatImage LayerFormat = "erofs"
	// LayerFormatDir extracts imported layers into directories.
	LayerFormatDir LayerFormat = "dir"
)

// ParseLayerFormat reads a --layer-format value.
func ParseLayerFormat(s string) (LayerFormat, error) {
	switch f := LayerFormat(s); f {
	case LayerFormatAuto, LayerFormatImage, LayerFormatDir:
		return f, nil
	case "":
		return LayerFormatAuto, nil
	}
	return "", fmt.Errorf("layer format %q: must be auto, erofs or dir", s)
}

// ImportFormat is the format imports use: for LayerFormatAuto, erofs if
// this kernel mounts an image this package wrote, else dir, with why
// erofs was not chosen. The check runs once per Store.
func (s *Store) ImportFormat() (LayerFormat, error) {
	s.formatOnce.Do(func() {
		switch s.opts.LayerFormat {
		case LayerFormatDir:
			s.format = LayerFormatDir
		case LayerFormatImage:
			s.format, s.formatErr = LayerFormatImage, s.probeImages()
		default:
			s.format = LayerFormatImage
			if s.formatErr = s.probeImages(); s.formatErr != nil {
				s.format = LayerFormatDir
			}
		}
	})
	return s.format, s.formatErr
}

// probeImages writes a small image and mounts it, as an import would.
func (s *Store) probeImages() error {
	t, err := s.newTempDir("probe")
	if err != nil {
		return err
	}
	defer t.done(s)
	staged := &StagedLayer{t: t, id: "probe"}
	if err := s.extractImage(staged, strings.NewReader(""), ImportOptions{}); err != nil {
		return fmt.Errorf("writing an EROFS image: %w", err)
	}
	mnt := filepath.Join(t.path, "mnt")
	if err := mountImage(filepath.Join(t.path, "probe"+imageSuffix), mnt); err != nil {
		return err
	}
	return unmountImage(mnt)
}

// mountImage mounts image read-only on target (created if missing), with
// the file as the mount's source: no loop device.
func mountImage(image, target string) error {
	if err := os.Mkdir(target, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := unix.Mount(image, target, "erofs", unix.MS_RDONLY|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("mounting EROFS image %s (Linux 6.12 or later with EROFS_FS_BACKED_BY_FILE): %w", image, err)
	}
	return nil
}

// isImageMount says whether an EROFS file system is mounted at path.
func isImageMount(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	return uint32(st.Type) == erofsSuperMagic, nil
}

// unmountImage unmounts every EROFS mount stacked on target (two
// processes may have mounted it at once). Overlays that use it keep it
// until they go: they hold the file system, not the path.
func unmountImage(target string) error {
	for range 16 {
		mounted, err := isImageMount(target)
		if err != nil || !mounted {
			return err
		}
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting %s: %w", target, err)
		}
	}
	return fmt.Errorf("unmounting %s: still mounted", target)
}

func (s *Store) imagePath(k Key, id string) string { return s.layerPath(k, id) + imageSuffix }

// isImageLayer says whether layer id of k is kept as an image.
func (s *Store) isImageLayer(k Key, id string) (bool, error) {
	_, err := os.Lstat(s.imagePath(k, id))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// layerExists says whether cache k holds layer id, in either format.
func (s *Store) layerExists(k Key, id string) (bool, error) {
	for _, p := range []string{s.imagePath(k, id), s.layerPath(k, id)} {
		if _, err := os.Lstat(p); err == nil {
			return true, nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return false, err
		}
	}
	return false, nil
}

// readyLayer returns the directory of layer id of k, mounting it first if
// it is an image that is not mounted (after a reboot, or in a new mount
// namespace: an agent restarted). An unmounted image's mount point is an
// empty directory, so nothing may read a layer but through this.
func (s *Store) readyLayer(k Key, id string) (string, error) {
	if _, err := s.mountLayer(k, id); err != nil {
		return "", err
	}
	return s.layerPath(k, id), nil
}

// mountLayer mounts layer id of k if it is an image not mounted yet, and
// says whether it did.
func (s *Store) mountLayer(k Key, id string) (bool, error) {
	image, err := s.isImageLayer(k, id)
	if err != nil || !image {
		return false, err
	}
	dir := s.layerPath(k, id)
	s.imageMu.Lock()
	defer s.imageMu.Unlock()
	if mounted, err := isImageMount(dir); err != nil || mounted {
		return false, err
	}
	if err := mountImage(s.imagePath(k, id), dir); err != nil {
		return false, fmt.Errorf("layer %s of %s: %w", id, k, err)
	}
	failpoint("image/mounted")
	return true, nil
}

// layerIDs lists the layers in cache k's layers directory, in either
// format, each once.
func (s *Store) layerIDs(k Key) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.cacheDir(k), dirLayers))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ids []string
	seen := map[string]bool{}
	for _, e := range entries {
		id := strings.TrimSuffix(e.Name(), imageSuffix)
		if validateLayerID(id) != nil || seen[id] {
			continue
		}
		seen[id] = true
		ids = append(ids, id)
	}
	return ids, nil
}

// unmountImages unmounts every image layer of k (before the cache's
// directory goes). The caller holds k's lock.
func (s *Store) unmountImages(k Key) error {
	ids, err := s.layerIDs(k)
	if err != nil {
		return err
	}
	for _, id := range ids {
		if image, err := s.isImageLayer(k, id); err != nil {
			return err
		} else if image {
			if err := unmountImage(s.layerPath(k, id)); err != nil {
				return err
			}
		}
	}
	return nil
}

// MountImageLayers mounts the image layers of every cache that are not
// mounted (the node agent calls it as it starts, before it serves any
// volume; readers mount them anyway). It returns how many it mounted.
func (s *Store) MountImageLayers() (int, error) {
	keys, err := s.Keys()
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, k := range keys {
		ids, err := s.layerIDs(k)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, id := range ids {
			if mounted, err := s.mountLayer(k, id); err != nil {
				errs = append(errs, err)
			} else if mounted {
				n++
			}
		}
	}
	return n, errors.Join(errs...)
}

// LayerInfo describes one layer of a cache on disk.
type LayerInfo struct {
	ID string `json:"id"`
	// Format is "dir" or "erofs".
	Format LayerFormat `json:"format"`
	// Mounted says, for an image, whether it is mounted (in this process'
	// mount namespace).
	Mounted bool `json:"mounted,omitempty"`
}

func (s *Store) layerInfos(k Key) ([]LayerInfo, error) {
	ids, err := s.layerIDs(k)
	if err != nil {
		return nil, err
	}
	infos := []LayerInfo{}
	for _, id := range ids {
		info := LayerInfo{ID: id, Format: LayerFormatDir}
		if image, err := s.isImageLayer(k, id); err != nil {
			return nil, err
		} else if image {
			info.Format = LayerFormatImage
			info.Mounted, _ = isImageMount(s.layerPath(k, id))
		}
		infos = append(infos, info)
	}
	return infos, nil
}
