package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/layercache/layercache/engine"
)

type mountOutput struct {
	Volume *engine.Volume `json:"volume"`
	Target string         `json:"target"`
}

func (c *cli) mount(args []string) error {
	k, err := parseKey(args[0])
	if err != nil {
		return err
	}
	target, err := absTarget(args[1])
	if err != nil {
		return err
	}
	if err := checkEmptyDir(target); err != nil {
		return err
	}
	var from []engine.Key
	if list := c.flags.Lookup("from").Value.String(); list != "" {
		for _, item := range strings.Split(list, ",") {
			f, err := parseKey(strings.TrimSpace(item))
			if err != nil {
				return usagef("--from: %s", err)
			}
			from = append(from, f)
		}
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	id := "cli-" + hex.EncodeToString(b[:])
	v, err := c.store.CreateVolume(id, k, engine.VolumeOptions{
		Writable: c.boolFlag("write"),
		Setuid:   c.boolFlag("setuid"),
		Labels:   map[string]string{"layercache.io/source": "cli"},
		From:     from,
	})
	if err != nil {
		return err
	}
	if err := c.store.Mount(id, target); err != nil {
		// Nothing half-done: the volume goes away with the failed mount.
		if derr := c.store.Discard(id); derr != nil {
			return fmt.Errorf("%w (and removing volume %s: %w)", err, id, derr)
		}
		return err
	}
	if c.output == "json" {
		return c.json(mountOutput{Volume: v, Target: target})
	}
	mode := "writes stay private and are discarded at umount"
	if v.Writable {
		mode = "writable cache (umount --commit to keep the writes)"
	}
	start := "empty: first use of this cache"
	switch {
	case v.From != nil:
		start = fmt.Sprintf("from fallback cache %s: generation %d, %d layer(s)", v.From, v.Generation, len(v.Layers))
	case v.Generation > 0:
		start = fmt.Sprintf("generation %d, %d layer(s)", v.Generation, len(v.Layers))
	}
	fmt.Fprintf(c.out, "mounted %s at %s (%s; %s; volume %s)\n", k, target, start, mode, id)
	return nil
}

// checkEmptyDir accepts a missing path or an empty directory: mounting over
// content would hide it.
func checkEmptyDir(target string) error {
	st, err := os.Stat(target)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return usagef("target %s is not a directory", target)
	}
	f, err := os.Open(target)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Readdirnames(1); !errors.Is(err, io.EOF) {
		if err != nil {
			return err
		}
		return usagef("target %s is not empty", target)
	}
	return nil
}

type umountOutput struct {
	Volume  string                `json:"volume"`
	Cache   engine.Key            `json:"cache"`
	Commit  *engine.CommitResult  `json:"commit,omitempty"`
	Compact *engine.CompactResult `json:"compact,omitempty"`
}

func (c *cli) umount(args []string) error {
	target, err := absTarget(args[0])
	if err != nil {
		return err
	}
	id, err := c.store.VolumeAt(target)
	if errors.Is(err, engine.ErrNotFound) {
		return usagef("%s is not a layercache mount of %s", target, c.store.Root())
	}
	if err != nil {
		return err
	}
	v, err := c.store.Volume(id)
	if err != nil {
		return err
	}
	commit := c.boolFlag("commit")
	if commit && !v.Writable {
		return usagef("%s was mounted without --write: it cannot be committed (umount without --commit to discard it)", target)
	}
	if err := c.store.Unmount(id); err != nil {
		return err
	}
	out := umountOutput{Volume: id, Cache: v.Cache}
	if !commit {
		if err := c.store.Discard(id); err != nil {
			return err
		}
		if c.output == "json" {
			return c.json(out)
		}
		fmt.Fprintf(c.out, "unmounted %s; writes discarded\n", target)
		return nil
	}
	res, err := c.store.Commit(id)
	if err != nil {
		return err
	}
	out.Commit = &res
	if res.Committed && !c.boolFlag("no-compact") {
		cres, err := c.store.CompactIfNeeded(v.Cache)
		if err != nil {
			return fmt.Errorf("committed generation %d, then compacting failed: %w", res.Generation, err)
		}
		out.Compact = &cres
	}
	if c.output == "json" {
		return c.json(out)
	}
	if !res.Committed {
		fmt.Fprintf(c.out, "unmounted %s; nothing was written, nothing committed\n", target)
		return nil
	}
	fmt.Fprintf(c.out, "unmounted %s; committed %s generation %d (%d layer(s))\n", target, v.Cache, res.Generation, res.ChainLength)
	if out.Compact != nil && out.Compact.Compacted {
		fmt.Fprintf(c.out, "compacted %s: %d layers merged into generation %d\n", v.Cache, out.Compact.From, out.Compact.Generation)
	}
	return nil
}

type cacheRow struct {
	Cache       engine.Key `json:"cache"`
	Generation  int64      `json:"generation"`
	Layers      int        `json:"layers"`
	Bytes       int64      `json:"bytes"`
	LastCommit  string     `json:"lastCommit,omitempty"`
	Volumes     int        `json:"volumes"`
	Generations []int64    `json:"generations"`
	committed   time.Time
}

func (c *cli) cacheRows() ([]cacheRow, error) {
	keys, err := c.store.Keys()
	if err != nil {
		return nil, err
	}
	rows := []cacheRow{}
	for _, k := range keys {
		info, err := c.store.Inspect(k)
		if errors.Is(err, engine.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		u, err := c.store.Usage(k)
		if err != nil {
			return nil, err
		}
		r := cacheRow{Cache: k, Bytes: u.Bytes, Volumes: len(info.Volumes), Generations: info.Generations}
		if info.Head != nil {
			r.Generation, r.Layers = info.Head.Number, len(info.Head.Layers)
			r.LastCommit = info.Head.Created.Format("2006-01-02T15:04:05Z")
			r.committed = info.Head.Created
		}
		rows = append(rows, r)
	}
	return rows, nil
}

func (c *cli) ls([]string) error {
	rows, err := c.cacheRows()
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(rows)
	}
	var t [][]string
	for _, r := range rows {
		t = append(t, []string{r.Cache.Namespace, r.Cache.Name, strconv.FormatInt(r.Generation, 10),
			strconv.Itoa(r.Layers), humanBytes(r.Bytes), ago(r.committed), strconv.Itoa(r.Volumes)})
	}
	return c.table("NAMESPACE\tNAME\tGENERATION\tLAYERS\tSIZE\tLAST COMMIT\tVOLUMES", t)
}

type volumeRow struct {
	*engine.Volume
	MountPoints []string `json:"mountPoints"`
	UpperBytes  int64    `json:"upperBytes"`
}

func (c *cli) volumeRows() ([]volumeRow, error) {
	vols, err := c.store.Volumes()
	if err != nil {
		return nil, err
	}
	rows := []volumeRow{}
	for _, v := range vols {
		points, err := c.store.MountPoints(v.ID)
		if err != nil {
			return nil, err
		}
		bytes, _, err := c.store.VolumeUsage(v.ID)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		rows = append(rows, volumeRow{Volume: v, MountPoints: append([]string{}, points...), UpperBytes: bytes})
	}
	return rows, nil
}

func (c *cli) volumes([]string) error {
	rows, err := c.volumeRows()
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(rows)
	}
	var t [][]string
	for _, r := range rows {
		mounted := strings.Join(r.MountPoints, ",")
		if mounted == "" {
			mounted = "-"
		}
		t = append(t, []string{r.ID, r.Cache.String(), strconv.FormatInt(r.Generation, 10),
			strconv.FormatBool(r.Writable), humanBytes(r.UpperBytes), mounted})
	}
	return c.table("VOLUME\tCACHE\tBASE GENERATION\tWRITABLE\tWRITTEN\tMOUNTED AT", t)
}

type inspectOutput struct {
	engine.CacheInfo
	Usage engine.CacheUsage `json:"usage"`
}

func (c *cli) inspect(args []string) error {
	k, err := parseKey(args[0])
	if err != nil {
		return err
	}
	info, err := c.store.Inspect(k)
	if err != nil {
		return err
	}
	u, err := c.store.Usage(k)
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(inspectOutput{CacheInfo: info, Usage: u})
	}
	fmt.Fprintf(c.out, "Cache:        %s\n", k)
	if info.Head == nil {
		fmt.Fprintf(c.out, "Head:         none (never committed)\n")
	} else {
		h := info.Head
		fmt.Fprintf(c.out, "Head:         generation %d (%s, %s)\n", h.Number, h.Source, h.Created.Format("2006-01-02 15:04:05Z"))
		if h.Volume != "" {
			fmt.Fprintf(c.out, "Committed by: volume %s\n", h.Volume)
		}
	}
	fmt.Fprintf(c.out, "Size:         %s in %d inodes\n", humanBytes(u.Bytes), u.Inodes)
	fmt.Fprintf(c.out, "Generations:  %s\n", joinInts(info.Generations))
	fmt.Fprintf(c.out, "Volumes:      %s\n", orDash(strings.Join(info.Volumes, ", ")))
	sizes := map[string]engine.LayerUsage{}
	for _, l := range u.Layers {
		sizes[l.ID] = l
	}
	formats := map[string]engine.LayerFormat{}
	for _, l := range info.Layers {
		formats[l.ID] = l.Format
	}
	var t [][]string
	if info.Head != nil {
		for i := len(info.Head.Layers) - 1; i >= 0; i-- {
			id := info.Head.Layers[i]
			l := sizes[id]
			t = append(t, []string{strconv.Itoa(i), id, string(formats[id]), humanBytes(l.Bytes), strconv.FormatInt(l.Inodes, 10)})
		}
	}
	fmt.Fprintln(c.out, "Head layers (top first):")
	return c.table("  #\tLAYER\tFORMAT\tSIZE\tINODES", indent(t))
}

func indent(rows [][]string) [][]string {
	for _, r := range rows {
		r[0] = "  " + r[0]
	}
	return rows
}

func joinInts(ns []int64) string {
	var s []string
	for _, n := range ns {
		s = append(s, strconv.FormatInt(n, 10))
	}
	return orDash(strings.Join(s, ", "))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

type compactRow struct {
	Cache engine.Key           `json:"cache"`
	Res   engine.CompactResult `json:"result"`
}

func (c *cli) compact(args []string) error {
	var keys []engine.Key
	if len(args) == 1 {
		k, err := parseKey(args[0])
		if err != nil {
			return err
		}
		if _, err := c.store.Inspect(k); err != nil {
			return err
		}
		keys = []engine.Key{k}
	} else {
		var err error
		if keys, err = c.store.Keys(); err != nil {
			return err
		}
	}
	rows := []compactRow{}
	for _, k := range keys {
		var res engine.CompactResult
		var err error
		if c.boolFlag("if-needed") {
			res, err = c.store.CompactIfNeeded(k)
		} else {
			res, err = c.store.Compact(k)
		}
		if err != nil {
			return err
		}
		rows = append(rows, compactRow{Cache: k, Res: res})
	}
	if c.output == "json" {
		return c.json(rows)
	}
	for _, r := range rows {
		if r.Res.Compacted {
			fmt.Fprintf(c.out, "%s: merged %d layers into generation %d\n", r.Cache, r.Res.From, r.Res.Generation)
		} else {
			fmt.Fprintf(c.out, "%s: nothing to compact\n", r.Cache)
		}
	}
	return nil
}

func (c *cli) gc([]string) error {
	res, err := c.store.GC()
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(res)
	}
	fmt.Fprintf(c.out, "removed %d layer(s), %d generation(s), %d empty cache(s), %d temporary leftover(s)\n",
		res.Layers, res.Generations, res.Caches, res.Temporary)
	return nil
}

type duOutput struct {
	Caches  []engine.CacheUsage `json:"caches"`
	Volumes []volumeRow         `json:"volumes"`
}

func (c *cli) du([]string) error {
	keys, err := c.store.Keys()
	if err != nil {
		return err
	}
	out := duOutput{Caches: []engine.CacheUsage{}}
	for _, k := range keys {
		u, err := c.store.Usage(k)
		if err != nil {
			return err
		}
		out.Caches = append(out.Caches, u)
	}
	if out.Volumes, err = c.volumeRows(); err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(out)
	}
	var t [][]string
	var total int64
	for _, u := range out.Caches {
		t = append(t, []string{u.Key.String(), strconv.Itoa(len(u.Layers)), humanBytes(u.Bytes), strconv.FormatInt(u.Inodes, 10)})
		total += u.Bytes
	}
	for _, v := range out.Volumes {
		t = append(t, []string{"volume " + v.ID, "-", humanBytes(v.UpperBytes), "-"})
		total += v.UpperBytes
	}
	t = append(t, []string{"total", "", humanBytes(total), ""})
	return c.table("WHAT\tLAYERS\tSIZE\tINODES", t)
}

func (c *cli) rm(args []string) error {
	k, err := parseKey(args[0])
	if err != nil {
		return err
	}
	if err := c.store.DeleteCache(k); err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(map[string]any{"deleted": k})
	}
	fmt.Fprintf(c.out, "deleted cache %s\n", k)
	return nil
}
