package engine

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	xattrOverlayPrefix = "trusted.overlay."
	xattrOpaque        = "trusted.overlay.opaque"
)

// CompactResult says what a compaction did.
type CompactResult struct {
	Compacted bool `json:"compacted"`
	// From is the chain length before, Generation the new head.
	From       int    `json:"from,omitempty"`
	Generation int64  `json:"generation,omitempty"`
	Layer      string `json:"layer,omitempty"`
	// ChainLength is the new head's chain length (1, plus any layers
	// committed while the merge ran).
	ChainLength int `json:"chainLength,omitempty"`
}

// CompactIfNeeded compacts cache k when its chain has reached the store's
// threshold.
func (s *Store) CompactIfNeeded(k Key) (CompactResult, error) {
	return s.compact(k, s.opts.CompactThreshold)
}

// Compact merges cache k's chain into one layer if it has two or more.
func (s *Store) Compact(k Key) (CompactResult, error) {
	return s.compact(k, 2)
}

// compact merges the head's layers into a single layer without holding the
// cache lock during the merge: commits go on meanwhile. The merged layer
// hard-links the (immutable) files of the old layers, so it costs one link
// per file, not a copy of the bytes. Whiteouts and opaque dirs are applied,
// not carried: the merged layer is the bottom of its chain. Volumes mounted
// on the old chain keep it (GC will not remove what they use).
func (s *Store) compact(k Key, threshold int) (CompactResult, error) {
	lock, err := s.lockCache(k)
	if err != nil {
		return CompactResult{}, err
	}
	head, ok, err := s.head(k)
	base := compactBase{Generation: head}
	if err == nil && ok {
		err = s.compactable(k, &base)
	}
	lock.unlock()
	if err != nil || !ok || len(base.Layers) < threshold {
		return CompactResult{}, err
	}
	if len(base.Layers)-base.images < 2 {
		// Image layers (pulled) at the bottom are never copied: only
		// what was committed on top of them is merged.
		return CompactResult{}, nil
	}

	t, err := s.newTempDir("compact")
	if err != nil {
		return CompactResult{}, err
	}
	defer t.done(s) // after a successful swap the dir is empty
	if err := s.mergeLayers(k, base.Layers[base.images:], t.path, base.images > 0); err != nil {
		if s.chainGone(k, base.Layers) {
			return CompactResult{}, nil // deleted or evicted meanwhile: nothing to compact
		}
		return CompactResult{}, fmt.Errorf("compacting %s: %w", k, err)
	}
	failpoint("compact/merged")

	lock, err = s.lockCache(k)
	if err != nil {
		return CompactResult{}, err
	}
	defer lock.unlock()
	head, _, err = s.head(k)
	if err != nil {
		return CompactResult{}, err
	}
	// Commits made during the merge are kept on top, if they were built on
	// the chain we merged; otherwise the head moved to another chain and the
	// merge is dropped (a later run compacts the new one).
	if !slices.Equal(head.Layers[:min(len(base.Layers), len(head.Layers))], base.Layers) {
		return CompactResult{}, nil
	}
	g, err := s.publishCompacted(k, head, base.images, len(base.Layers), filepath.Join(t.path, "layer"))
	if err != nil {
		return CompactResult{}, fmt.Errorf("compacting %s: %w", k, err)
	}
	failpoint("compact/published")
	return CompactResult{Compacted: true, From: len(head.Layers), Generation: g.Number, Layer: g.Layers[base.images], ChainLength: len(g.Layers)}, nil
}

// compactBase is a head about to be compacted: the first images of its
// layers are image layers, left as they are.
type compactBase struct {
	Generation
	images int
}

// compactable counts the image layers at the bottom of g's chain (those
// up to the last image layer).
func (s *Store) compactable(k Key, g *compactBase) error {
	g.images = 0
	for i, id := range g.Layers {
		image, err := s.isImageLayer(k, id)
		if err != nil {
			return err
		}
		if image {
			g.images = i + 1
		}
	}
	return nil
}

// publishCompacted moves merged (layers from to n of head, merged) into
// cache k as a new layer and publishes the generation of the layers below
// from, that layer and the layers committed on top since. The content is still the head's: so
// are its labels, its time and its identity. The caller holds k's lock.
func (s *Store) publishCompacted(k Key, head Generation, from, n int, merged string) (Generation, error) {
	layer := randomID()
	if err := os.Rename(merged, s.layerPath(k, layer)); err != nil {
		return Generation{}, err
	}
	failpoint("compact/layer-renamed")
	if err := syncDir(filepath.Join(s.cacheDir(k), dirLayers)); err != nil {
		return Generation{}, err
	}
	num, err := s.nextGeneration(k)
	if err != nil {
		return Generation{}, err
	}
	committed := head.Committed()
	g := Generation{
		Number: num, Layers: slices.Concat(head.Layers[:from], []string{layer}, head.Layers[n:]),
		Created: time.Now().UTC(), Source: "compact",
		Labels: head.Labels, ContentTime: &committed, Identity: head.ID(),
	}
	return g, s.publish(k, g)
}

// chainGone tells whether cache k's head no longer starts with layers (the
// cache deleted or evicted, or its head moved to another chain), judged
// under the cache's lock: a merge that failed meanwhile is then no error.
func (s *Store) chainGone(k Key, layers []string) bool {
	lock, err := s.lockCache(k)
	if err != nil {
		return false
	}
	defer lock.unlock()
	head, ok, err := s.head(k)
	if err != nil {
		return false
	}
	return !ok || !slices.Equal(head.Layers[:min(len(layers), len(head.Layers))], layers)
}

// mergeLayers builds tmp/layer from layers (bottom first). With carry,
// the merged layer sits on layers it does not hold: it keeps whiteouts,
// and a directory that replaces something else is opaque.
func (s *Store) mergeLayers(k Key, layers []string, tmp string, carry bool) error {
	if err := os.Mkdir(filepath.Join(tmp, "layer"), 0o755); err != nil {
		return err
	}
	out, err := openRoot(filepath.Join(tmp, "layer"))
	if err != nil {
		return err
	}
	defer out.Close()
	root, err := openRoot(s.root)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, id := range layers {
		if err := validateLayerID(id); err != nil {
			return err
		}
		src, err := root.openBeneath(filepath.Join(dirCaches, k.Namespace, k.Name, dirLayers, id))
		if err != nil {
			return err
		}
		err = applyLayer(src, out, carry)
		if err == nil {
			err = copyDirMetadata(src, out)
		}
		src.Close()
		if err != nil {
			return fmt.Errorf("merging layer %s: %w", id, err)
		}
	}
	return out.syncfs()
}

// applyLayer applies the overlay layer src onto the merged tree dst.
func applyLayer(src, dst *dir, carry bool) error {
	names, err := src.names()
	if err != nil {
		return err
	}
	for _, name := range names {
		st, err := src.lstat(name)
		if err != nil {
			return err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			if st.Rdev == 0 && !carry { // whiteout: the name is deleted
				if err := dst.removeAll(name); err != nil {
					return err
				}
				continue
			}
			if err := replaceWithLink(src, dst, name); err != nil {
				return err
			}
		case unix.S_IFDIR:
			if err := applyDir(src, dst, name, carry); err != nil {
				return err
			}
		default: // files, symlinks, fifos, sockets, devices: linked, never followed
			if err := replaceWithLink(src, dst, name); err != nil {
				return err
			}
		}
	}
	return nil
}

func applyDir(src, dst *dir, name string, carry bool) error {
	srcSub, err := src.child(name)
	if err != nil {
		return err
	}
	defer srcSub.Close()
	opaque, err := isOpaque(srcSub)
	if err != nil {
		return err
	}
	dstSt, err := dst.lstat(name)
	exists := err == nil
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	if exists && (dstSt.Mode&unix.S_IFMT != unix.S_IFDIR || opaque) {
		// An opaque dir hides everything below it in the layers beneath;
		// so does a directory over a non-directory (a whiteout among them).
		if err := dst.removeAll(name); err != nil {
			return err
		}
		exists, opaque = false, true
	}
	if !exists {
		if err := unix.Mkdirat(dst.fd(), name, 0o700); err != nil {
			return fmt.Errorf("mkdir %s/%s: %w", dst.f.Name(), name, err)
		}
	}
	dstSub, err := dst.child(name)
	if err != nil {
		return err
	}
	defer dstSub.Close()
	if err := applyLayer(srcSub, dstSub, carry); err != nil {
		return err
	}
	if carry && opaque {
		if err := unix.Fsetxattr(dstSub.fd(), xattrOpaque, []byte("y"), 0); err != nil {
			return err
		}
	}
	return copyDirMetadata(srcSub, dstSub)
}

func replaceWithLink(src, dst *dir, name string) error {
	if err := dst.removeAll(name); err != nil {
		return err
	}
	err := unix.Linkat(src.fd(), name, dst.fd(), name, 0)
	if errors.Is(err, unix.EXDEV) {
		// An image layer's file (another file system): copied.
		err = copyEntry(src, dst, name)
	}
	if err != nil {
		return fmt.Errorf("link %s/%s: %w", src.f.Name(), name, err)
	}
	return nil
}

// copyEntry copies name of src (a file, symlink, FIFO or whiteout) into
// dst, with its owner, mode and times.
func copyEntry(src, dst *dir, name string) error {
	st, err := src.lstat(name)
	if err != nil {
		return err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if err := copyFileData(src, dst, name, st.Size); err != nil {
			return err
		}
	case unix.S_IFLNK:
		target := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(src.fd(), name, target)
		if err != nil {
			return err
		}
		if err := unix.Symlinkat(string(target[:n]), dst.fd(), name); err != nil {
			return err
		}
	case unix.S_IFIFO, unix.S_IFCHR:
		if err := unix.Mknodat(dst.fd(), name, st.Mode&unix.S_IFMT, int(st.Rdev)); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%s: cannot be copied (mode %o)", name, st.Mode)
	}
	if err := unix.Fchownat(dst.fd(), name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if err := unix.Fchmodat(dst.fd(), name, st.Mode&0o7777, 0); err != nil {
			return err
		}
	}
	return unix.UtimesNanoAt(dst.fd(), name, []unix.Timespec{st.Atim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW)
}

func copyFileData(src, dst *dir, name string, size int64) error {
	in, err := unix.Openat(src.fd(), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	inf := os.NewFile(uintptr(in), name)
	defer inf.Close()
	out, err := unix.Openat(dst.fd(), name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	outf := os.NewFile(uintptr(out), name)
	defer outf.Close()
	_, err = io.CopyN(outf, inf, size)
	return err
}

func isOpaque(d *dir) (bool, error) {
	buf := make([]byte, 8)
	n, err := unix.Fgetxattr(d.fd(), xattrOpaque, buf)
	if errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ENOTSUP) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading %s of %s: %w", xattrOpaque, d.f.Name(), err)
	}
	return n == 1 && buf[0] == 'y', nil
}

// copyDirMetadata gives dst src's owner, mode, times and extended
// attributes, except overlay's own.
func copyDirMetadata(src, dst *dir) error {
	var st unix.Stat_t
	if err := unix.Fstat(src.fd(), &st); err != nil {
		return err
	}
	if err := unix.Fchown(dst.fd(), int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("chown %s: %w", dst.f.Name(), err)
	}
	if err := unix.Fchmod(dst.fd(), st.Mode&0o7777); err != nil {
		return fmt.Errorf("chmod %s: %w", dst.f.Name(), err)
	}
	if err := copyXattrs(src, dst); err != nil {
		return err
	}
	ts := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(dst.fd(), "", ts, unix.AT_EMPTY_PATH); err != nil {
		// AT_EMPTY_PATH for utimensat needs Linux 5.8+: fall back to the path.
		if err := unix.UtimesNano(dst.f.Name(), ts); err != nil {
			return fmt.Errorf("setting times of %s: %w", dst.f.Name(), err)
		}
	}
	return nil
}

func copyXattrs(src, dst *dir) error {
	size, err := unix.Flistxattr(src.fd(), nil)
	if err != nil || size == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			return nil
		}
		return err
	}
	buf := make([]byte, size)
	size, err = unix.Flistxattr(src.fd(), buf)
	if err != nil {
		return err
	}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" || strings.HasPrefix(name, xattrOverlayPrefix) {
			continue
		}
		n, err := unix.Fgetxattr(src.fd(), name, nil)
		if err != nil {
			return err
		}
		val := make([]byte, n)
		if n, err = unix.Fgetxattr(src.fd(), name, val); err != nil {
			return err
		}
		if err := unix.Fsetxattr(dst.fd(), name, val[:n], 0); err != nil {
			return fmt.Errorf("setting %s on %s: %w", name, dst.f.Name(), err)
		}
	}
	return nil
}
