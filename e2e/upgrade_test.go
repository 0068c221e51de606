//go:build e2e && upgrade

package e2e

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// upgrade is what hack/test-helm.sh gives the test: the chart to upgrade
// to (an oci:// reference and a version) and the registry on the host
// that holds it and the caches (plain HTTP).
type upgrade struct{ chart, version, registry string }

func upgradeFromEnv(t *testing.T) upgrade {
	u := upgrade{os.Getenv("UPGRADE_CHART"), os.Getenv("UPGRADE_VERSION"), os.Getenv("UPGRADE_REGISTRY")}
	if u.chart == "" || u.version == "" || u.registry == "" {
		t.Skip("run by hack/test-helm.sh (make test-extended), which installs the previous release: UPGRADE_CHART, UPGRADE_VERSION and UPGRADE_REGISTRY are not all set")
	}
	return u
}

// cacheState is what an upgrade must not change of a cache: the Cache's
// identity and registry image, and each node's NodeCache and generation.
type cacheState struct {
	uid      types.UID
	registry string
	nodes    map[string]string // NodeCache name -> "UID generation"
}

func (e *env) cacheState(name string) cacheState {
	e.t.Helper()
	ca := &v1alpha1.Cache{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: name}, ca); err != nil {
		e.t.Fatal(err)
	}
	s := cacheState{uid: ca.UID, nodes: map[string]string{}}
	if ca.Status.Registry != nil {
		s.registry = ca.Status.Registry.Image
	}
	ncs := &v1alpha1.NodeCacheList{}
	if err := c.List(e.ctx, ncs, client.InNamespace(e.ns)); err != nil {
		e.t.Fatal(err)
	}
	for _, nc := range ncs.Items {
		if nc.Spec.Cache == name {
			s.nodes[nc.Name] = fmt.Sprintf("%s %d", nc.UID, nc.Status.Generation)
		}
	}
	return s
}

// layercachePods are the UIDs of the manager's and the node agents' pods.
func (e *env) layercachePods() map[types.UID]string {
	e.t.Helper()
	pods := &corev1.PodList{}
	if err := c.List(e.ctx, pods, client.InNamespace("layercache-system")); err != nil {
		e.t.Fatal(err)
	}
	out := map[types.UID]string{}
	for _, p := range pods.Items {
		if p.Labels["control-plane"] == "controller-manager" || p.Labels["app.kubernetes.io/component"] == "node-agent" {
			out[p.UID] = p.Name
		}
	}
	return out
}

// manifestExists tells whether the registry serves image (REPO@DIGEST).
func (u upgrade) manifestExists(t *testing.T, image string) bool {
	t.Helper()
	repo, digest, ok := strings.Cut(strings.TrimPrefix(image, u.registry+"/"), "@")
	if !ok {
		t.Fatalf("registry image %q is not %s/REPOSITORY@DIGEST", image, u.registry)
	}
	req, err := http.NewRequest(http.MethodHead, "http://"+u.registry+"/v2/"+repo+"/manifests/"+digest, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// helmUpgrade upgrades the release to u's chart as the upgrade notes say:
// the new CRDs first (Helm never upgrades a chart's crds/), then `helm
// upgrade` with the values the user set, on the new chart's defaults (its
// images among them).
func (u upgrade) helmUpgrade(t *testing.T) {
	t.Helper()
	kubectl(t, "apply", "-f", filepath.Join(repo, "config", "crd", "bases"))
	out, err := exec.Command(filepath.Join(repo, "bin", "helm"), "--kubeconfig", kubeconfig, "upgrade", "layercache", u.chart,
		"--version", u.version, "--plain-http", "--namespace", "layercache-system", "--reset-then-reuse-values",
		"--wait", "--timeout", "5m").CombinedOutput()
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	kubectl(t, "-n", "layercache-system", "rollout", "status", "daemonset/layercache-node-agent", "--timeout=180s")
}

// The previous release runs (hack/test-helm.sh installed it): a cache
// committed on each of two nodes, both pushed to the registry, and a
// trusted build of the first running. The release is upgraded to this
// tree while labelled pods are created, one every 400 ms. Then: every
// manager and node agent pod was replaced; no creation was refused and
// none ran uncached; the Caches, their NodeCaches, generations and
// registry images are those of before, and the images are still in the
// registry; the build that ran through the upgrade commits; the next
// builds on both nodes are warm, and each node pulls the other's cache
// from the registry.
func TestUpgradeLosesNothing(t *testing.T) {
	u := upgradeFromEnv(t)
	e := newEnv(t)
	nodes := e.nodeNames()
	if len(nodes) < 2 {
		t.Fatalf("the upgrade needs two nodes, the cluster has %v", nodes)
	}
	a, b := nodes[0], nodes[1]
	e.commitOn(a, "on-a", "a1", `echo a > /cache/a`)
	e.commitOn(b, "on-b", "b1", `echo b > /cache/b`)
	e.registryImage("on-a", a, 1)
	e.registryImage("on-b", b, 1)
	before := map[string]cacheState{"on-a": e.cacheState("on-a"), "on-b": e.cacheState("on-b")}

	long := on(a, buildPod("long", "on-a", "write", "builder", `echo long > /cache/long; until [ -e /tmp/go ]; do sleep 1; done`, nil))
	long.Namespace = e.ns
	e.create(long)
	e.eventually("the long build to run", 120*time.Second, func() bool {
		p := &corev1.Pod{}
		return c.Get(e.ctx, client.ObjectKeyFromObject(long), p) == nil && p.Status.Phase == corev1.PodRunning
	})
	old := e.layercachePods()
	stopStorm := e.stormUntil("up", 400, 400*time.Millisecond)
	time.Sleep(3 * time.Second)
	started := time.Now()
	u.helmUpgrade(t)
	t.Logf("helm upgrade done in %.1fs", time.Since(started).Seconds())
	time.Sleep(10 * time.Second) // the last old manager replica drains for --shutdown-delay
	names, refused := stopStorm()
	if skipped := e.stormOutcome("the upgrade", started, names, refused); len(skipped) > 0 {
		t.Errorf("%d pods uncached during the upgrade: %v", len(skipped), skipped)
	}
	for uid, name := range e.layercachePods() {
		if _, ok := old[uid]; ok {
			t.Errorf("%s was not replaced by the upgrade", name)
		}
	}

	for name, want := range before {
		if got := e.cacheState(name); !reflect.DeepEqual(got, want) {
			t.Errorf("cache %s after the upgrade: %+v, before: %+v", name, got, want)
		}
		if !u.manifestExists(t, want.registry) {
			t.Errorf("cache %s: the registry no longer serves %s", name, want.registry)
		}
	}
	kubectl(t, "-n", e.ns, "exec", "long", "--", "touch", "/tmp/go")
	if phase, out := e.wait("long"); phase != corev1.PodSucceeded {
		t.Fatalf("the long build: %s %s", phase, out)
	}
	ended := time.Now()
	e.settled()
	e.eventually("the long build's commit on "+a, 60*time.Second, func() bool {
		s := e.nodeStatus("on-a", a)
		return s != nil && s.Generation == 2
	})
	t.Logf("the long build's commit reported %.1fs after it ended", time.Since(ended).Seconds())
	e.registryImage("on-a", a, 2)
	t.Logf("and pushed %.1fs after it ended", time.Since(ended).Seconds())
	for i, r := range []struct{ node, cache, want string }{
		{a, "on-a", "a=a\nlong=long"}, {b, "on-b", "b=b"},
		{a, "on-b", "b=b"},            // pulled: pushed by the previous release
		{b, "on-a", "a=a\nlong=long"}, // pulled: pushed by this one
	} {
		if out := e.runOn(r.node, fmt.Sprintf("next-%d", i), r.cache, listCache); out != r.want {
			t.Errorf("the next build of %s on %s: %q, want %q", r.cache, r.node, out, r.want)
		}
	}
}
