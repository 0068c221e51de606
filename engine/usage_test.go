package engine

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
)

// writeFiles creates n empty files under dir, in directories of 10,000.
func writeFiles(t testing.TB, dir string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%03d", i/10000))
		if i%10000 == 0 {
			must(t, os.MkdirAll(sub, 0o755))
		}
		f, err := os.Create(filepath.Join(sub, fmt.Sprintf("f%06d", i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
}

// A volume's files are counted, each hard-linked inode once, and the walk
// remembers only the inodes with more than one link: empty files cost
// inodes, not memory.
func TestVolumeUsageCountsInodes(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	k := Key{Namespace: "ci", Name: "inodes"}
	id := writtenVolume(t, s, k, dir, func(mnt string) {
		writeFiles(t, mnt, 20000)
		must(t, os.WriteFile(filepath.Join(mnt, "a"), []byte("x"), 0o644))
		must(t, os.Link(filepath.Join(mnt, "a"), filepath.Join(mnt, "b")))
	})
	bytes, inodes, err := s.VolumeUsage(id)
	if err != nil {
		t.Fatal(err)
	}
	// The upper's root, 2 directories, 20,000 files, one linked file.
	if inodes != 1+2+20000+1 || bytes <= 0 {
		t.Errorf("usage = %d bytes, %d inodes; want %d inodes", bytes, inodes, 1+2+20000+1)
	}
	c := newCounter()
	d, err := mustOpenBeneath(t, s, filepath.Join(dirVolumes, id, "upper"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	must(t, measure(d, c))
	if len(c.seen) != 1 {
		t.Errorf("the walk remembered %d inodes, want 1 (the hard-linked one)", len(c.seen))
	}
}

func mustOpenBeneath(t testing.TB, s *Store, rel string) (*dir, error) {
	t.Helper()
	root, err := openRoot(s.root)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	return root.openBeneath(rel)
}

// The size walker's peak heap over a volume of 200,000 empty files (go
// test -run '^$' -bench BenchmarkVolumeUsage200k ./engine/, root): the
// number to compare with the node agent's memory limit.
func BenchmarkVolumeUsage200k(b *testing.B) {
	s, dir := newTestStore(b, Options{})
	k := Key{Namespace: "ci", Name: "inodes"}
	id := writtenVolume(b, s, k, dir, func(mnt string) { writeFiles(b, mnt, 200000) })
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var m runtime.MemStats
		for {
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapInuse)
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	b.ResetTimer()
	for range b.N {
		if _, inodes, err := s.VolumeUsage(id); err != nil || inodes < 200000 {
			b.Fatalf("%d inodes, %v", inodes, err)
		}
	}
	b.StopTimer()
	close(stop)
	wg.Wait()
	b.ReportMetric(float64(peak-min(peak, base.HeapInuse))/(1<<20), "peak-heap-MiB")
}
