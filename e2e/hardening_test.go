//go:build e2e

package e2e

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

const forgedClaims = `[{"cache":"forged","claimName":"huge","volume":"cache","trust":"write","size":"50Ti","storageClass":"fast-ssd"}]`

func forgedPod(name string) *corev1.Pod {
	p := buildPod(name, "forged", "write", "", "true", map[string]string{v1alpha1.AnnotationClaims: forgedClaims})
	p.Spec.Volumes = []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "huge"}}}}
	return p
}

// A pod that writes the claims annotation itself is refused by the
// webhook; where the webhook does not run (kube-system), the manager
// creates nothing for it and says why.
func TestForgedClaimsAnnotation(t *testing.T) {
	e := newEnv(t)
	p := forgedPod("forged")
	p.Namespace = e.ns
	if err := c.Create(e.ctx, p); err == nil || !strings.Contains(err.Error(), "annotation layercache.io/claims is written by layercache's webhook") {
		t.Fatalf("a forged pod was admitted: %v", err)
	}

	sys := forgedPod("layercache-e2e-forged-" + e.ns)
	sys.Namespace = "kube-system"
	if err := c.Create(e.ctx, sys); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Delete(e.ctx, sys) })
	kube := &env{t: t, ctx: e.ctx, ns: "kube-system"}
	kube.eventually("a BadClaims event", 30*time.Second, func() bool {
		return strings.Contains(kube.events(sys.Name), `storage class "fast-ssd": only "layercache" is allowed`)
	})
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: "kube-system", Name: "huge"}, &corev1.PersistentVolumeClaim{}); !apierrors.IsNotFound(err) {
		t.Fatalf("a claim was created for a forged annotation: %v", err)
	}
}

// A build that writes more than its layercache.io/size is stopped within
// 15 s and commits nothing, even under a PodDisruptionBudget that allows no
// disruption (on main, the Eviction API refused it, and the build went on
// writing); a neighbour on the same cache finishes and commits.
func TestVolumeSizeIsEnforced(t *testing.T) {
	e := newEnv(t)
	size := map[string]string{v1alpha1.AnnotationSize: "10Mi"}
	greedy := buildPod("greedy", "sized", "write", "builder",
		`dd if=/dev/zero of=/cache/huge bs=1M count=40 2>/dev/null; echo written; sleep 120`, size)
	greedy.Namespace = e.ns
	greedy.Labels["app"] = "greedy"
	zero := intstr.FromInt32(0)
	e.create(&policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: "greedy", Namespace: e.ns},
		Spec: policyv1.PodDisruptionBudgetSpec{MaxUnavailable: &zero,
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "greedy"}}}})
	e.create(greedy)
	neighbour := buildPod("neighbour", "sized", "write", "builder", `sleep 8; echo ok > /cache/fits`, size)
	neighbour.Namespace = e.ns
	e.create(neighbour)

	e.eventually("the greedy build to write", 90*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKeyFromObject(greedy), greedy) == nil && greedy.Status.Phase == corev1.PodRunning &&
			strings.Contains(e.logsOrEmpty("greedy"), "written")
	})
	written := time.Now()
	e.eventually("the greedy build to be stopped", 15*time.Second, func() bool {
		err := c.Get(e.ctx, client.ObjectKeyFromObject(greedy), greedy)
		return apierrors.IsNotFound(err) || (err == nil && greedy.DeletionTimestamp != nil)
	})
	t.Logf("stopped %.1fs after its writes", time.Since(written).Seconds())
	// Events are recorded asynchronously: the deletion may come first.
	e.eventually("a VolumeSizeExceeded event naming the size", 10*time.Second, func() bool {
		ev := e.events("greedy")
		return strings.Contains(ev, "VolumeSizeExceeded") && strings.Contains(ev, "more than its size 10Mi")
	})
	if phase, _ := e.wait("neighbour"); phase != corev1.PodSucceeded {
		t.Fatalf("the neighbour: %s", phase)
	}
	e.settled()
	if got := e.read("sized", "check"); got != "fits=ok" {
		t.Fatalf("the cache holds %q: want the neighbour's writes only", got)
	}
}

func (e *env) logsOrEmpty(name string) string {
	raw, err := cs.CoreV1().Pods(e.ns).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(e.ctx)
	if err != nil {
		return ""
	}
	return string(raw)
}

// Cache volumes are nosuid unless the pod asks for layercache.io/setuid
// and its namespace allows it: the webhook refuses the annotation
// elsewhere, naming the label that would allow it.
func TestSetuidOnlyWhereTheNamespaceAllows(t *testing.T) {
	e := newEnv(t)
	mountOptions := `awk '$5 == "/cache" { print $6 }' /proc/self/mountinfo`
	setuid := map[string]string{v1alpha1.AnnotationSetuid: "true"}
	refused := buildPod("refused", "tools", "read", "", mountOptions, setuid)
	refused.Namespace = e.ns
	if err := c.Create(e.ctx, refused); err == nil || !strings.Contains(err.Error(), "layercache.io/setuid=allow") {
		t.Fatalf("a setuid pod in a namespace that does not allow it: %v", err)
	}

	e.labelNamespace(v1alpha1.LabelSetuid, v1alpha1.SetuidAllow)
	phase, opts := e.run(buildPod("setuid", "tools", "read", "", mountOptions, setuid))
	if phase != corev1.PodSucceeded || strings.Contains(opts, "nosuid") || !strings.Contains(opts, "nodev") {
		t.Errorf("a setuid pod where the namespace allows it: %s, its cache mounted %q: want nodev without nosuid", phase, opts)
	}
	phase, opts = e.run(buildPod("plain", "tools", "read", "", mountOptions, nil))
	if phase != corev1.PodSucceeded || !strings.Contains(opts, "nosuid") || !strings.Contains(opts, "nodev") {
		t.Errorf("a pod that does not ask for setuid: %s, its cache mounted %q: want nosuid,nodev", phase, opts)
	}
}

// A claim written by hand, of either class, has no build pod for the
// manager to delete when its volume outgrows its size: the node agent
// makes the volume read-only instead, so that its pods' writes stop
// within a measuring interval (on main, they went on until the disk was
// full).
func TestHandWrittenClaimsOverTheirSizeStopWriting(t *testing.T) {
	e := newEnv(t)
	// Fill past the size, then write once a second until refused.
	script := `dd if=/dev/zero of=/data/huge bs=1M count=20 2>/dev/null
for i in $(seq 60); do
  if ! (echo $i > /data/more-$i) 2>/dev/null; then echo "refused after $i s"; exit 0; fi
  sleep 1
done
echo still writable after 60 s`
	var pods []string
	for _, class := range []string{"layercache-hostdir", "layercache"} {
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: class, Namespace: e.ns},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class,
				AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("10Mi")}}},
		}
		if class == "layercache" {
			pvc.Labels = map[string]string{v1alpha1.LabelCache: "by-hand"}
		}
		e.create(pvc)
		p := buildPod("writer-"+class, "", "", "", script, nil)
		p.Namespace = e.ns
		p.Spec.Volumes = []corev1.Volume{{Name: "d", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: class}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "d", MountPath: "/data"}}
		e.create(p)
		pods = append(pods, p.Name)
	}
	for _, name := range pods {
		if phase, out := e.wait(name); phase != corev1.PodSucceeded || !strings.HasPrefix(out, "refused after") {
			t.Errorf("%s: %s, %q: want its writes refused", name, phase, out)
		} else {
			t.Logf("%s: %s", name, out)
		}
	}
}
