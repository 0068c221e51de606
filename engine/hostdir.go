package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Host directories are plain node-local directories, without a cache:
// fast local scratch space from the same driver. They live in
// ROOT/hostdirs/ID, the upper dir of an overlay with an empty lower (its
// work dir in ROOT/hostdirs-work/ID): a file system of its own, which
// StopHostDirWrites can make read-only for all its pods at once. A second
// target of the same directory is a bind mount of the first.

const (
	dirHostDirs    = "hostdirs"
	dirHostDirWork = "hostdirs-work"
)

func (s *Store) hostDirPath(id string) string { return filepath.Join(s.root, dirHostDirs, id) }
func (s *Store) hostDirWork(id string) string { return filepath.Join(s.root, dirHostDirWork, id) }

// CreateHostDir creates host directory id (idempotent).
func (s *Store) CreateHostDir(id string) error {
	if err := ValidateVolumeID(id); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(s.root, dirHostDirs), 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(s.hostDirPath(id), 0o777); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating host directory %s: %w", id, err)
	}
	// World-writable like an emptyDir, whatever the umask.
	return os.Chmod(s.hostDirPath(id), 0o777)
}

// MountHostDir mounts host directory id at target, nosuid and nodev
// (idempotent): an overlay over it, or a bind mount of the overlay where
// it is mounted already.
func (s *Store) MountHostDir(id, target string) error {
	if err := ValidateVolumeID(id); err != nil {
		return err
	}
	if _, err := os.Stat(s.hostDirPath(id)); err != nil {
		return fmt.Errorf("host directory %s: %w", id, ErrNotFound)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	s.hostDirMu.Lock()
	defer s.hostDirMu.Unlock()
	points, err := s.HostDirMountPoints(id)
	if err != nil {
		return err
	}
	if slices.Contains(points, target) {
		return nil
	}
	if len(points) == 0 {
		if err := os.MkdirAll(s.hostDirWork(id), 0o700); err != nil {
			return fmt.Errorf("creating the work dir of host directory %s: %w", id, err)
		}
		return mountOverlay([]string{filepath.Join(s.root, dirEmpty)}, s.hostDirPath(id), s.hostDirWork(id), target, false)
	}
	if err := unix.Mount(points[0], target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mounting host directory %s at %s: %w", id, target, err)
	}
	// A bind mount takes nosuid and nodev only from a remount.
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("making host directory %s at %s nosuid,nodev: %w", id, target, err)
	}
	return nil
}

// HostDirMountPoints returns where host directory id is mounted: its
// overlay and the bind mounts of it, and the plain bind mounts that agents
// before the overlay made.
func (s *Store) HostDirMountPoints(id string) ([]string, error) {
	mounts, err := readMountInfo()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range mounts {
		if overlay, legacy := s.hostDirMount(id, m); overlay || legacy {
			out = append(out, m.MountPoint)
		}
	}
	return out, nil
}

// hostDirMount says whether m mounts host directory id: as its overlay (or
// a bind mount of it), or as a plain bind mount of an older agent.
func (s *Store) hostDirMount(id string, m mountEntry) (overlay, legacy bool) {
	if m.FSType == "overlay" && m.Upper == s.hostDirPath(id) {
		return true, false
	}
	// A plain bind mount's root is the source path within its filesystem:
	// it ends with the store-relative path whatever the mount point of
	// the filesystem holding the store (an overlay's root is "/").
	suffix := "/" + dirHostDirs + "/" + id
	return false, strings.HasSuffix(m.Root, suffix) && strings.HasSuffix(s.hostDirPath(id), m.Root)
}

// StopHostDirWrites makes host directory id read-only wherever it is
// mounted (one over its bound): its pods' writes fail with EROFS from then
// on. A plain bind mount made by an agent before the overlay shares the
// node's file system, which it leaves alone: it says so.
func (s *Store) StopHostDirWrites(id string) error {
	if err := ValidateVolumeID(id); err != nil {
		return err
	}
	mounts, err := readMountInfo()
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mounts {
		switch overlay, legacy := s.hostDirMount(id, m); {
		case overlay:
			errs = append(errs, makeReadOnly(m.MountPoint))
		case legacy:
			errs = append(errs, fmt.Errorf("host directory %s at %s is a bind mount of the node's file system (mounted before this agent version): its writes cannot be stopped", id, m.MountPoint))
		}
	}
	return errors.Join(errs...)
}

// RemoveHostDir deletes host directory id and its content. It must not be
// mounted; removing one that does not exist is not an error.
func (s *Store) RemoveHostDir(id string) error {
	if err := ValidateVolumeID(id); err != nil {
		return err
	}
	points, err := s.HostDirMountPoints(id)
	if err != nil {
		return err
	}
	if len(points) > 0 {
		return fmt.Errorf("host directory %s is mounted at %s: %w", id, points[0], ErrMounted)
	}
	if err := s.trash(s.hostDirWork(id)); err != nil {
		return err
	}
	return s.trash(s.hostDirPath(id))
}

// HostDirs lists the host directories.
func (s *Store) HostDirs() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.root, dirHostDirs))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if ValidateVolumeID(e.Name()) == nil {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// UnmountTarget unmounts whatever is mounted at target (idempotent); it is how a
// CSI unpublish releases either kind of volume.
func UnmountTarget(target string) error { return unmount(target) }

// HostDirUsage measures host directory id without following symlinks.
func (s *Store) HostDirUsage(id string) (bytes, inodes int64, err error) {
	if err := ValidateVolumeID(id); err != nil {
		return 0, 0, err
	}
	return s.measureDir(filepath.Join(dirHostDirs, id))
}
