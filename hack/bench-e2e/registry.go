package main

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The local cluster's registry (config/local/registry.yaml).
const registryHost = "10.96.0.50:5000"

// registry measures, on 3 nodes, with a cache of --size in --files files
// committed on node 1 and pushed:
//   - a cold node's start (pod created → container started): pulling on
//     demand; after a prefetch (the node held an older generation); the
//     full-tarball way (an init container downloads one gzip tar of the
//     whole cache from the registry and untars it into an emptyDir, as
//     Tekton's cache steps do); and the warm start on node 1;
//   - the push after a commit that changes 1,000 files, against a full
//     re-upload of the cache as one new tarball.
func (b *bench) registry() error {
	nodes, err := b.cs.CoreV1().Nodes().List(b.ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	var node1 string
	names := map[string]bool{}
	for _, n := range nodes.Items {
		names[n.Name] = true
		if n.Name != "node2" && n.Name != "node3" {
			node1 = n.Name
		}
	}
	if !names["node2"] || !names["node3"] || node1 == "" {
		return fmt.Errorf("needs the 3-node local cluster (make bench-e2e BENCH_E2E_PARTS=registry brings it up)")
	}
	const rcache = "registry-cache"
	label := fmt.Sprintf("%.1f GiB / %d files", float64(b.size)/(1<<30), b.files)
	dir := filepath.Join(b.hostDir, "registry")
	src := filepath.Join(dir, "src")
	fmt.Fprintf(os.Stderr, "generating the %s cache on node 1...\n", label)
	if err := generate(src, b.size, b.files); err != nil {
		return err
	}
	fill := podSpec{node: node1, cache: rcache, trust: "write", sa: "builder",
		hostMounts: []hostMount{{host: src, path: "/src", readOnly: true}}, script: "cp -a /src/. /cache/"}
	if _, err := b.pod("fill", fill); err != nil {
		return err
	}
	first, err := b.waitPushed(rcache, 0)
	if err != nil {
		return err
	}
	download, err := b.downloadInit(first.Image)
	if err != nil {
		return err
	}

	// The full tarball, written with go-containerregistry.
	fmt.Fprintln(os.Stderr, "writing the full tarball of the cache to the registry...")
	user, pass, err := b.registryUser()
	if err != nil {
		return err
	}
	full, err := b.pushTarball(src, filepath.Join(dir, "full.tar.gz"), "tarball")
	if err != nil {
		return err
	}
	tarballInit := fmt.Sprintf("wget -q -O- http://%s:%s@%s/v2/%s/layercache-bench/tarball/blobs/%s | tar -xzf - -C /cache", user, pass, registryHost, "layercache", full.digest)

	read := podSpec{cache: rcache, trust: "read", script: "true"}
	var onDemand, reads, downloads, prefetched, tarballs, warm []time.Duration
	for r := range b.runs {
		fmt.Fprintf(os.Stderr, "registry, run %d/%d...\n", r+1, b.runs)
		// Cold node2: nothing of the cache there; then every file read.
		start, readAll, err := b.coldAndRead(rcache)
		if err != nil {
			return err
		}
		onDemand, reads = append(onDemand, start), append(reads, readAll)
		t, err := b.pod("download", podSpec{node: "node2", init: download, script: "true"})
		if err != nil {
			return err
		}
		downloads = append(downloads, t.start)
		s := read

		// node3 holds the cache (an older generation): a commit on node 1
		// is prefetched there before the build.
		s.node = "node3"
		if r == 0 {
			if _, err := b.pod("hold", s); err != nil {
				return err
			}
			if err := b.waitNodeGeneration(rcache, "node3", 0); err != nil {
				return err
			}
		}
		before, err := b.pushed(rcache)
		if err != nil {
			return err
		}
		held := b.nodeGeneration(rcache, "node3")
		if _, err := b.pod("touch", podSpec{node: node1, cache: rcache, trust: "write", sa: "builder",
			script: fmt.Sprintf("echo %d > /cache/run", r)}); err != nil {
			return err
		}
		if _, err := b.waitPushed(rcache, before.Generation); err != nil {
			return err
		}
		if err := b.waitNodeGeneration(rcache, "node3", held); err != nil {
			return err
		}
		if t, err = b.pod("prefetched", s); err != nil {
			return err
		}
		prefetched = append(prefetched, t.start)

		t, err = b.pod("tarball", podSpec{node: "node2", init: tarballInit, script: "true"})
		if err != nil {
			return err
		}
		tarballs = append(tarballs, t.start)

		s.node = node1
		if t, err = b.pod("warm", s); err != nil {
			return err
		}
		warm = append(warm, t.start)
	}

	dirStarts, dirReads, err := b.dirFormat(rcache)
	if err != nil {
		return err
	}

	// The push after a commit that changes 1,000 files.
	fmt.Fprintln(os.Stderr, "changing 1,000 files and committing...")
	before, err := b.pushed(rcache)
	if err != nil {
		return err
	}
	bytesBefore, secondsBefore, err := b.pushCounters(node1)
	if err != nil {
		return err
	}
	change := `n=0; for f in $(find /cache -type f -name 'f*' | head -1000); do echo changed >> $f; n=$((n+1)); done; echo $n`
	if _, err := b.pod("change", podSpec{node: node1, cache: rcache, trust: "write", sa: "builder", script: change}); err != nil {
		return err
	}
	if _, err := b.waitPushed(rcache, before.Generation); err != nil {
		return err
	}
	bytesAfter, secondsAfter, err := b.pushCounters(node1)
	if err != nil {
		return err
	}
	incBytes, incSeconds := bytesAfter-bytesBefore, secondsAfter-secondsBefore
	fmt.Fprintln(os.Stderr, "re-uploading the whole cache as one new tarball...")
	if err := appendToFiles(src, 1000); err != nil {
		return err
	}
	again, err := b.pushTarball(src, filepath.Join(dir, "full2.tar.gz"), "tarball")
	if err != nil {
		return err
	}

	m := func(ds []time.Duration) time.Duration { return median(ds) }
	fmt.Printf("Cold-node start on the local cluster (3 nodes on one machine, 2 cores), cache of %s; medians of %d runs.\n\n", label, b.runs)
	ratio := func(a, b time.Duration) string { return fmt.Sprintf("%.1fx", float64(a)/float64(b)) }
	fmt.Println("| a build on a node | pod created → container started | full tarball ÷ this |")
	fmt.Println("|---|---|---|")
	fmt.Printf("| cold, layercache pulling on demand (image layers) | %s | %s |\n", sec(m(onDemand)), ratio(m(tarballs), m(onDemand)))
	fmt.Printf("| cold, layercache pulling on demand, `--layer-format=dir` | %s | %s |\n", sec(m(dirStarts)), ratio(m(tarballs), m(dirStarts)))
	fmt.Printf("| cold, init container downloading the image's blobs to /dev/null (the floor) | %s | %s |\n", sec(m(downloads)), ratio(m(tarballs), m(downloads)))
	fmt.Printf("| cold, after a layercache prefetch | %s | %s |\n", sec(m(prefetched)), ratio(m(tarballs), m(prefetched)))
	fmt.Printf("| cold, full tarball from the registry (init container wget + tar -xz) | %s | 1.0x |\n", sec(m(tarballs)))
	fmt.Printf("| warm, where the cache was committed | %s | %s |\n\n", sec(m(warm)), ratio(m(tarballs), m(warm)))
	fmt.Println("| `tar -cf /dev/null /cache` on node2 after a pull | seconds |")
	fmt.Println("|---|---|")
	fmt.Printf("| image layers (EROFS lowers) | %s |\n", sec(m(reads)))
	fmt.Printf("| `--layer-format=dir` (directory lowers) | %s |\n\n", sec(m(dirReads)))
	fmt.Println("| push after a commit changing 1,000 files | bytes sent | seconds |")
	fmt.Println("|---|---|---|")
	fmt.Printf("| layercache, incremental | %s | %.2f |\n", mib(incBytes), incSeconds)
	fmt.Printf("| full re-upload (one gzip tarball) | %s | %.2f |\n\n", mib(again.size), again.seconds)
	b.check(m(prefetched)-m(warm) <= 300*time.Millisecond, "a prefetched cold node starts within 0.3 s of a warm start (+%s)", sec(m(prefetched)-m(warm)))
	b.check(float64(m(tarballs)) >= 5*float64(m(onDemand)), "an on-demand pull at least 5x faster than the full tarball (%.1fx)", float64(m(tarballs))/float64(m(onDemand)))
	b.check(float64(m(onDemand)) <= 2*float64(m(downloads)), "an on-demand pull within 2x of downloading the blobs (%.1fx)", float64(m(onDemand))/float64(m(downloads)))
	b.check(float64(m(reads)) <= 1.1*float64(m(dirReads)), "reading every file through image lowers within 1.1x of directory lowers (%.2fx)", float64(m(reads))/float64(m(dirReads)))
	b.check(float64(again.size) >= 50*incBytes, "the incremental push sends at least 50x fewer bytes than a full re-upload (%.0fx)", float64(again.size)/incBytes)
	return nil
}

func mib(n float64) string { return fmt.Sprintf("%.1f MiB", n/(1<<20)) }

// pushedImage is a Cache's status.registry.
type pushedImage struct {
	Image      string `json:"image"`
	Generation int64  `json:"generation"`
}

func (b *bench) pushed(cache string) (pushedImage, error) {
	raw, err := b.cs.Discovery().RESTClient().Get().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "caches", cache).DoRaw(b.ctx)
	if err != nil {
		return pushedImage{}, err
	}
	var c struct {
		Status struct {
			Registry *pushedImage `json:"registry"`
		} `json:"status"`
	}
	if err := json.Unmarshal(raw, &c); err != nil || c.Status.Registry == nil {
		return pushedImage{}, err
	}
	return *c.Status.Registry, nil
}

// waitPushed waits until the Cache's newest image is a generation after
// the one given.
func (b *bench) waitPushed(cache string, after int64) (pushedImage, error) {
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		if img, err := b.pushed(cache); err == nil && img.Generation > after {
			return img, nil
		}
		if time.Now().After(deadline) {
			return pushedImage{}, fmt.Errorf("cache %s: no push after generation %d", cache, after)
		}
	}
}

// nodeGeneration is the generation node's NodeCache of cache reports (0
// if none).
func (b *bench) nodeGeneration(cache, node string) int64 {
	raw, err := b.cs.Discovery().RESTClient().Get().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "nodecaches", cache+"."+node).DoRaw(b.ctx)
	var nc struct {
		Status struct {
			Generation int64 `json:"generation"`
		} `json:"status"`
	}
	if err != nil || json.Unmarshal(raw, &nc) != nil {
		return 0
	}
	return nc.Status.Generation
}

// waitNodeGeneration waits until node reports a generation of cache after
// the one given (its agent reports a prefetch once it is on disk).
func (b *bench) waitNodeGeneration(cache, node string, after int64) error {
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if b.nodeGeneration(cache, node) > after {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not report a generation of %s after %d", node, cache, after)
		}
	}
}

// forget deletes node's copy of the cache (its NodeCache; the agent
// deletes the data) and waits until it is gone.
func (b *bench) forget(cache, node string) error {
	path := b.cs.Discovery().RESTClient().Delete().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "nodecaches", cache+"."+node)
	if _, err := path.DoRaw(b.ctx); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		_, err := b.cs.Discovery().RESTClient().Get().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "nodecaches", cache+"."+node).DoRaw(b.ctx)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s's copy of %s was not deleted", node, cache)
		}
	}
}

var pushSeries = regexp.MustCompile(`^layercache_registry_(bytes|seconds)_total\{op="push"\} (\S+)$`)

// pushCounters reads the bytes and seconds node's agent has pushed.
func (b *bench) pushCounters(node string) (bytes, seconds float64, err error) {
	pods, err := b.cs.CoreV1().Pods("layercache-system").List(b.ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/component=node-agent", FieldSelector: "spec.nodeName=" + node})
	if err != nil || len(pods.Items) != 1 {
		return 0, 0, fmt.Errorf("the node agent on %s: %v", node, err)
	}
	raw, err := b.cs.CoreV1().RESTClient().Get().AbsPath("/api/v1/namespaces/layercache-system/pods", pods.Items[0].Name+":8443", "proxy", "metrics").DoRaw(b.ctx)
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if m := pushSeries.FindStringSubmatch(line); m != nil {
			v, _ := strconv.ParseFloat(m[2], 64)
			if m[1] == "bytes" {
				bytes = v
			} else {
				seconds = v
			}
		}
	}
	return bytes, seconds, nil
}

type upload struct {
	digest  string
	size    float64
	seconds float64
}

// registryUser returns the user and password that hack/deploy-local.sh
// gave the local registry, from the manager's and node agents' Secret.
func (b *bench) registryUser() (string, string, error) {
	sec, err := b.cs.CoreV1().Secrets("layercache-system").Get(b.ctx, "layercache-registry-auth", metav1.GetOptions{})
	if err != nil {
		return "", "", fmt.Errorf("the local registry's credentials: %w", err)
	}
	var cfg struct {
		Auths map[string]struct{ Username, Password string } `json:"auths"`
	}
	if err := json.Unmarshal(sec.Data[corev1.DockerConfigJsonKey], &cfg); err != nil || cfg.Auths[registryHost].Username == "" {
		return "", "", fmt.Errorf("the local registry's credentials: no user for %s (%v)", registryHost, err)
	}
	return cfg.Auths[registryHost].Username, cfg.Auths[registryHost].Password, nil
}

// pushTarball writes dir as one gzip tar to file and uploads it as a layer
// of layercache-bench/REPO: the full-tarball way, timed from the tar to
// the end of the upload.
func (b *bench) pushTarball(dir, file, repo string) (upload, error) {
	user, pass, err := b.registryUser()
	if err != nil {
		return upload{}, err
	}
	start := time.Now()
	if err := writeTarGz(dir, file); err != nil {
		return upload{}, err
	}
	layer, err := tarball.LayerFromFile(file)
	if err != nil {
		return upload{}, err
	}
	r, err := name.NewRepository(registryHost+"/layercache/layercache-bench/"+repo, name.Insecure)
	if err != nil {
		return upload{}, err
	}
	if err := remote.WriteLayer(r, layer, remote.WithContext(b.ctx), remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		return upload{}, err
	}
	d, err := layer.Digest()
	if err != nil {
		return upload{}, err
	}
	size, err := layer.Size()
	return upload{digest: d.String(), size: float64(size), seconds: time.Since(start).Seconds()}, err
}

func writeTarGz(dir, file string) error {
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := gzip.NewWriter(f)
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		h.Name, _ = filepath.Rel(dir, p)
		if err := tw.WriteHeader(h); err != nil || !d.Type().IsRegular() {
			return err
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if err == nil {
		err = zw.Close()
	}
	if err == nil {
		err = f.Close()
	}
	return err
}

// appendToFiles changes n files of dir as the bench's commit does.
func appendToFiles(dir string, n int) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || n == 0 || !d.Type().IsRegular() {
			return err
		}
		n--
		f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		if _, err := f.WriteString("changed\n"); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	})
}
