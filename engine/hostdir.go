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

// Host directories are plain node-local directories, without a cache:
// fast local scratch space from the same driver. They live in
// ROOT/hostdirs/ID and are bind-mounted at their targets.

const dirHostDirs = "hostdirs"

func (s *Store) hostDirPath(id string) string { return filepath.Join(s.root, dirHostDirs, id) }

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

// MountHostDir bind-mounts host directory id at target (idempotent).
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
	points, err := s.HostDirMountPoints(id)
	if err != nil {
		return err
	}
	for _, p := range points {
		if p == target {
			return nil
		}
	}
	if err := unix.Mount(s.hostDirPath(id), target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mounting host directory %s at %s: %w", id, target, err)
	}
	// A bind mount takes nosuid and nodev only from a remount.
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("making host directory %s at %s nosuid,nodev: %w", id, target, err)
	}
	return nil
}

// HostDirMountPoints returns where host directory id is bind-mounted.
func (s *Store) HostDirMountPoints(id string) ([]string, error) {
	mounts, err := readMountInfo()
	if err != nil {
		return nil, err
	}
	suffix := "/" + dirHostDirs + "/" + id
	var out []string
	for _, m := range mounts {
		// A bind mount's root is the source path within its filesystem:
		// it ends with the store-relative path whatever the mount point of
		// the filesystem holding the store.
		if strings.HasSuffix(m.Root, suffix) && strings.HasSuffix(s.hostDirPath(id), m.Root) {
			out = append(out, m.MountPoint)
		}
	}
	return out, nil
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
