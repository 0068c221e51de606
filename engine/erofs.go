package engine

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// An EROFS image writer: the on-disk format of Linux's read-only file
// system (Documentation/filesystems/erofs.rst), reduced to what a layer
// needs and laid out so that a tar stream is written in one pass. Block 0
// holds the superblock; file data follows, block aligned, in the order the
// stream brings it; then the directories' blocks; then every inode
// (extended, 64 bytes, with inline xattrs), never across a block. Every
// file and directory is FLAT_PLAIN (its data in consecutive blocks),
// uncompressed: the kernel parses only what this code wrote.

const (
	erofsMagic      = 0xE0F5E1E2
	erofsBlockBits  = 12
	erofsBlockSize  = 1 << erofsBlockBits
	erofsSuperOff   = 1024
	erofsInodeSize  = 64 // extended: 32-bit owners, nanosecond mtimes
	erofsDirentSize = 12
	erofsXattrHdr   = 12
	erofsSlotSize   = 32 // a nid counts 32-byte slots of the metadata area
	// EROFS_INODE_LAYOUT_EXTENDED | EROFS_INODE_FLAT_PLAIN << 1
	erofsFormatExtendedPlain = 1
)

// erofs file types, in directory entries.
const (
	erofsFTReg     = 1
	erofsFTDir     = 2
	erofsFTChr     = 3
	erofsFTFifo    = 5
	erofsFTSymlink = 7
)

// Xattr name prefixes the format encodes by index.
var erofsXattrPrefixes = []struct {
	index  uint8
	prefix string
}{
	{2, "system.posix_acl_access"}, {3, "system.posix_acl_default"},
	{1, "user."}, {4, "trusted."}, {6, "security."},
}

// imageNode is one inode of an image being written.
type imageNode struct {
	mode       uint32 // type and permission bits, as st_mode
	uid, gid   uint32
	mtime      int64
	mtimeNsec  uint32
	size       uint64
	blkaddr    uint32 // first block of its data
	xattrs     map[string]string
	children   map[string]*imageNode // directories only
	parent     *imageNode            // directories only (nil: the root)
	nlink      uint32
	nid        uint64
	ino        uint32
	assigned   bool
	dirEntries []string // sorted, with "." and "..", once laid out
}

func (n *imageNode) isDir() bool { return n.mode&unix.S_IFMT == unix.S_IFDIR }

// imageWriter writes an EROFS image to f, data first.
type imageWriter struct {
	f   *os.File
	w   *bufio.Writer
	off int64 // bytes written so far (the next data block's offset, once padded)
}

func newImageWriter(f *os.File) (*imageWriter, error) {
	w := &imageWriter{f: f, w: bufio.NewWriterSize(f, 1<<20)}
	// Block 0 stays zero until finish writes the superblock into it.
	if err := w.pad(erofsBlockSize); err != nil {
		return nil, err
	}
	return w, nil
}

var zeroBlock [erofsBlockSize]byte

// pad writes n zero bytes.
func (w *imageWriter) pad(n int) error {
	for n > 0 {
		m, err := w.w.Write(zeroBlock[:min(n, erofsBlockSize)])
		w.off += int64(m)
		if err != nil {
			return err
		}
		n -= m
	}
	return nil
}

// alignBlock pads to the next block boundary.
func (w *imageWriter) alignBlock() error {
	if r := int(w.off % erofsBlockSize); r != 0 {
		return w.pad(erofsBlockSize - r)
	}
	return nil
}

// data writes what r holds (up to max bytes, none if max is 0) as the
// next file's data and returns its first block and size.
func (w *imageWriter) data(r io.Reader) (blkaddr uint32, n int64, err error) {
	if err := w.alignBlock(); err != nil {
		return 0, 0, err
	}
	start := w.off
	n, err = io.Copy(w.w, r)
	w.off += n
	if err != nil {
		return 0, n, err
	}
	if n == 0 {
		return 0, 0, nil
	}
	return w.block(start)
}

func (w *imageWriter) block(off int64) (uint32, int64, error) {
	b := off / erofsBlockSize
	if b > 1<<32-1 {
		return 0, 0, errors.New("an image larger than 16 TiB")
	}
	return uint32(b), w.off - off, nil
}

// finish writes the directories, the inodes and the superblock of the tree
// under root, and syncs the file. Nids count from the metadata area's
// start, so they are planned first, and the directories written with them.
func (w *imageWriter) finish(root *imageNode) error {
	nodes := orderNodes(root)
	metaBytes := planInodes(nodes)
	for _, n := range nodes {
		if n.isDir() {
			if err := w.writeDir(n); err != nil {
				return err
			}
		}
	}
	if err := w.alignBlock(); err != nil {
		return err
	}
	metaStart := w.off
	if err := w.writeInodes(nodes, metaBytes); err != nil {
		return err
	}
	if err := w.alignBlock(); err != nil {
		return err
	}
	if err := w.w.Flush(); err != nil {
		return err
	}
	if _, err := w.f.WriteAt(superblock(root, len(nodes), metaStart, w.off), erofsSuperOff); err != nil {
		return err
	}
	return w.f.Sync()
}

// orderNodes lists the inodes reachable from root, breadth first (root
// first, so that its nid, 0, fits the superblock's 16 bits), each once,
// with its link count and its directory entries sorted.
func orderNodes(root *imageNode) []*imageNode {
	var nodes []*imageNode
	root.assigned = true
	queue := []*imageNode{root}
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		nodes = append(nodes, n)
		if !n.isDir() {
			continue
		}
		n.nlink = 2
		n.dirEntries = append(slices.Collect(maps.Keys(n.children)), ".", "..")
		slices.Sort(n.dirEntries)
		for _, name := range n.dirEntries {
			c := n.children[name]
			switch {
			case c == nil: // "." and ".."
				continue
			case c.isDir():
				n.nlink++
			case c.assigned:
				c.nlink++ // another hard link to a file seen before
				continue
			default:
				c.nlink = 1
			}
			c.assigned = true
			queue = append(queue, c)
		}
	}
	return nodes
}

// planInodes gives each node its nid: its place in the metadata area, in
// 32-byte slots, never across a block boundary. It returns the area's
// size.
func planInodes(nodes []*imageNode) int64 {
	var off int64
	for i, n := range nodes {
		size := int64(erofsInodeSize + xattrBodySize(n.xattrs))
		if r := off % erofsBlockSize; r+size > erofsBlockSize {
			off += erofsBlockSize - r
		}
		n.nid, n.ino = uint64(off/erofsSlotSize), uint32(i+1)
		off += (size + erofsSlotSize - 1) / erofsSlotSize * erofsSlotSize
	}
	return off
}

// writeDir writes n's entries in blocks (each block: its dirents, then
// their names; sorted by name across blocks, as lookups bisect) as n's
// data.
func (w *imageWriter) writeDir(n *imageNode) error {
	if err := w.alignBlock(); err != nil {
		return err
	}
	n.blkaddr = uint32(w.off / erofsBlockSize)
	blocks := dirBlocks(n.dirEntries)
	var buf [erofsBlockSize]byte
	for i, blk := range blocks {
		clear(buf[:])
		nameOff := erofsDirentSize * len(blk.names)
		for j, name := range blk.names {
			c := n.children[name]
			nid, ft := uint64(0), uint8(erofsFTDir)
			switch {
			case name == ".":
				nid = n.nid
			case name == "..":
				nid = n.parentNid()
			default:
				nid, ft = c.nid, c.fileType()
			}
			d := buf[j*erofsDirentSize:]
			binary.LittleEndian.PutUint64(d[0:], nid)
			binary.LittleEndian.PutUint16(d[8:], uint16(nameOff))
			d[10] = ft
			nameOff += copy(buf[nameOff:], name)
		}
		n.size += uint64(blk.used)
		out := buf[:]
		if i == len(blocks)-1 {
			out = buf[:blk.used]
		}
		if _, err := w.w.Write(out); err != nil {
			return err
		}
		w.off += int64(len(out))
	}
	return nil
}

type dirBlock struct {
	names []string
	used  int // bytes used in the block (every block but the last: all)
}

// dirBlocks packs sorted names into directory blocks.
func dirBlocks(names []string) []dirBlock {
	var blocks []dirBlock
	cur := dirBlock{}
	for _, name := range names {
		need := erofsDirentSize + len(name)
		if cur.used+need > erofsBlockSize {
			cur.used = erofsBlockSize
			blocks = append(blocks, cur)
			cur = dirBlock{}
		}
		cur.names = append(cur.names, name)
		cur.used += need
	}
	return append(blocks, cur)
}

func (n *imageNode) fileType() uint8 {
	switch n.mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return erofsFTDir
	case unix.S_IFLNK:
		return erofsFTSymlink
	case unix.S_IFCHR:
		return erofsFTChr
	case unix.S_IFIFO:
		return erofsFTFifo
	default:
		return erofsFTReg
	}
}

func (n *imageNode) parentNid() uint64 {
	if n.parent == nil {
		return n.nid // the root is its own parent
	}
	return n.parent.nid
}

// writeInodes writes every node's inode and inline xattrs at its nid.
func (w *imageWriter) writeInodes(nodes []*imageNode, size int64) error {
	meta := make([]byte, size)
	for _, n := range nodes {
		b := meta[n.nid*erofsSlotSize:]
		binary.LittleEndian.PutUint16(b[0:], erofsFormatExtendedPlain)
		if xs := xattrBodySize(n.xattrs); xs > 0 {
			binary.LittleEndian.PutUint16(b[2:], uint16((xs-erofsXattrHdr)/4+1))
			putXattrs(b[erofsInodeSize:], n.xattrs)
		}
		binary.LittleEndian.PutUint16(b[4:], uint16(n.mode))
		binary.LittleEndian.PutUint64(b[8:], n.size)
		binary.LittleEndian.PutUint32(b[16:], n.blkaddr) // rdev 0 for a whiteout
		binary.LittleEndian.PutUint32(b[20:], n.ino)
		binary.LittleEndian.PutUint32(b[24:], n.uid)
		binary.LittleEndian.PutUint32(b[28:], n.gid)
		binary.LittleEndian.PutUint64(b[32:], uint64(max(n.mtime, 0)))
		binary.LittleEndian.PutUint32(b[40:], n.mtimeNsec)
		binary.LittleEndian.PutUint32(b[44:], n.nlink)
	}
	n, err := w.w.Write(meta)
	w.off += int64(n)
	return err
}

// xattrBodySize is the size of the inline xattrs: a header, then each
// entry (4 bytes, the name's suffix, the value) padded to 4 bytes.
func xattrBodySize(xattrs map[string]string) int {
	if len(xattrs) == 0 {
		return 0
	}
	size := erofsXattrHdr
	for name, value := range xattrs {
		_, suffix, _ := xattrIndex(name)
		size += (4 + len(suffix) + len(value) + 3) &^ 3
	}
	return size
}

// xattrIndex splits an xattr name into the format's prefix index and the
// rest; ok is false for a name no prefix covers.
func xattrIndex(name string) (index uint8, suffix string, ok bool) {
	for _, p := range erofsXattrPrefixes {
		if s, found := strings.CutPrefix(name, p.prefix); found {
			return p.index, s, true
		}
	}
	return 0, name, false
}

func putXattrs(b []byte, xattrs map[string]string) {
	off := erofsXattrHdr // h_name_filter, h_shared_count, reserved: zero
	for _, name := range slices.Sorted(maps.Keys(xattrs)) {
		index, suffix, _ := xattrIndex(name)
		value := xattrs[name]
		b[off] = uint8(len(suffix))
		b[off+1] = index
		binary.LittleEndian.PutUint16(b[off+2:], uint16(len(value)))
		copy(b[off+4:], suffix)
		copy(b[off+4+len(suffix):], value)
		off += (4 + len(suffix) + len(value) + 3) &^ 3
	}
}

// superblock is the 128-byte superblock of an image of inodes inodes
// whose metadata area starts at metaStart and which ends at end.
func superblock(root *imageNode, inodes int, metaStart, end int64) []byte {
	sb := make([]byte, 128)
	binary.LittleEndian.PutUint32(sb[0:], erofsMagic)
	sb[12] = erofsBlockBits
	binary.LittleEndian.PutUint16(sb[14:], uint16(root.nid))
	binary.LittleEndian.PutUint64(sb[16:], uint64(inodes))
	binary.LittleEndian.PutUint32(sb[36:], uint32(end/erofsBlockSize))
	binary.LittleEndian.PutUint32(sb[40:], uint32(metaStart/erofsBlockSize))
	return sb
}
