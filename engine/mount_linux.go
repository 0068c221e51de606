package engine

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// overlayOptions are set on every mount. The upper dir becomes a lower
// layer on commit, so it must hold nothing that refers back to other
// layers: no redirects, no metacopy-only files, no index.
var overlayOptions = [][2]string{
	{"redirect_dir", "off"},
	{"metacopy", "off"},
	{"index", "off"},
}

// mountOverlay mounts an overlay at target, nodev, and nosuid unless
// setuid: a build's cache is data, and a setuid binary or a device node
// committed by one build must not give the next one the node. lowers are
// ordered top first (as overlayfs wants them).
func mountOverlay(lowers []string, upper, work, target string, setuid bool) error {
	attrs, flags := uint(unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV), uintptr(unix.MS_NOSUID|unix.MS_NODEV)
	if setuid {
		attrs, flags = unix.MOUNT_ATTR_NODEV, unix.MS_NODEV
	}
	err := mountOverlayFsconfig(lowers, upper, work, target, attrs)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, errNoLowerdirPlus) {
		// Kernels before 6.8 have no "lowerdir+"; kernels before 5.2 no
		// fsopen. Fall back to mount(2), whose options must fit in a page.
		return mountOverlayLegacy(lowers, upper, work, target, flags)
	}
	return err
}

var errNoLowerdirPlus = errors.New("kernel has no lowerdir+")

func mountOverlayFsconfig(lowers []string, upper, work, target string, attrs uint) error {
	fd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fd)
	set := func(key, value string) error {
		if err := unix.FsconfigSetString(fd, key, value); err != nil {
			return fmt.Errorf("overlay option %s=%s: %w%s", key, value, err, fsContextLog(fd))
		}
		return nil
	}
	for i, l := range lowers {
		if err := unix.FsconfigSetString(fd, "lowerdir+", l); err != nil {
			if i == 0 && errors.Is(err, unix.EINVAL) {
				return errNoLowerdirPlus
			}
			return fmt.Errorf("overlay lower layer %s: %w%s", l, err, fsContextLog(fd))
		}
	}
	if err := set("upperdir", upper); err != nil {
		return err
	}
	if err := set("workdir", work); err != nil {
		return err
	}
	for _, o := range overlayOptions {
		if err := set(o[0], o[1]); err != nil {
			return err
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fmt.Errorf("creating overlay: %w%s", err, fsContextLog(fd))
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, int(attrs))
	if err != nil {
		return fmt.Errorf("fsmount overlay: %w%s", err, fsContextLog(fd))
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("mounting overlay at %s: %w", target, err)
	}
	return nil
}

// makeReadOnly makes the file system mounted at target read-only: its
// superblock, so that every bind mount of it (the kubelet's, each
// container's) refuses writes, not only this mount point.
func makeReadOnly(target string) error {
	fd, err := unix.Fspick(unix.AT_FDCWD, target, unix.FSPICK_CLOEXEC|unix.FSPICK_NO_AUTOMOUNT|unix.FSPICK_SYMLINK_NOFOLLOW)
	if err != nil {
		return fmt.Errorf("picking the file system at %s: %w", target, err)
	}
	defer unix.Close(fd)
	if err := unix.FsconfigSetFlag(fd, "ro"); err != nil {
		return fmt.Errorf("making %s read-only: %w%s", target, err, fsContextLog(fd))
	}
	if err := unix.FsconfigReconfigure(fd); err != nil {
		return fmt.Errorf("making %s read-only: %w%s", target, err, fsContextLog(fd))
	}
	return nil
}

// fsContextLog reads the messages the kernel left on an fs context (they
// say which option it refused and why).
func fsContextLog(fd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for range 8 {
		n, err := unix.Read(fd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	if len(msgs) == 0 {
		return ""
	}
	return " (" + strings.Join(msgs, "; ") + ")"
}

func mountOverlayLegacy(lowers []string, upper, work, target string, flags uintptr) error {
	var b strings.Builder
	b.WriteString("lowerdir=" + strings.Join(lowers, ":"))
	b.WriteString(",upperdir=" + upper + ",workdir=" + work)
	for _, o := range overlayOptions {
		b.WriteString("," + o[0] + "=" + o[1])
	}
	if b.Len() >= os.Getpagesize() {
		return fmt.Errorf("mounting overlay at %s: %d layers do not fit in the mount options of a kernel without lowerdir+ (compact the cache)", target, len(lowers))
	}
	if err := unix.Mount("overlay", target, "overlay", flags, b.String()); err != nil {
		return fmt.Errorf("mounting overlay at %s: %w", target, err)
	}
	return nil
}

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	// Root is the path within its filesystem that is mounted (a bind
	// mount's source).
	Root       string
	MountPoint string
	FSType     string
	// Lowers lists lower dirs, top first; Upper is the upper dir (overlay).
	Lowers []string
	Upper  string
}

// readMountInfo parses /proc/self/mountinfo. It is the source of truth for
// what is mounted, also right after a restart.
func readMountInfo() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountInfo(f)
}

func parseMountInfo(r io.Reader) ([]mountEntry, error) {
	var out []mountEntry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		sep := -1
		for i := 6; i < len(fields); i++ {
			if fields[i] == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+3 > len(fields) {
			return nil, fmt.Errorf("malformed mountinfo line %q", sc.Text())
		}
		e := mountEntry{Root: unescapeMountInfo(fields[3]), MountPoint: unescapeMountInfo(fields[4]), FSType: fields[sep+1]}
		if e.FSType == "overlay" && sep+3 < len(fields) {
			e.Lowers, e.Upper = parseOverlayOptions(fields[sep+3])
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// parseOverlayOptions reads lowerdir=a:b, lowerdir+=a (one per layer) and
// upperdir=u from an overlay's super options.
func parseOverlayOptions(opts string) (lowers []string, upper string) {
	for _, o := range splitOptions(opts) {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "lowerdir":
			for _, l := range splitUnescaped(v, ':') {
				lowers = append(lowers, unescapeMountInfo(l))
			}
		case "lowerdir+":
			lowers = append(lowers, unescapeMountInfo(v))
		case "upperdir":
			upper = unescapeMountInfo(v)
		}
	}
	return lowers, upper
}

// splitOptions splits super options on commas that are not escaped.
func splitOptions(s string) []string { return splitUnescaped(s, ',') }

func splitUnescaped(s string, sep byte) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case sep:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

// unescapeMountInfo undoes the kernel's octal escapes (\040 for a space)
// and overlay's backslash escapes of ',' and ':'.
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return '0' <= c && c <= '7' }

// unmount detaches the mount at target. A target that is not a mount point
// is not an error.
func unmount(target string) error {
	for {
		err := unix.Unmount(target, 0)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil
		default:
			return fmt.Errorf("unmounting %s: %w", target, err)
		}
	}
}
