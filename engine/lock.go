package engine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// flock is an exclusive advisory lock on a file. flock(2) locks belong to
// the open file description, so two goroutines of one process exclude each
// other as two processes do, and a killed process releases its locks.
type flock struct {
	f *os.File
}

func lockFile(path string) (*flock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return &flock{f: f}, nil
}

func (l *flock) unlock() {
	if l != nil && l.f != nil {
		l.f.Close() // closing the last descriptor releases the lock
		l.f = nil
	}
}

// lockCache takes the lock of one cache: every change to the cache (commit,
// volume creation, compaction swap, GC, delete) happens under it.
func (s *Store) lockCache(k Key) (*flock, error) {
	if err := k.Validate(); err != nil {
		return nil, err
	}
	// Namespaces and names are DNS labels, so "." cannot appear in either.
	return lockFile(filepath.Join(s.root, dirLocks, k.Namespace+"."+k.Name+".lock"))
}

// tempDir is a directory under ROOT/tmp that its creator holds a flock on
// while it works; GC removes only entries whose lock it can take, which
// means their creator is gone.
type tempDir struct {
	path string
	f    *os.File
}

// lockTmp takes the lock of the temporary area: shared by writers while
// they create and lock an entry, exclusive for GC while it picks the
// entries whose writer is gone, so that it never takes an entry between
// its creation and its lock.
func (s *Store) lockTmp(how int) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(s.root, dirLocks, "tmp.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the temporary area's lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking the temporary area: %w", err)
	}
	return f, nil
}

func (s *Store) newTempDir(kind string) (*tempDir, error) {
	area, err := s.lockTmp(unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer area.Close()
	path := filepath.Join(s.root, dirTmp, kind+"-"+randomID())
	if err := os.Mkdir(path, 0o700); err != nil {
		return nil, fmt.Errorf("creating temporary dir: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("opening temporary dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("locking temporary dir: %w", err)
	}
	return &tempDir{path: path, f: f}, nil
}

// done removes the directory, then drops its lock: GC never removes it at
// the same time.
func (t *tempDir) done(s *Store) {
	if t != nil && t.f != nil {
		s.removeTemp(t.path)
	}
	t.release()
}

// release drops the lock. The directory may have been renamed away already.
func (t *tempDir) release() {
	if t != nil && t.f != nil {
		t.f.Close()
		t.f = nil
	}
}
