package engine

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A layer as an OCI image layer (a tar stream, uncompressed here: callers
// compress), so that caches can be kept in a registry. The OCI image spec's
// layer format differs from an overlay layer only in how deletions are
// written: an overlay whiteout (a character device 0/0) is an empty file
// ".wh.NAME", an opaque directory (xattr trusted.overlay.opaque=y) has an
// empty file ".wh..wh..opq".

const (
	ociWhiteoutPrefix = ".wh."
	ociOpaque         = ".wh..wh..opq"
)

// ErrUnsafeLayer is wrapped by the errors of ImportLayer about what the
// archive holds (not about reading it or the disk).
var ErrUnsafeLayer = errors.New("unsafe layer")

// ErrNotEncodable is wrapped by the errors of WriteLayerTar about what the
// layer holds that an OCI layer cannot carry (a device file, a name
// starting with ".wh."): writing it again will fail again.
var ErrNotEncodable = errors.New("cannot be carried in an OCI layer")

// WriteLayerTar writes layer id of cache k to w as an OCI layer tar: files,
// directories, symlinks, hard links (within the layer), FIFOs, their modes,
// owners and modification times, with overlay whiteouts and opaque
// directories as OCI whiteouts. The same layer gives the same bytes
// (entries sorted, no access or change times, no user or group names), so
// its digest is stable. Sockets are left out. A layer holding a device
// file (other than a whiteout) or a name starting with ".wh." cannot be
// written (ErrNotEncodable).
func (s *Store) WriteLayerTar(k Key, id string, w io.Writer) error {
	if err := k.Validate(); err != nil {
		return err
	}
	if err := validateLayerID(id); err != nil {
		return err
	}
	root, err := openRoot(s.root)
	if err != nil {
		return err
	}
	defer root.Close()
	if _, err := s.readyLayer(k, id); err != nil {
		return err
	}
	layer, err := root.openBeneath(filepath.Join(dirCaches, k.Namespace, k.Name, dirLayers, id))
	if err != nil {
		return fmt.Errorf("layer %s of %s: %w", id, k, err)
	}
	defer layer.Close()
	tw := tar.NewWriter(w)
	lw := &layerWriter{tw: tw, links: map[inodeKey]string{}}
	if err := lw.dir(layer, ""); err != nil {
		return fmt.Errorf("writing layer %s of %s: %w", id, k, err)
	}
	return tw.Close()
}

type layerWriter struct {
	tw    *tar.Writer
	links map[inodeKey]string // first path of each multiply linked file
}

func tarTime(ts unix.Timespec) time.Time { return time.Unix(ts.Sec, ts.Nsec).UTC() }

// header is the tar header of an entry of d, whatever its type.
func header(name string, st *unix.Stat_t) *tar.Header {
	return &tar.Header{
		Name: name, Mode: int64(st.Mode & 0o7777), Uid: int(st.Uid), Gid: int(st.Gid),
		ModTime: tarTime(st.Mtim), Format: tar.FormatPAX,
	}
}

// dir writes the entries of d (at rel in the layer), sorted, depth first.
func (lw *layerWriter) dir(d *dir, rel string) error {
	opaque, err := isOpaque(d)
	if err != nil {
		return err
	}
	if opaque {
		if err := lw.tw.WriteHeader(&tar.Header{Name: path.Join(rel, ociOpaque), Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	names, err := d.names()
	if err != nil {
		return err
	}
	slices.Sort(names)
	for _, name := range names {
		if strings.HasPrefix(name, ociWhiteoutPrefix) {
			return fmt.Errorf("%s: a name starting with %q: %w", path.Join(rel, name), ociWhiteoutPrefix, ErrNotEncodable)
		}
		st, err := d.lstat(name)
		if err != nil {
			return err
		}
		if err := lw.entry(d, rel, name, &st); err != nil {
			return err
		}
	}
	return nil
}

func (lw *layerWriter) entry(d *dir, rel, name string, st *unix.Stat_t) error {
	p := path.Join(rel, name)
	h := header(p, st)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		h.Typeflag, h.Name = tar.TypeDir, p+"/"
		if err := lw.tw.WriteHeader(h); err != nil {
			return err
		}
		sub, err := d.child(name)
		if err != nil {
			return err
		}
		defer sub.Close()
		return lw.dir(sub, p)
	case unix.S_IFREG:
		return lw.file(d, name, p, h, st)
	case unix.S_IFLNK:
		target := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(d.fd(), name, target)
		if err != nil {
			return fmt.Errorf("reading link %s: %w", p, err)
		}
		h.Typeflag, h.Linkname = tar.TypeSymlink, string(target[:n])
		return lw.tw.WriteHeader(h)
	case unix.S_IFCHR:
		if st.Rdev != 0 {
			return fmt.Errorf("%s is a device file: %w", p, ErrNotEncodable)
		}
		return lw.tw.WriteHeader(&tar.Header{Name: path.Join(rel, ociWhiteoutPrefix+name), Typeflag: tar.TypeReg, Format: tar.FormatPAX})
	case unix.S_IFIFO:
		h.Typeflag = tar.TypeFifo
		return lw.tw.WriteHeader(h)
	case unix.S_IFSOCK:
		// A socket means nothing without the process that listened on it
		// (a build tool's agent left it behind): it is not carried, as
		// tar and container image builders leave sockets out.
		return nil
	default:
		return fmt.Errorf("%s is a device file: %w", p, ErrNotEncodable)
	}
}

// file writes regular file name of d (at p in the layer), or a hard link
// to the first path of its inode that the layer wrote.
func (lw *layerWriter) file(d *dir, name, p string, h *tar.Header, st *unix.Stat_t) error {
	ino := inodeKey{uint64(st.Dev), st.Ino}
	if first, ok := lw.links[ino]; ok {
		h.Typeflag, h.Linkname = tar.TypeLink, first
		return lw.tw.WriteHeader(h)
	}
	if st.Nlink > 1 {
		lw.links[ino] = p
	}
	h.Typeflag, h.Size = tar.TypeReg, st.Size
	fd, err := unix.Openat(d.fd(), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", p, err)
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	if err := lw.tw.WriteHeader(h); err != nil {
		return err
	}
	if _, err := io.CopyN(lw.tw, f, st.Size); err != nil {
		return fmt.Errorf("reading %s: %w", p, err)
	}
	return nil
}

// ImportOptions bound an import.
type ImportOptions struct {
	// MaxBytes bounds the bytes of all files of the layer; MaxEntries the
	// number of entries. Zero means no bound.
	MaxBytes, MaxEntries int64
}

// StagedLayer is a layer extracted into the store's temporary area, not
// yet part of any cache: PublishLayers makes it one, Discard drops it. GC
// leaves it alone while it is held.
type StagedLayer struct {
	t      *tempDir
	id     string
	reused bool
	image  bool // an EROFS image, ID.erofs, not a directory
	// Bytes and Entries are what the layer holds.
	Bytes, Entries int64
	// Digest, if set (by the importer, once it checked the blob), is
	// recorded with the layer when it is published.
	Digest *LayerDigest
}

// Discard removes a staged layer that will not be published.
func (l *StagedLayer) Discard(s *Store) {
	if l == nil || l.t == nil {
		return
	}
	s.removeTemp(l.t.path)
	l.t.release()
	l.t = nil
}

// ImportLayer extracts an OCI layer tar from r into a staged layer. It is
// the engine's border with content from elsewhere (a registry), so it
// trusts nothing in the archive: every path is resolved inside the layer,
// one component at a time, never through a symlink (RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS); absolute paths and "..", hard links to anything
// but a regular file of the same layer, device files, and more than opts
// allow are refused with an error wrapping ErrUnsafeLayer, and nothing is
// left behind. OCI whiteouts become overlay whiteouts again.
func (s *Store) ImportLayer(r io.Reader, opts ImportOptions) (*StagedLayer, error) {
	t, err := s.newTempDir("import")
	if err != nil {
		return nil, err
	}
	staged := &StagedLayer{t: t, id: randomID()}
	extract := s.extract
	if format, _ := s.ImportFormat(); format == LayerFormatImage {
		staged.image, extract = true, s.extractImage
	}
	if err := extract(staged, r, opts); err != nil {
		staged.Discard(s)
		return nil, err
	}
	return staged, nil
}

// StageFile creates a file in the store's temporary area, on the store's
// own disk, for data to be checked before the store uses it (a pulled
// blob, before its digest is known good). done closes and removes it;
// after a crash, GC does.
func (s *Store) StageFile(kind string) (f *os.File, done func(), err error) {
	t, err := s.newTempDir(kind)
	if err != nil {
		return nil, nil, err
	}
	f, err = os.OpenFile(filepath.Join(t.path, "data"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.done(s)
		return nil, nil, fmt.Errorf("creating a staging file: %w", err)
	}
	return f, func() { f.Close(); t.done(s) }, nil
}

// eachEntry calls fn with each entry of the tar r, counting them in l
// against opts.MaxEntries; an archive that cannot be read is unsafe.
func eachEntry(r io.Reader, l *StagedLayer, opts ImportOptions, fn func(*tar.Reader, *tar.Header) error) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: reading the archive: %v", ErrUnsafeLayer, err)
		}
		l.Entries++
		if opts.MaxEntries > 0 && l.Entries > opts.MaxEntries {
			return unsafeEntry(h.Name, "more than %d entries", opts.MaxEntries)
		}
		if err := fn(tr, h); err != nil {
			return err
		}
	}
}

type dirTimes struct {
	rel string
	ts  []unix.Timespec
}

func (s *Store) extract(l *StagedLayer, r io.Reader, opts ImportOptions) error {
	if err := os.Mkdir(filepath.Join(l.t.path, l.id), 0o755); err != nil {
		return err
	}
	root, err := openRoot(filepath.Join(l.t.path, l.id))
	if err != nil {
		return err
	}
	defer root.Close()

	var dirs []dirTimes
	err = eachEntry(r, l, opts, func(tr *tar.Reader, h *tar.Header) error {
		rel, err := cleanLayerPath(h.Name)
		if err != nil {
			return unsafeEntry(h.Name, "%v", err)
		}
		if rel == "." {
			return nil // the layer's root: ours
		}
		parentRel, base := path.Split(rel)
		parent, err := mkdirAllBeneath(root, strings.TrimSuffix(parentRel, "/"))
		if err != nil {
			return unsafeEntry(h.Name, "its directory: %v", err)
		}
		err = s.extractEntry(l, tr, h, root, parent, rel, base, opts, &dirs)
		parent.Close()
		if err != nil && !errors.Is(err, ErrUnsafeLayer) {
			return unsafeEntry(h.Name, "%v", err)
		}
		return err
	})
	if err != nil {
		return err
	}
	// Directories' times last, deepest first: their entries changed them.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := unix.UtimesNanoAt(root.fd(), dirs[i].rel, dirs[i].ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	// The layer is published once extracted: its data must be on disk
	// first, as a commit's and a compaction's are.
	return root.syncfs()
}

func (s *Store) extractEntry(l *StagedLayer, tr *tar.Reader, h *tar.Header, root, parent *dir, rel, base string, opts ImportOptions, dirs *[]dirTimes) error {
	ts := []unix.Timespec{unix.NsecToTimespec(h.ModTime.UnixNano()), unix.NsecToTimespec(h.ModTime.UnixNano())}
	mode := uint32(h.Mode & 0o7777)
	if base == ociOpaque {
		return unix.Fsetxattr(parent.fd(), xattrOpaque, []byte("y"), 0)
	}
	if name, ok := strings.CutPrefix(base, ociWhiteoutPrefix); ok {
		if name == "" || name == "." || name == ".." {
			return fmt.Errorf("%w: entry %q: a whiteout of nothing", ErrUnsafeLayer, h.Name)
		}
		if err := parent.removeAll(name); err != nil {
			return err
		}
		return unix.Mknodat(parent.fd(), name, unix.S_IFCHR, 0)
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if err := extractDir(h, parent, base, mode); err != nil {
			return err
		}
		*dirs = append(*dirs, dirTimes{rel, ts})
		return nil
	case tar.TypeReg:
		return extractFile(l, tr, h, parent, base, mode, ts, opts)
	case tar.TypeSymlink:
		if err := parent.removeAll(base); err != nil {
			return err
		}
		// Created, never followed: nothing here opens a path through it.
		if err := unix.Symlinkat(h.Linkname, parent.fd(), base); err != nil {
			return err
		}
		if err := unix.Fchownat(parent.fd(), base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		return unix.UtimesNanoAt(parent.fd(), base, ts, unix.AT_SYMLINK_NOFOLLOW)
	case tar.TypeLink:
		return extractHardLink(h, root, parent, base)
	case tar.TypeFifo:
		if err := parent.removeAll(base); err != nil {
			return err
		}
		if err := unix.Mkfifoat(parent.fd(), base, mode&0o777); err != nil {
			return err
		}
		if err := unix.Fchownat(parent.fd(), base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		// Its mode as written (mkfifo applies the umask), and its time.
		if err := unix.Fchmodat(parent.fd(), base, mode&0o777, 0); err != nil {
			return err
		}
		return unix.UtimesNanoAt(parent.fd(), base, ts, unix.AT_SYMLINK_NOFOLLOW)
	case tar.TypeChar, tar.TypeBlock:
		return fmt.Errorf("%w: entry %q: a device file", ErrUnsafeLayer, h.Name)
	default:
		return fmt.Errorf("%w: entry %q: an entry of type %q", ErrUnsafeLayer, h.Name, string(h.Typeflag))
	}
}

// extractDir makes directory base of parent (replacing a non-directory),
// with the entry's owner and mode; its times are set once it is filled.
func extractDir(h *tar.Header, parent *dir, base string, mode uint32) error {
	st, err := parent.lstat(base)
	switch {
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR:
	case err == nil:
		if err := parent.removeAll(base); err != nil {
			return err
		}
		fallthrough
	case errors.Is(err, unix.ENOENT):
		if err := unix.Mkdirat(parent.fd(), base, 0o700); err != nil {
			return err
		}
	default:
		return err
	}
	if err := unix.Fchownat(parent.fd(), base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	return unix.Fchmodat(parent.fd(), base, mode, 0)
}

// extractFile writes regular file base of parent from the archive, within
// the layer's byte bound.
func extractFile(l *StagedLayer, tr *tar.Reader, h *tar.Header, parent *dir, base string, mode uint32, ts []unix.Timespec, opts ImportOptions) error {
	if h.Size < 0 || (opts.MaxBytes > 0 && l.Bytes+h.Size > opts.MaxBytes) {
		return fmt.Errorf("%w: entry %q: the layer would hold more than %d bytes", ErrUnsafeLayer, h.Name, opts.MaxBytes)
	}
	if err := parent.removeAll(base); err != nil {
		return err
	}
	fd, err := unix.Openat(parent.fd(), base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	n, err := io.Copy(f, tr)
	l.Bytes += n
	if err != nil {
		return fmt.Errorf("%w: entry %q: %v", ErrUnsafeLayer, h.Name, err)
	}
	if err := f.Chown(h.Uid, h.Gid); err != nil {
		return err
	}
	if err := f.Chmod(os.FileMode(mode&0o777) | unixModeBits(mode)); err != nil {
		return err
	}
	return unix.UtimesNanoAt(parent.fd(), base, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// extractHardLink links base of parent to a regular file extracted before
// in the same layer, resolved beneath the layer's root.
func extractHardLink(h *tar.Header, root, parent *dir, base string) error {
	target, err := cleanLayerPath(h.Linkname)
	if err != nil || target == "." {
		return fmt.Errorf("%w: entry %q: hard link to %q: outside the layer", ErrUnsafeLayer, h.Name, h.Linkname)
	}
	tParentRel, tBase := path.Split(target)
	tParent, err := root.openBeneath(strings.TrimSuffix(tParentRel, "/"))
	if err != nil {
		return fmt.Errorf("%w: entry %q: hard link to %q: %v", ErrUnsafeLayer, h.Name, h.Linkname, err)
	}
	defer tParent.Close()
	st, err := tParent.lstat(tBase)
	if err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("%w: entry %q: hard link to %q: not a regular file of the layer", ErrUnsafeLayer, h.Name, h.Linkname)
	}
	if err := parent.removeAll(base); err != nil {
		return err
	}
	return unix.Linkat(tParent.fd(), tBase, parent.fd(), base, 0)
}

// unixModeBits turns setuid, setgid and sticky bits into os.FileMode's.
func unixModeBits(mode uint32) os.FileMode {
	var m os.FileMode
	if mode&unix.S_ISUID != 0 {
		m |= os.ModeSetuid
	}
	if mode&unix.S_ISGID != 0 {
		m |= os.ModeSetgid
	}
	if mode&unix.S_ISVTX != 0 {
		m |= os.ModeSticky
	}
	return m
}

// cleanLayerPath returns name as a clean path relative to a layer's root,
// or an error if it is absolute or leaves the root.
func cleanLayerPath(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", errors.New("an absolute path")
	}
	if strings.ContainsRune(name, 0) {
		return "", errors.New("a NUL in the path")
	}
	p := path.Clean(name)
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", errors.New(`a path that leaves the layer ("..")`)
	}
	return p, nil
}

// mkdirAllBeneath opens directory rel below root, creating what is
// missing, never through a symlink.
func mkdirAllBeneath(root *dir, rel string) (*dir, error) {
	d, err := root.openBeneath("")
	if err != nil {
		return nil, err
	}
	if rel == "" || rel == "." {
		return d, nil
	}
	for _, part := range strings.Split(rel, "/") {
		next, err := d.child(part)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(d.fd(), part, 0o755); err != nil {
				d.Close()
				return nil, err
			}
			next, err = d.child(part)
		}
		d.Close()
		if err != nil {
			return nil, err
		}
		d = next
	}
	return d, nil
}

// PublishOptions describe an import's generation.
type PublishOptions struct {
	Labels map[string]string
	// ContentTime is when the content was committed where it came from
	// (zero: now).
	ContentTime time.Time
}

// Reuse names a layer cache k already has, for PublishLayers to put in the
// new generation as it is (a layer pulled before, found by its digest).
func Reuse(id string) *StagedLayer { return &StagedLayer{id: id, reused: true} }

// PublishLayers makes layers, bottom first, the next generation of cache
// k: staged layers move into the cache under its lock, reused ones must
// still be there, and the head moves to them atomically, as a commit does
// (source "import"). It refuses, with ErrStale, content committed no later
// than the head (checked under the lock, so a commit made while the layers
// were fetched is never replaced by older content). The staged layers are
// spent either way.
func (s *Store) PublishLayers(k Key, layers []*StagedLayer, opts PublishOptions) (Generation, error) {
	defer func() {
		for _, l := range layers {
			l.Discard(s)
		}
	}()
	if len(layers) == 0 {
		return Generation{}, errors.New("no layers to publish")
	}
	lock, err := s.lockCache(k)
	if err != nil {
		return Generation{}, err
	}
	defer lock.unlock()
	g := Generation{Created: time.Now().UTC(), Source: "import", Labels: opts.Labels}
	if !opts.ContentTime.IsZero() {
		t := opts.ContentTime.UTC()
		g.ContentTime = &t
	}
	if head, ok, err := s.head(k); err != nil {
		return Generation{}, err
	} else if ok && !head.Committed().Before(g.Committed()) {
		return Generation{}, fmt.Errorf("importing into %s content committed at %s: the head (generation %d) was committed at %s: %w",
			k, g.Committed().Format(time.RFC3339Nano), head.Number, head.Committed().Format(time.RFC3339Nano), ErrStale)
	}
	if err := s.ensureCacheDirs(k); err != nil {
		return Generation{}, err
	}
	if g.Layers, err = s.placeLayers(k, layers); err != nil {
		return Generation{}, err
	}
	failpoint("import/layers-placed")
	for _, l := range layers {
		if !l.reused && l.Digest != nil {
			if err := s.writeLayerDigest(k, l.id, *l.Digest); err != nil {
				return Generation{}, err
			}
		}
	}
	g.Identity = g.Layers[len(g.Layers)-1]
	if g.Number, err = s.nextGeneration(k); err != nil {
		return Generation{}, err
	}
	if err := s.publish(k, g); err != nil {
		return Generation{}, err
	}
	failpoint("import/published")
	return g, nil
}

// placeLayers moves staged layers into cache k and checks that reused ones
// are there; it returns their IDs. The caller holds k's lock (GC takes it
// too: a layer found here stays).
func (s *Store) placeLayers(k Key, layers []*StagedLayer) ([]string, error) {
	ids := make([]string, 0, len(layers))
	for _, l := range layers {
		switch {
		case l != nil && l.reused:
			if err := validateLayerID(l.id); err != nil {
				return nil, err
			}
			if ok, err := s.layerExists(k, l.id); err != nil {
				return nil, fmt.Errorf("reusing layer %s: %w", l.id, err)
			} else if !ok {
				return nil, fmt.Errorf("reusing layer %s of %s: %w", l.id, k, ErrLayerGone)
			}
		case l == nil || l.t == nil:
			return nil, errors.New("a staged layer was already spent")
		case l.image:
			// The mount point is made when the layer is first read.
			if err := os.Rename(filepath.Join(l.t.path, l.id+imageSuffix), s.imagePath(k, l.id)); err != nil {
				return nil, fmt.Errorf("publishing layer %s: %w", l.id, err)
			}
		default:
			if err := os.Rename(filepath.Join(l.t.path, l.id), s.layerPath(k, l.id)); err != nil {
				return nil, fmt.Errorf("publishing layer %s: %w", l.id, err)
			}
		}
		ids = append(ids, l.id)
	}
	return ids, syncDir(filepath.Join(s.cacheDir(k), dirLayers))
}

// ID is the layer's ID in the store (once published).
func (l *StagedLayer) ID() string { return l.id }
