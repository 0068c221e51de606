package engine

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// An image layer is a layer kept as one EROFS image file, layers/ID.erofs,
// mounted read-only on layers/ID whenever something reads the layer: a
// pulled layer becomes one file written in one pass, instead of one file
// per entry. Only images this code wrote, from a tar whose digest the
// caller checked, are ever mounted. Commits and compactions stay
// directories.

const imageSuffix = ".erofs"

// maxNameLen is the longest name of an entry, as in other file systems.
const maxNameLen = 255

// erofsSuperMagic is the f_type statfs reports for an EROFS mount.
const erofsSuperMagic = 0xE0F5E1E2

// imageTree is the tree of a tar being turned into an image, with the
// same rules as extract: paths resolved one component at a time inside
// the layer, never through a symlink, later entries replacing earlier.
type imageTree struct {
	root *imageNode
	w    *imageWriter
	now  time.Time
}

func (s *Store) extractImage(l *StagedLayer, r io.Reader, opts ImportOptions) error {
	f, err := os.OpenFile(filepath.Join(l.t.path, l.id+imageSuffix), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	w, err := newImageWriter(f)
	if err != nil {
		return err
	}
	t := &imageTree{w: w, now: time.Now()}
	t.root = t.implicitDir(nil)
	if err := eachEntry(r, l, opts, func(tr *tar.Reader, h *tar.Header) error {
		return t.add(l, tr, h, opts)
	}); err != nil {
		return err
	}
	failpoint("import/image-data-written")
	return w.finish(t.root)
}

func unsafeEntry(name, format string, args ...any) error {
	return fmt.Errorf("%w: entry %q: %s", ErrUnsafeLayer, name, fmt.Sprintf(format, args...))
}

func (t *imageTree) implicitDir(parent *imageNode) *imageNode {
	return &imageNode{mode: unix.S_IFDIR | 0o755, mtime: t.now.Unix(), mtimeNsec: uint32(t.now.Nanosecond()),
		children: map[string]*imageNode{}, parent: parent}
}

// add applies one tar entry to the tree.
func (t *imageTree) add(l *StagedLayer, tr *tar.Reader, h *tar.Header, opts ImportOptions) error {
	rel, err := cleanLayerPath(h.Name)
	if err != nil {
		return unsafeEntry(h.Name, "%v", err)
	}
	if rel == "." {
		return nil // the layer's root: ours
	}
	for _, part := range strings.Split(rel, "/") {
		if len(part) > maxNameLen {
			return unsafeEntry(h.Name, "a name longer than %d bytes", maxNameLen)
		}
	}
	parentRel, base := path.Split(rel)
	parent, err := t.mkdirAll(strings.TrimSuffix(parentRel, "/"))
	if err != nil {
		return unsafeEntry(h.Name, "its directory: %v", err)
	}
	if base == ociOpaque {
		if parent.xattrs == nil {
			parent.xattrs = map[string]string{}
		}
		parent.xattrs[xattrOpaque] = "y"
		return nil
	}
	if name, ok := strings.CutPrefix(base, ociWhiteoutPrefix); ok {
		if name == "" || name == "." || name == ".." {
			return unsafeEntry(h.Name, "a whiteout of nothing")
		}
		parent.children[name] = &imageNode{mode: unix.S_IFCHR, mtime: t.now.Unix(), mtimeNsec: uint32(t.now.Nanosecond())}
		return nil
	}
	n := &imageNode{mode: uint32(h.Mode & 0o7777), uid: uint32(h.Uid), gid: uint32(h.Gid),
		mtime: h.ModTime.Unix(), mtimeNsec: uint32(h.ModTime.Nanosecond())}
	switch h.Typeflag {
	case tar.TypeDir:
		t.addDir(parent, base, n)
		return nil
	case tar.TypeReg:
		return t.addFile(l, tr, h, parent, base, n, opts)
	case tar.TypeSymlink:
		if len(h.Linkname) >= unix.PathMax {
			return unsafeEntry(h.Name, "a symlink target longer than %d bytes", unix.PathMax-1)
		}
		n.mode = unix.S_IFLNK | 0o777
		var err error
		if n.blkaddr, _, err = t.w.data(strings.NewReader(h.Linkname)); err != nil {
			return err
		}
		n.size = uint64(len(h.Linkname))
	case tar.TypeLink:
		return t.addHardLink(h, parent, base)
	case tar.TypeFifo:
		n.mode = unix.S_IFIFO | n.mode&0o777
	case tar.TypeChar, tar.TypeBlock:
		return unsafeEntry(h.Name, "a device file")
	default:
		return unsafeEntry(h.Name, "an entry of type %q", string(h.Typeflag))
	}
	parent.children[base] = n
	return nil
}

// mkdirAll returns directory rel of the tree, creating what is missing;
// a component that is not a directory (a symlink among them) is an error.
func (t *imageTree) mkdirAll(rel string) (*imageNode, error) {
	d := t.root
	if rel == "" || rel == "." {
		return d, nil
	}
	for _, part := range strings.Split(rel, "/") {
		next, ok := d.children[part]
		switch {
		case !ok:
			next = t.implicitDir(d)
			d.children[part] = next
		case !next.isDir():
			return nil, fmt.Errorf("%s: not a directory", part)
		}
		d = next
	}
	return d, nil
}

// addDir makes directory base of parent with n's owner, mode and time,
// keeping the entries of a directory that is already there.
func (t *imageTree) addDir(parent *imageNode, base string, n *imageNode) {
	n.mode |= unix.S_IFDIR
	if old, ok := parent.children[base]; ok && old.isDir() {
		old.mode, old.uid, old.gid, old.mtime, old.mtimeNsec = n.mode, n.uid, n.gid, n.mtime, n.mtimeNsec
		return
	}
	n.children, n.parent = map[string]*imageNode{}, parent
	parent.children[base] = n
}

// addFile writes regular file base's data into the image, within the
// layer's byte bound.
func (t *imageTree) addFile(l *StagedLayer, tr *tar.Reader, h *tar.Header, parent *imageNode, base string, n *imageNode, opts ImportOptions) error {
	if h.Size < 0 || (opts.MaxBytes > 0 && l.Bytes+h.Size > opts.MaxBytes) {
		return unsafeEntry(h.Name, "the layer would hold more than %d bytes", opts.MaxBytes)
	}
	n.mode |= unix.S_IFREG
	blk, size, err := t.w.data(tr)
	l.Bytes += size
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return unsafeEntry(h.Name, "%v", err)
	} else if err != nil {
		return err
	}
	n.blkaddr, n.size = blk, uint64(size)
	parent.children[base] = n
	return nil
}

// addHardLink links base of parent to a regular file added before.
func (t *imageTree) addHardLink(h *tar.Header, parent *imageNode, base string) error {
	target, err := cleanLayerPath(h.Linkname)
	if err != nil || target == "." {
		return unsafeEntry(h.Name, "hard link to %q: outside the layer", h.Linkname)
	}
	if self, _ := cleanLayerPath(h.Name); self == target {
		return unsafeEntry(h.Name, "a hard link to itself")
	}
	d := t.root
	parts := strings.Split(target, "/")
	for _, part := range parts[:len(parts)-1] {
		next, ok := d.children[part]
		if !ok || !next.isDir() {
			return unsafeEntry(h.Name, "hard link to %q: not a regular file of the layer", h.Linkname)
		}
		d = next
	}
	file, ok := d.children[parts[len(parts)-1]]
	if !ok || file.mode&unix.S_IFMT != unix.S_IFREG {
		return unsafeEntry(h.Name, "hard link to %q: not a regular file of the layer", h.Linkname)
	}
	parent.children[base] = file
	return nil
}
