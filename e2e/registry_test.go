//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// The local cluster's registry (config/local/registry.yaml), reached from
// this host through its Service's cluster IP.
const (
	registryHost   = "10.96.0.50:5000"
	registryPrefix = "layercache"
)

// listFiles prints what a build sees of /cache: every entry with its mode,
// link count and owner, a file's mtime and a symlink's target.
const listFiles = `cd /cache && find . -mindepth 1 | sort | while read f; do
  if [ -d "$f" ]; then stat -c '%n %A %u:%g' "$f"; else stat -c '%n %A %h %u:%g %Y %N' "$f"; fi
done`

// registryImage waits until the Cache's status.registry is the generation
// gen that node pushed, and returns its image.
func (e *env) registryImage(cache, node string, gen int64) string {
	e.t.Helper()
	ca := &v1alpha1.Cache{}
	e.eventually(fmt.Sprintf("generation %d of %s on %s to be pushed", gen, cache, node), 60*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: cache}, ca) == nil && ca.Status.Registry != nil &&
			ca.Status.Registry.Node == node && ca.Status.Registry.Generation == gen
	})
	return ca.Status.Registry.Image
}

// registryUser returns the user and password that hack/deploy-local.sh
// gave the local registry, from the manager's and node agents' Secret.
func registryUser(t *testing.T) (string, string) {
	t.Helper()
	sec := &corev1.Secret{}
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "layercache-system", Name: "layercache-registry-auth"}, sec); err != nil {
		t.Fatalf("the local registry's credentials: %v", err)
	}
	var cfg struct {
		Auths map[string]struct{ Username, Password string } `json:"auths"`
	}
	if err := json.Unmarshal(sec.Data[corev1.DockerConfigJsonKey], &cfg); err != nil || cfg.Auths[registryHost].Username == "" {
		t.Fatalf("the local registry's credentials: no user for %s (%v)", registryHost, err)
	}
	a := cfg.Auths[registryHost]
	return a.Username, a.Password
}

// registryGet reads path of the registry's HTTP API from inside the
// registry's pod (this host's own route to the cluster IP depends on its
// kube-proxy, which may lag behind a registry that moved): ok is false on
// an HTTP error or no pod.
func registryGet(t *testing.T, path, accept string) (bool, []byte) {
	t.Helper()
	args := []string{"-n", "layercache-system", "exec", "deploy/layercache-registry", "--", "wget", "-q", "-O-"}
	if accept != "" {
		args = append(args, "--header", "Accept: "+accept)
	}
	user, pass := registryUser(t)
	args = append(args, "http://"+user+":"+pass+"@127.0.0.1:5000/v2/"+path)
	out, err := kubectlCmd(args...).Output()
	return err == nil, out
}

// registryAnswers tells whether the registry's pod serves its API.
func registryAnswers(t *testing.T) bool {
	ok, _ := registryGet(t, "", "")
	return ok
}

// tags lists the tags of cache's repository (none if it has none).
func (e *env) tags(cache string) []string {
	e.t.Helper()
	ok, body := registryGet(e.t, registryPrefix+"/"+e.ns+"/"+cache+"/tags/list", "")
	if !ok {
		return nil // NAME_UNKNOWN: no repository
	}
	var list struct{ Tags []string }
	if json.Unmarshal(body, &list) != nil {
		e.t.Fatalf("tags of %s: %s", cache, body)
	}
	return list.Tags
}

// agentCounter reads a counter of the node agent on node, through the API
// server's proxy.
func (e *env) agentCounter(node, series string) float64 {
	e.t.Helper()
	agent := e.agentOn(node)
	out := kubectl(e.t, "get", "--raw", "/api/v1/namespaces/layercache-system/pods/"+agent.Name+":8443/proxy/metrics")
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				e.t.Fatalf("metric %s: %q", series, line)
			}
			return f
		}
	}
	return 0
}

// nodeCacheGeneration is node's NodeCache's generation (0 if none).
func (e *env) nodeCacheGeneration(cache, node string) int64 {
	nc := &v1alpha1.NodeCache{}
	if c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: v1alpha1.NodeCacheName(cache, node)}, nc) != nil {
		return 0
	}
	return nc.Status.Generation
}

func (e *env) runOn(node, pod, cache, script string) string {
	e.t.Helper()
	phase, out := e.run(on(node, buildPod(pod, cache, "read", "", script, nil)))
	if phase != corev1.PodSucceeded {
		e.t.Fatalf("%s on %s: %s: %s", pod, node, phase, out)
	}
	e.settled()
	return out
}

// Two commits on node2; a build pinned to node3 sees exactly what one on
// node2 sees: symlinks, hard links, modes, owners, mtimes, and the file
// and the directory the second commit deleted stay deleted.
func TestCacheFollowsBuildsAcrossNodes(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "shared", "w1", `cd /cache && echo keep > keep && echo gone > gone && mkdir -p dir/sub &&
		echo deep > dir/sub/deep && ln -s keep link && ln keep hard && chmod 4750 keep &&
		touch -t 202001020304.05 keep dir/sub/deep && chown 1234:5678 gone`)
	e.registryImage("shared", "node2", 1)
	e.commitOn("node2", "shared", "w2", `rm /cache/gone && rm -r /cache/dir && mkdir /cache/dir && echo new > /cache/dir/new`)
	e.registryImage("shared", "node2", 2)

	want := e.runOn("node2", "see-node2", "shared", listFiles)
	got := e.runOn("node3", "see-node3", "shared", listFiles)
	if got != want {
		t.Fatalf("node3 sees:\n%s\nnode2 sees:\n%s", got, want)
	}
	for _, w := range []string{"./keep -rwsr-x--- 2 0:0 1577934245", "./link", "./dir/new", "'./link' -> 'keep'"} {
		if !strings.Contains(got, w) {
			t.Errorf("the listing lacks %q:\n%s", w, got)
		}
	}
	for _, gone := range []string{"./gone", "./dir/sub"} {
		if strings.Contains(got, gone) {
			t.Errorf("%s was deleted by the second commit, yet node3 has it:\n%s", gone, got)
		}
	}
	if ev := e.events("shared"); !strings.Contains(ev, "Node node3: "+registryHost) || !strings.Contains(ev, "(pull;") {
		t.Errorf("no pull on node3 in the events:\n%s", ev)
	}
}

// Once node3 holds the cache, a new commit on node2 is brought down to
// node3 in the background: the next build there starts warm, with no
// pull on its path.
func TestPrefetchedNodeStartsWarm(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "pre", "w1", `echo 1 > /cache/one`)
	e.registryImage("pre", "node2", 1)
	if out := e.runOn("node3", "first-on-node3", "pre", `cat /cache/one`); out != "1" {
		t.Fatalf("node3's first build saw %q", out)
	}
	e.eventually("node3's NodeCache", 30*time.Second, func() bool { return e.nodeCacheGeneration("pre", "node3") == 1 })

	pullsBefore := e.agentCounter("node3", `layercache_registry_transfers_total{op="pull",result="ok"}`)
	prefetchBefore := e.agentCounter("node3", `layercache_registry_transfers_total{op="prefetch",result="ok"}`)
	e.commitOn("node2", "pre", "w2", `echo 2 > /cache/two`)
	e.registryImage("pre", "node2", 2)
	e.eventually("node3 to prefetch the second commit", 60*time.Second, func() bool { return e.nodeCacheGeneration("pre", "node3") == 2 })
	if n := e.agentCounter("node3", `layercache_registry_transfers_total{op="prefetch",result="ok"}`); n != prefetchBefore+1 {
		t.Errorf("node3 prefetched %v times, want 1", n-prefetchBefore)
	}
	if out := e.runOn("node3", "warm-on-node3", "pre", `cat /cache/one /cache/two`); out != "1\n2" {
		t.Fatalf("the build after the prefetch saw %q", out)
	}
	if n := e.agentCounter("node3", `layercache_registry_transfers_total{op="pull",result="ok"}`); n != pullsBefore {
		t.Errorf("the build after the prefetch pulled on its path (%v pulls)", n-pullsBefore)
	}
}

// What an untrusted writer writes never reaches the registry.
func TestUntrustedWriterNeverReachesTheRegistry(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "guarded", "trusted", `echo clean > /cache/state`)
	image := e.registryImage("guarded", "node2", 1)
	// The default service account is not allowed to commit.
	phase, out := e.run(on("node2", buildPod("pr", "guarded", "write", "", `echo poison > /cache/state; echo poison > /cache/extra`, nil)))
	if phase != corev1.PodSucceeded {
		t.Fatalf("untrusted writer: %s %s", phase, out)
	}
	e.settled()
	time.Sleep(3 * time.Second) // a push, if any, would have started by now
	ca := &v1alpha1.Cache{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: "guarded"}, ca); err != nil || ca.Status.Registry.Image != image {
		t.Fatalf("status.registry moved after an untrusted build: %+v, %v", ca.Status.Registry, err)
	}
	if tags := e.tags("guarded"); len(tags) != 1 {
		t.Errorf("the registry has tags %v; want the trusted commit's only", tags)
	}
	if out := e.runOn("node3", "read-node3", "guarded", `cat /cache/*`); out != "clean" {
		t.Errorf("node3 sees %q", out)
	}
}

// With the registry stopped, a build on a cold node starts from nothing
// and succeeds, with a PullFailed event, and a commit's push fails
// (PushFailed) and is retried until the registry is back. (The local
// registry keeps its data in an emptyDir: it comes back empty, and the
// retried push uploads every layer again.)
func TestRegistryDownBuildsStillRun(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "down", "w1", `echo 1 > /cache/one`)
	e.registryImage("down", "node2", 1)

	scale := func(n string) {
		kubectl(t, "-n", "layercache-system", "scale", "deployment/layercache-registry", "--replicas="+n)
	}
	t.Cleanup(func() { scale("1") }) // even if the test fails
	scale("0")
	e.eventually("the registry to stop", 60*time.Second, func() bool { return !registryAnswers(t) })
	start := time.Now()
	if out := e.runOn("node3", "cold", "down", `ls /cache | wc -l`); out != "0" {
		t.Fatalf("the build with the registry down saw %q files", out)
	}
	t.Logf("the build on a cold node with the registry down took %s", time.Since(start).Round(100*time.Millisecond))
	if ev := e.events("down"); !strings.Contains(ev, "PullFailed: Node node3") {
		t.Errorf("no PullFailed event:\n%s", ev)
	}
	e.commitOn("node2", "down", "w2", `echo 2 > /cache/two`)
	e.eventually("a PushFailed event", 30*time.Second, func() bool { return strings.Contains(e.events("down"), "PushFailed: Node node2") })

	scale("1")
	e.eventually("the registry to answer", 90*time.Second, func() bool { return registryAnswers(t) })
	e.registryImage("down", "node2", 2) // the push was retried
	// node3's kube-proxy may take a moment to route to the new pod: a
	// build that still finds no registry starts empty, and the next pulls.
	var out string
	for i := 0; i < 10 && out != "1\n2"; i++ {
		out = e.runOn("node3", fmt.Sprintf("back-%d", i), "down", `cat /cache/one /cache/two 2>/dev/null; true`)
	}
	if out != "1\n2" {
		t.Fatalf("with the registry back, the builds on node3 saw %q", out)
	}
}

// A blob altered in the registry's storage is detected: the node does not
// use it, and the build starts from what the node has (nothing).
func TestTamperedBlobIsDetected(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "tampered", "w1", `seq 1 20000 > /cache/numbers`)
	image := e.registryImage("tampered", "node2", 1)
	_, digest, _ := strings.Cut(image, "@")
	ok, body := registryGet(t, registryPrefix+"/"+e.ns+"/tampered/manifests/"+digest, "application/vnd.oci.image.manifest.v1+json")
	var m struct{ Layers []struct{ Digest string } }
	if !ok || json.Unmarshal(body, &m) != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v %s", ok, body)
	}
	hex := strings.TrimPrefix(m.Layers[0].Digest, "sha256:")
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(hex) {
		t.Fatalf("layer digest %q", m.Layers[0].Digest)
	}
	blob := "/var/lib/registry/docker/registry/v2/blobs/sha256/" + hex[:2] + "/" + hex + "/data"
	kubectl(t, "-n", "layercache-system", "exec", "deploy/layercache-registry", "--", "sh", "-c",
		"printf XXXX | dd of="+blob+" bs=1 seek=100 conv=notrunc 2>/dev/null")

	if out := e.runOn("node3", "cold", "tampered", `ls /cache | wc -l`); out != "0" {
		t.Fatalf("node3 used a tampered blob: the build saw %q files", out)
	}
	if ev := e.events("tampered"); !strings.Contains(ev, "PullFailed: Node node3") || !strings.Contains(ev, "does not match its digest") {
		t.Errorf("no PullFailed event naming the digest:\n%s", ev)
	}
}

// Deleting a Cache deletes its images from the registry.
func TestDeletingACacheDeletesItsImages(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "doomed", "w1", `echo 1 > /cache/one`)
	e.registryImage("doomed", "node2", 1)
	if tags := e.tags("doomed"); len(tags) != 1 {
		t.Fatalf("tags before the deletion: %v", tags)
	}
	ca := &v1alpha1.Cache{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: "doomed"}, ca); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(e.ctx, ca); err != nil {
		t.Fatal(err)
	}
	e.eventually("the Cache to go", 60*time.Second, func() bool {
		return apierrors.IsNotFound(c.Get(e.ctx, client.ObjectKeyFromObject(ca), ca))
	})
	if tags := e.tags("doomed"); len(tags) != 0 {
		t.Errorf("tags after the deletion: %v", tags)
	}
}

// A Cache with prefetch: AllNodes is brought down on every node, even
// those that never ran a build of it: a first build on any node starts
// warm, with no pull on its path.
func TestPrefetchOnAllNodes(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.create(&v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "everywhere", Namespace: e.ns},
		Spec: v1alpha1.CacheSpec{Prefetch: v1alpha1.PrefetchAllNodes}})
	e.commitOn("node2", "everywhere", "w1", `echo hi > /cache/greeting`)
	e.registryImage("everywhere", "node2", 1)
	for _, node := range e.nodeNames() {
		e.eventually("the cache on "+node, 60*time.Second, func() bool { return e.nodeCacheGeneration("everywhere", node) >= 1 })
	}
	pulls := e.agentCounter("node3", `layercache_registry_transfers_total{op="pull",result="ok"}`)
	if out := e.runOn("node3", "first-on-node3", "everywhere", `cat /cache/greeting`); out != "hi" {
		t.Fatalf("the first build on node3 saw %q", out)
	}
	if n := e.agentCounter("node3", `layercache_registry_transfers_total{op="pull",result="ok"}`); n != pulls {
		t.Errorf("the first build on node3 pulled on its path (%v pulls)", n-pulls)
	}
}

// A build pod reaches the registry only as an anonymous client, which the
// local registry refuses: it cannot list the catalog nor read a cache's
// tags, its own or another namespace's (caches often hold credentials).
func TestRegistryRefusesAnonymousClients(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "secret", "trusted", `echo token > /cache/credentials`)
	e.registryImage("secret", "node2", 1)
	for _, path := range []string{"_catalog", registryPrefix + "/" + e.ns + "/secret/tags/list"} {
		script := `wget -S -q -O- http://` + registryHost + `/v2/` + path + ` 2>&1; echo "rc=$?"`
		phase, out := e.run(buildPod("anonymous-"+strconv.Itoa(len(path)), "", "", "", script, nil))
		if phase != corev1.PodSucceeded || !strings.Contains(out, "401 Unauthorized") || strings.Contains(out, "rc=0") {
			t.Errorf("an anonymous pod read /v2/%s: %s\n%s", path, phase, out)
		}
	}
}
