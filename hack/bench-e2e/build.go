package main

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
)

// The real build: the Go toolchain image (hack/images/build.sh golang)
// compiles layercache's own commands from a vendored copy of its source,
// without network, with GOCACHE on the pod's cache volume.
const (
	goImage = "localhost/golang:dev"
	goBuild = `cd /src && go build -o /tmp/out/ ./cmd/... > /tmp/build.log 2>&1 || { cat /tmp/build.log; exit 1; }`
	// Go refreshes the mtime of each cache entry it uses once it is an
	// hour old; the aged cache's entries are two hours old.
	age = `find /cache -type f -exec touch -d "@$(( $(date +%s) - 7200 ))" {} +`
)

var goEnv = []corev1.EnvVar{{Name: "GOCACHE", Value: "/cache/go-build"}, {Name: "GOFLAGS", Value: "-mod=vendor"}}

// realBuild measures go build of layercache with a cold GOCACHE (an empty
// cache), warm through layercache (committed just before, and with entries
// over an hour old), and warm through the copy baseline (an init container
// copying the GOCACHE from a hostPath).
func (b *bench) realBuild() error {
	dir := filepath.Join(b.hostDir, "build")
	src, seed := filepath.Join(dir, "src"), filepath.Join(dir, "gocache")
	fmt.Fprintf(os.Stderr, "vendoring layercache (HEAD of %s) into %s...\n", b.repo, src)
	if err := vendorSource(b.repo, src); err != nil {
		return err
	}
	source := hostMount{host: src, path: "/src", readOnly: true}
	build := func(cache, trust, sa string, extra ...hostMount) podSpec {
		return podSpec{image: goImage, env: goEnv, cache: cache, trust: trust, sa: sa,
			hostMounts: append([]hostMount{source}, extra...), script: goBuild}
	}

	type variant struct {
		name  string
		specs func(run int) podSpec
	}
	cold := variant{"cold: empty layercache cache", func(run int) podSpec {
		if run == 0 { // the first cold build fills the cache the warm ones use
			return build("go-build", "write", "builder")
		}
		return build(fmt.Sprintf("go-cold-%d", run), "read", "")
	}}
	results := map[string]timing{}
	measure := func(v variant) error {
		ts, err := b.series("build", "go build, "+v.name, v.specs)
		if err == nil {
			results[v.name] = medians(ts)
		}
		return err
	}
	if err := measure(cold); err != nil {
		return err
	}
	if err := b.waitCommitted("go-build"); err != nil {
		return err
	}

	fmt.Fprintln(os.Stderr, "exporting the warm GOCACHE to the node for the copy baseline, and aging a second cache...")
	if err := os.MkdirAll(seed, 0o755); err != nil {
		return err
	}
	if _, err := b.pod("export", podSpec{cache: "go-build", trust: "read",
		hostMounts: []hostMount{{host: seed, path: "/export"}}, script: "cp -a /cache/. /export/"}); err != nil {
		return err
	}
	seedMount := hostMount{host: seed, path: "/seed", readOnly: true}
	if _, err := b.pod("age", podSpec{cache: "go-build-aged", trust: "write", sa: "builder",
		hostMounts: []hostMount{seedMount}, script: "cp -a /seed/. /cache/ && " + age}); err != nil {
		return err
	}
	if err := b.waitCommitted("go-build-aged"); err != nil {
		return err
	}
	files, size, err := du(seed)
	if err != nil {
		return err
	}

	variants := []variant{
		cold,
		{"warm through layercache", func(int) podSpec { return build("go-build", "read", "") }},
		{"warm through layercache, entries over 1 h old", func(int) podSpec { return build("go-build-aged", "read", "") }},
		{"warm through a copy (init container cp -a)", func(int) podSpec {
			s := build("", "", "", seedMount)
			s.init = "cp -a /seed/. /cache/"
			return s
		}},
	}
	for _, v := range variants[1:] {
		if err := measure(v); err != nil {
			return err
		}
	}

	coldR, warm := results[cold.name], results[variants[1].name]
	fmt.Printf("\n`go build ./cmd/...` of layercache (vendored) in a pod on the local cluster (1 node, 2 cores), "+
		"GOCACHE on the pod's volume; the warm GOCACHE is %.2f GiB in %d files; medians of %d runs.\n\n", float64(size)/(1<<30), files, b.runs)
	fmt.Println("| GOCACHE | go build | pod created → build done | cold ÷ this, pod time |")
	fmt.Println("|---|---|---|---|")
	for _, v := range variants {
		r := results[v.name]
		fmt.Printf("| %s | %s | %s | %.1fx |\n", v.name, sec(r.script), sec(r.end), float64(coldR.end)/float64(r.end))
	}
	fmt.Println()
	b.check(float64(coldR.end) >= 5*float64(warm.end), "the warm build through layercache at least 5x faster than the cold one, pod time (%.1fx)",
		float64(coldR.end)/float64(warm.end))
	return nil
}

// vendorSource writes the committed source of the repository at repo into
// dst with its dependencies vendored, so that the build needs no network.
func vendorSource(repo, dst string) error {
	repo, err := filepath.Abs(repo)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, cmd := range []*exec.Cmd{
		exec.Command("sh", "-c", `git -C "$1" archive HEAD | tar -x -C "$2"`, "sh", repo, dst),
		exec.Command("go", "mod", "vendor"),
	} {
		if cmd.Dir == "" {
			cmd.Dir = dst
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %s: %w", cmd, out, err)
		}
	}
	return nil
}

// du counts the regular files below dir and their bytes.
func du(dir string) (files int, size int64, err error) {
	err = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err == nil {
			files, size = files+1, size+info.Size()
		}
		return err
	})
	return files, size, err
}
