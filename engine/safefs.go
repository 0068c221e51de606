package engine

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// This file holds the only way the engine reads or removes layer content:
// through directory file descriptors, one path component at a time, never
// following a symlink. Builds may write any symlink into a cache (to "/",
// to "../.."); compaction, GC and usage must not leave the store because of
// one.

// dir is an open directory inside the store.
type dir struct {
	f *os.File
}

func (d *dir) fd() int      { return int(d.f.Fd()) }
func (d *dir) Close() error { return d.f.Close() }

// openRoot opens the store root itself (the only path the engine opens by
// absolute name).
func openRoot(path string) (*dir, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &dir{f: os.NewFile(uintptr(fd), path)}, nil
}

// openBeneath opens the directory rel below d without following any
// symlink and without leaving d (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS;
// on kernels without openat2, openat with O_NOFOLLOW one component at a
// time).
func (d *dir) openBeneath(rel string) (*dir, error) {
	if rel == "" || rel == "." { // d itself, opened again
		fd, err := unix.Openat(d.fd(), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: d.f.Name(), Err: err}
		}
		return &dir{f: os.NewFile(uintptr(fd), d.f.Name())}, nil
	}
	name := d.f.Name() + "/" + rel
	how := &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	fd, err := unix.Openat2(d.fd(), rel, how)
	if errors.Is(err, unix.ENOSYS) {
		fd, err = openatNoFollow(d.fd(), rel)
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	return &dir{f: os.NewFile(uintptr(fd), name)}, nil
}

func openatNoFollow(dirfd int, rel string) (int, error) {
	parts := strings.Split(rel, "/")
	cur := -1
	for _, p := range parts {
		if p == "" || p == "." || p == ".." {
			if cur >= 0 {
				unix.Close(cur)
			}
			return -1, unix.EXDEV
		}
		from := dirfd
		if cur >= 0 {
			from = cur
		}
		next, err := unix.Openat(from, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if cur >= 0 {
			unix.Close(cur)
		}
		if err != nil {
			return -1, err
		}
		cur = next
	}
	return cur, nil
}

// child opens the subdirectory name of d (a single component), refusing
// symlinks.
func (d *dir) child(name string) (*dir, error) {
	fd, err := unix.Openat(d.fd(), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "openat", Path: d.f.Name() + "/" + name, Err: err}
	}
	return &dir{f: os.NewFile(uintptr(fd), d.f.Name()+"/"+name)}, nil
}

// names lists the entries of d.
func (d *dir) names() ([]string, error) {
	if _, err := d.f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return d.f.Readdirnames(-1)
}

// lstat stats name in d without following a symlink.
func (d *dir) lstat(name string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstatat(d.fd(), name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err != nil {
		return st, &os.PathError{Op: "lstat", Path: d.f.Name() + "/" + name, Err: err}
	}
	return st, nil
}

// removeAll removes name in d and everything below it, never following a
// symlink. A missing name is not an error.
func (d *dir) removeAll(name string) error {
	st, err := d.lstat(name)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	flags := 0
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		if err := d.emptyChild(name); err != nil {
			return err
		}
		flags = unix.AT_REMOVEDIR
	}
	err = unix.Unlinkat(d.fd(), name, flags)
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "unlinkat", Path: d.f.Name() + "/" + name, Err: err}
	}
	return nil
}

// emptyChild removes everything below the subdirectory name.
func (d *dir) emptyChild(name string) error {
	sub, err := d.child(name)
	if err != nil {
		return err
	}
	defer sub.Close()
	entries, err := sub.names()
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := sub.removeAll(e); err != nil {
			return err
		}
	}
	return nil
}

// walk calls fn for every entry below d, depth first, with the directory
// holding it. It never follows a symlink; fn sees symlinks as entries.
func (d *dir) walk(fn func(parent *dir, name string, st *unix.Stat_t) error) error {
	if _, err := d.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	// A batch at a time: a directory of a million entries costs a batch
	// of names, not a million.
	for {
		batch, err := d.f.Readdirnames(walkBatch)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, e := range batch {
			if err := d.visit(e, fn); err != nil {
				return err
			}
		}
	}
}

// walkBatch is how many names walk reads at once.
const walkBatch = 512

func (d *dir) visit(e string, fn func(parent *dir, name string, st *unix.Stat_t) error) error {
	st, err := d.lstat(e)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := fn(d, e, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	sub, err := d.child(e)
	if err != nil {
		return err
	}
	defer sub.Close()
	return sub.walk(fn)
}

// isEmpty reports whether d has no entries.
func (d *dir) isEmpty() (bool, error) {
	if _, err := d.f.Seek(0, io.SeekStart); err != nil {
		return false, err
	}
	names, err := d.f.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return len(names) == 0, nil
}

// syncfs flushes the filesystem that holds d.
func (d *dir) syncfs() error {
	if err := unix.Syncfs(d.fd()); err != nil {
		return fmt.Errorf("syncfs %s: %w", d.f.Name(), err)
	}
	return nil
}
