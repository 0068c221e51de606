//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// The demo's story: a trusted build writes, its claim goes, the Cache shows
// the node, the next build finds the content.
func TestBuildCacheStory(t *testing.T) {
	e := newEnv(t)
	phase, out := e.run(buildPod("build-1", "example-project", "write", "builder",
		`ls /cache | wc -l; echo artefact-1 > /cache/result`, nil))
	if phase != corev1.PodSucceeded || out != "0" {
		t.Fatalf("build-1: %s, %q", phase, out)
	}
	e.settled()
	ca := &v1alpha1.Cache{}
	e.eventually("the Cache status", 30*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: "example-project"}, ca) == nil && ca.Status.NodeNames != ""
	})
	if n := ca.Status.Nodes[0]; n.Generation != 1 || n.LastCommitPod != e.ns+"/build-1" || n.Size.IsZero() {
		t.Errorf("node status = %+v", n)
	}
	if got := e.read("example-project", "build-2"); got != "result=artefact-1" {
		t.Fatalf("build-2 saw %q", got)
	}
	if !strings.Contains(e.events("example-project"), "Committed") {
		t.Errorf("no Committed event: %s", e.events("example-project"))
	}
	// The scheduling gate keeps the scheduler away until the claim exists.
	for _, pod := range []string{"build-1", "build-2"} {
		if ev := e.events(pod); strings.Contains(ev, "FailedScheduling") {
			t.Errorf("%s failed scheduling: %s", pod, ev)
		}
	}
}

// An untrusted writer (no RBAC) reads the cache but cannot change it, and
// an event says why.
func TestUntrustedWriterCannotPoison(t *testing.T) {
	e := newEnv(t)
	e.run(buildPod("trusted", "shared", "write", "builder", `echo good > /cache/result`, nil))
	e.settled()
	phase, out := e.run(buildPod("pull-request", "shared", "write", "default", `cat /cache/result; echo evil > /cache/result`, nil))
	if phase != corev1.PodSucceeded || out != "good" {
		t.Fatalf("pull-request: %s %q", phase, out)
	}
	e.settled()
	if got := e.read("shared", "check"); got != "result=good" {
		t.Fatalf("the cache holds %q after an untrusted build", got)
	}
	if ev := e.events("pull-request"); !strings.Contains(ev, "CommitDenied") {
		t.Errorf("no CommitDenied event on the pod: %s", ev)
	}
	if g := e.generation("shared"); g != 1 {
		t.Errorf("generation = %d, want 1", g)
	}
}

// A failed build is not committed, unless it opts in.
func TestFailedBuilds(t *testing.T) {
	e := newEnv(t)
	e.run(buildPod("failing", "flaky", "write", "builder", `echo partial > /cache/failing; exit 3`, nil))
	e.settled()
	if g := e.generation("flaky"); g != 0 {
		t.Fatalf("a failed build was committed (generation %d)", g)
	}
	e.run(buildPod("failing-ok", "flaky", "write", "builder", `echo partial > /cache/kept; exit 3`,
		map[string]string{v1alpha1.AnnotationCommitOnFailure: "true"}))
	e.settled()
	if got := e.read("flaky", "check"); got != "kept=partial" {
		t.Fatalf("after commit-on-failure the cache holds %q", got)
	}
}

// Five writers at once on one cache: each sees only its own writes, and the
// final content is exactly one writer's output, never a mix.
func TestConcurrentWriters(t *testing.T) {
	e := newEnv(t)
	e.run(buildPod("base", "busy", "write", "builder", `echo base > /cache/base`, nil))
	e.settled()
	const writers = 5
	for i := range writers {
		p := buildPod(fmt.Sprintf("writer-%d", i), "busy", "write", "builder", fmt.Sprintf(
			// Wait until every writer has started, so that all five start
			// from the same generation; then write and list.
			`echo %d > /cache/owner; echo %d > /cache/w%d; sleep 6; ls /cache | sort | tr '\n' ' '`, i, i, i), nil)
		p.Namespace = e.ns
		e.create(p)
	}
	for i := range writers {
		phase, out := e.wait(fmt.Sprintf("writer-%d", i))
		if want := fmt.Sprintf("base owner w%d", i); phase != corev1.PodSucceeded || out != want {
			t.Errorf("writer-%d: %s, saw %q, want %q", i, phase, out, want)
		}
	}
	e.settled()
	got := e.read("busy", "check")
	var winner int
	if _, err := fmt.Sscanf(got[strings.Index(got, "owner=")+6:], "%d", &winner); err != nil {
		t.Fatalf("no owner in %q", got)
	}
	if want := fmt.Sprintf("base=base\nowner=%d\nw%d=%d", winner, winner, winner); got != want {
		t.Fatalf("final content %q, want exactly writer %d's: %q", got, winner, want)
	}
}

// The same cache name in two namespaces: two caches.
func TestNamespacesAreIsolated(t *testing.T) {
	a, b := newEnv(t), newEnv(t)
	a.run(buildPod("w", "same-name", "write", "builder", `echo a > /cache/team`, nil))
	b.run(buildPod("w", "same-name", "write", "builder", `echo b > /cache/team`, nil))
	a.settled()
	b.settled()
	if got := a.read("same-name", "r"); got != "team=a" {
		t.Errorf("namespace a sees %q", got)
	}
	if got := b.read("same-name", "r"); got != "team=b" {
		t.Errorf("namespace b sees %q", got)
	}
}

// Bad labels: the API server rejects the pod with the webhook's message.
func TestBadLabelsAreRejected(t *testing.T) {
	e := newEnv(t)
	p := buildPod("bad", "Not_A_Label", "", "", "true", nil)
	p.Namespace = e.ns
	err := c.Create(e.ctx, p)
	if err == nil || !strings.Contains(err.Error(), `label layercache.io/cache="Not_A_Label": must be a DNS-1123 label`) {
		t.Fatalf("err = %v", err)
	}
	p = buildPod("bad-path", "ok", "", "", "true", map[string]string{v1alpha1.AnnotationMountPath: "relative"})
	p.Namespace = e.ns
	if err := c.Create(e.ctx, p); err == nil || !strings.Contains(err.Error(), "must be an absolute path") {
		t.Fatalf("err = %v", err)
	}
}

// A hand-written claim of class layercache gets a read-only volume: never
// a commit, even from a pod whose service account may commit.
func TestHandWrittenClaimNeverCommits(t *testing.T) {
	e := newEnv(t)
	class := "layercache"
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "mine", Namespace: e.ns, Labels: map[string]string{v1alpha1.LabelCache: "sneaky"},
			Annotations: map[string]string{v1alpha1.LabelTrust: "write"}},
		Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class,
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
	}
	e.create(pvc)
	p := buildPod("sneaky", "", "", "builder", `echo evil > /data/x`, nil)
	p.Spec.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "mine"}}}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}
	if phase, out := e.run(p); phase != corev1.PodSucceeded {
		t.Fatalf("pod: %s %s", phase, out)
	}
	if ev := e.events("mine"); !strings.Contains(ev, "NotOwnedByBuildPod") {
		t.Errorf("no NotOwnedByBuildPod event: %s", ev)
	}
	if err := c.Delete(e.ctx, p); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(e.ctx, pvc); err != nil {
		t.Fatal(err)
	}
	e.settled()
	if g := e.generation("sneaky"); g != 0 {
		t.Fatalf("a hand-written claim committed (generation %d)", g)
	}
}

// The node agent restarts during a build: the build goes on and its
// commit still happens.
func TestNodeAgentRestartDuringBuild(t *testing.T) {
	e := newEnv(t)
	p := buildPod("long-build", "resilient", "write", "builder", `sleep 8; echo survived > /cache/result`, nil)
	p.Namespace = e.ns
	e.create(p)
	e.eventually("the build to run", 60*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKeyFromObject(p), p) == nil && p.Status.Phase == corev1.PodRunning
	})
	agent := e.agentOn(p.Spec.NodeName)
	if err := c.Delete(e.ctx, agent); err != nil {
		t.Fatal(err)
	}
	if phase, _ := e.wait("long-build"); phase != corev1.PodSucceeded {
		t.Fatalf("the build: %s", phase)
	}
	e.settled()
	if got := e.read("resilient", "check"); got != "result=survived" {
		t.Fatalf("after the agent's restart the cache holds %q", got)
	}
}

// Deleting a Cache deletes its data on the node.
func TestDeletingACacheDeletesItsData(t *testing.T) {
	e := newEnv(t)
	e.run(buildPod("w", "doomed", "write", "builder", `echo x > /cache/x`, nil))
	e.settled()
	dir := filepath.Join(storeDir(e.nodeOf("w")), "caches", e.ns, "doomed")
	ca := &v1alpha1.Cache{}
	e.eventually("the Cache", 30*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: "doomed"}, ca) == nil
	})
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("no data on the node before the deletion: %v", err)
	}
	if err := c.Delete(e.ctx, ca); err != nil {
		t.Fatal(err)
	}
	e.eventually("the Cache to go", 60*time.Second, func() bool {
		return apierrors.IsNotFound(c.Get(e.ctx, client.ObjectKeyFromObject(ca), ca))
	})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the cache's data is still on the node: %v", err)
	}
}

// A layercache-hostdir claim is a plain node-local directory; a Job whose
// template declares the "cache" emptyDir placeholder gets the cache there.
func TestHostDirAndJobPlaceholder(t *testing.T) {
	e := newEnv(t)
	class := "layercache-hostdir"
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "scratch", Namespace: e.ns},
		Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class,
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
	}
	e.create(pvc)
	p := buildPod("scratch-user", "", "", "", `echo hi > /scratch/f && cat /scratch/f && mount | grep -c ' /scratch '`, nil)
	p.Spec.Volumes = []corev1.Volume{{Name: "s", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "scratch"}}}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "s", MountPath: "/scratch"}}
	if phase, out := e.run(p); phase != corev1.PodSucceeded || !strings.HasPrefix(out, "hi") {
		t.Fatalf("host dir pod: %s %q", phase, out)
	}
	c.Delete(e.ctx, p)
	c.Delete(e.ctx, pvc)
	e.settled()

	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "go-build", Namespace: e.ns},
		Spec: batchv1.JobSpec{BackoffLimit: ptr(int32(0)), Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{v1alpha1.LabelCache: "job-cache", v1alpha1.LabelTrust: "write"}},
			Spec: corev1.PodSpec{
				ServiceAccountName: "builder", RestartPolicy: corev1.RestartPolicyNever,
				Containers: []corev1.Container{{Name: "build", Image: "localhost/busybox:dev", ImagePullPolicy: corev1.PullNever,
					Command:      []string{"sh", "-c", `echo from-job > /deps/out`},
					VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/deps"}}}},
				Volumes: []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
			},
		}},
	}
	e.create(job)
	e.eventually("the Job to complete", 120*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKeyFromObject(job), job) == nil && job.Status.Succeeded == 1
	})
	e.settled()
	if got := e.read("job-cache", "check"); got != "out=from-job" {
		t.Fatalf("after the Job the cache holds %q", got)
	}
}
