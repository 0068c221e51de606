package webhook_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	ctrlwebhook "sigs.k8s.io/controller-runtime/pkg/webhook"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/testenv"
	"github.com/layercache/layercache/webhook"
)

type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, msg string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, msg)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.msgs
	w.msgs = nil
	return out
}

// The webhook as the API server calls it: served over TLS by a manager,
// configured from config/webhook (selectors included), exercised by
// creating pods through the API and reading back what was stored.
func TestWebhookThroughTheAPIServer(t *testing.T) {
	env := testenv.Start(t, testenv.Options{WebhookPaths: []string{"config/webhook"}})
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme:  env.Scheme,
		Metrics: metricsserver.Options{BindAddress: "0"},
		WebhookServer: ctrlwebhook.NewServer(ctrlwebhook.Options{
			Host: env.Webhook.LocalServingHost, Port: env.Webhook.LocalServingPort, CertDir: env.Webhook.LocalServingCertDir,
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := webhook.Setup(mgr, webhook.Options{StorageClass: "layercache", DefaultSize: resource.MustParse("10Gi")}); err != nil {
		t.Fatal(err)
	}
	ctx := testenv.RunManager(t, mgr)

	warn := &warnings{}
	cfg := rest.CopyConfig(env.Config)
	cfg.WarningHandler = warn
	cs := kubernetes.NewForConfigOrDie(cfg)
	c, err := client.New(cfg, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	ns := newNamespace(t, ctx, c)
	// Wait until the webhook answers (the server starts with the manager).
	deadline := time.Now().Add(30 * time.Second)
	for {
		p := pod("probe", map[string]string{v1alpha1.LabelCache: "probe"}, nil)
		_, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("webhook not serving: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	t.Run("labelled pod gets a claim, mounts and no affinity without a Cache", func(t *testing.T) {
		got := create(t, ctx, cs, ns, pod("build", map[string]string{v1alpha1.LabelCache: "example-project", v1alpha1.LabelTrust: "write"},
			map[string]string{v1alpha1.AnnotationMountPath: "/root/.m2"}))
		claims := claimsOf(t, got)
		if len(claims) != 1 || claims[0].Cache != "example-project" || claims[0].Trust != "write" ||
			!strings.HasPrefix(claims[0].ClaimName, "build-example-project-") || claims[0].Size != "10Gi" {
			t.Fatalf("claims = %+v", claims)
		}
		if v := volume(got, "cache"); v == nil || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != claims[0].ClaimName {
			t.Fatalf("volumes = %+v", got.Spec.Volumes)
		}
		for _, ctr := range append(got.Spec.InitContainers, got.Spec.Containers...) {
			if len(ctr.VolumeMounts) == 0 || ctr.VolumeMounts[len(ctr.VolumeMounts)-1].MountPath != "/root/.m2" {
				t.Errorf("container %s: mounts %+v", ctr.Name, ctr.VolumeMounts)
			}
		}
		if got.Spec.Affinity != nil {
			t.Errorf("affinity without a Cache: %+v", got.Spec.Affinity)
		}
		// Held back from the scheduler until the manager made its claim.
		if g := got.Spec.SchedulingGates; len(g) != 1 || g[0].Name != v1alpha1.SchedulingGate {
			t.Errorf("scheduling gates = %+v", g)
		}
	})

	t.Run("a hand-written claims annotation is denied", func(t *testing.T) {
		p := pod("forged", map[string]string{v1alpha1.LabelCache: "example-project"},
			map[string]string{v1alpha1.AnnotationClaims: `[{"cache":"example-project","claimName":"huge","volume":"cache","trust":"read","size":"50Ti","storageClass":"fast-ssd"}]`})
		p.Spec.Volumes = []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "huge"}}}}
		_, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "annotation layercache.io/claims is written by layercache's webhook and does not match this pod") {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("nodes holding the cache are preferred", func(t *testing.T) {
		cache := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "warm", Namespace: ns}}
		if err := c.Create(ctx, cache); err != nil {
			t.Fatal(err)
		}
		now := metav1.Now()
		cache.Status.Nodes = []v1alpha1.NodeCacheStatus{{Node: "node-a", Generation: 2, LastCommitTime: &now}}
		if err := c.Status().Update(ctx, cache); err != nil {
			t.Fatal(err)
		}
		// The webhook reads through the manager's cache: wait for it.
		waitFor(t, func() bool {
			var seen v1alpha1.Cache
			return mgr.GetClient().Get(ctx, client.ObjectKeyFromObject(cache), &seen) == nil && len(seen.Status.Nodes) == 1
		})
		got := create(t, ctx, cs, ns, pod("warm-build", map[string]string{v1alpha1.LabelCache: "warm"}, nil))
		a := got.Spec.Affinity
		if a == nil || a.NodeAffinity == nil || len(a.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution) != 1 {
			t.Fatalf("affinity = %+v", a)
		}
		term := a.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution[0]
		if term.Weight != 100 || term.Preference.MatchFields[0].Values[0] != "node-a" {
			t.Errorf("term = %+v", term)
		}
	})

	t.Run("a pod from a template has no name and no namespace at admission", func(t *testing.T) {
		body := `{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"job-7f9c2-","labels":{"layercache.io/cache":"deps"}},
			"spec":{"restartPolicy":"Never","volumes":[{"name":"cache","emptyDir":{}}],
			"containers":[{"name":"main","image":"busybox","volumeMounts":[{"name":"cache","mountPath":"/deps","subPath":"x"}]}]}}`
		raw, err := cs.CoreV1().RESTClient().Post().AbsPath("/api/v1/namespaces", ns, "pods").
			SetHeader("Content-Type", "application/json").Body([]byte(body)).Do(ctx).Raw()
		if err != nil {
			t.Fatal(err)
		}
		var got corev1.Pod
		if err := json.Unmarshal(raw, &got); err != nil {
			t.Fatal(err)
		}
		claims := claimsOf(t, &got)
		if len(claims) != 1 || !strings.HasPrefix(claims[0].ClaimName, "job-7f9c2-deps-") {
			t.Fatalf("claims = %+v", claims)
		}
		v := volume(&got, "cache")
		if v == nil || v.EmptyDir != nil || v.PersistentVolumeClaim.ClaimName != claims[0].ClaimName {
			t.Fatalf("placeholder not replaced: %+v", got.Spec.Volumes)
		}
		if m := got.Spec.Containers[0].VolumeMounts; len(m) != 1 || m[0].MountPath != "/deps" || m[0].SubPath != "x" {
			t.Errorf("the pod's own mount changed: %+v", m)
		}
	})

	t.Run("pods without the label are untouched", func(t *testing.T) {
		got := create(t, ctx, cs, ns, pod("plain", nil, nil))
		if _, ok := got.Annotations[v1alpha1.AnnotationClaims]; ok || volume(got, "cache") != nil {
			t.Fatalf("unlabelled pod was mutated: %+v", got)
		}
	})

	t.Run("bad labels are rejected with a message naming them", func(t *testing.T) {
		for _, tt := range []struct {
			labels, ann map[string]string
			want        string
		}{
			{map[string]string{v1alpha1.LabelCache: "Bad_Name"}, nil, `label layercache.io/cache="Bad_Name": must be a DNS-1123 label`},
			{map[string]string{v1alpha1.LabelCache: "x", v1alpha1.LabelTrust: "yes"}, nil, `label layercache.io/trust="yes": must be "read" or "write"`},
			{map[string]string{v1alpha1.LabelCache: "x"}, map[string]string{v1alpha1.AnnotationMountPath: "cache"}, `annotation layercache.io/mount-path="cache": must be an absolute path`},
			{map[string]string{v1alpha1.LabelCache: "x"}, map[string]string{v1alpha1.AnnotationSize: "big"}, `annotation layercache.io/size="big"`},
		} {
			_, err := cs.CoreV1().Pods(ns).Create(ctx, pod("bad", tt.labels, tt.ann), metav1.CreateOptions{})
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "denied") {
				t.Errorf("%v %v: err = %v, want a denial containing %q", tt.labels, tt.ann, err, tt.want)
			}
		}
		if pods, _ := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{}); podNamed(pods.Items, "bad") {
			t.Error("a rejected pod was stored")
		}
	})

	t.Run("a writer that never terminates is admitted with a warning", func(t *testing.T) {
		warn.take()
		p := pod("server", map[string]string{v1alpha1.LabelCache: "x", v1alpha1.LabelTrust: "write"}, nil)
		p.Spec.RestartPolicy = corev1.RestartPolicyAlways
		create(t, ctx, cs, ns, p)
		msgs := warn.take()
		if len(msgs) != 1 || !strings.Contains(msgs[0], "will never be committed") {
			t.Errorf("warnings = %v", msgs)
		}
	})

	t.Run("a privileged pod gets a cache only where its namespace allows it", func(t *testing.T) {
		privileged := func(name string) *corev1.Pod {
			p := pod(name, map[string]string{v1alpha1.LabelCache: "podman"}, nil)
			p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: ptr(true)}
			return p
		}
		_, err := cs.CoreV1().Pods(ns).Create(ctx, privileged("root"), metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "container main is privileged: such a pod owns its node") ||
			!strings.Contains(err.Error(), "layercache.io/privileged=allow") {
			t.Fatalf("a privileged pod in a namespace that does not allow it: %v", err)
		}
		host := pod("host", map[string]string{v1alpha1.LabelCache: "podman"}, nil)
		host.Spec.HostPID = true
		if _, err := cs.CoreV1().Pods(ns).Create(ctx, host, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "hostPID") {
			t.Fatalf("a hostPID pod: %v", err)
		}
		allowing := newNamespace(t, ctx, c, v1alpha1.LabelPrivileged, v1alpha1.PrivilegedAllow)
		if got := create(t, ctx, cs, allowing, privileged("root")); len(claimsOf(t, got)) != 1 {
			t.Errorf("a privileged pod where the namespace allows it got no claim")
		}
	})

	t.Run("setuid only where the namespace allows it", func(t *testing.T) {
		setuid := func(name string) *corev1.Pod {
			return pod(name, map[string]string{v1alpha1.LabelCache: "tools"}, map[string]string{v1alpha1.AnnotationSetuid: "true"})
		}
		_, err := cs.CoreV1().Pods(ns).Create(ctx, setuid("suid"), metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "annotation layercache.io/setuid=true: a setuid binary") ||
			!strings.Contains(err.Error(), "layercache.io/setuid=allow") {
			t.Fatalf("a setuid pod in a namespace that does not allow it: %v", err)
		}
		allowing := newNamespace(t, ctx, c, v1alpha1.LabelSetuid, v1alpha1.SetuidAllow)
		if claims := claimsOf(t, create(t, ctx, cs, allowing, setuid("suid"))); len(claims) != 1 || !claims[0].Setuid {
			t.Errorf("a setuid pod where the namespace allows it: claims %+v", claims)
		}
	})

	t.Run("kube-system is excluded", func(t *testing.T) {
		got := create(t, ctx, cs, "kube-system", pod("sys", map[string]string{v1alpha1.LabelCache: "x"}, nil))
		defer cs.CoreV1().Pods("kube-system").Delete(ctx, got.Name, metav1.DeleteOptions{})
		if _, ok := got.Annotations[v1alpha1.AnnotationClaims]; ok {
			t.Error("a kube-system pod was mutated")
		}
	})
}

// newNamespace creates a namespace, with labels as key, value pairs.
func newNamespace(t *testing.T, ctx context.Context, c client.Client, labels ...string) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "webhook-", Labels: map[string]string{}}}
	for i := 0; i+1 < len(labels); i += 2 {
		ns.Labels[labels[i]] = labels[i+1]
	}
	if err := c.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	// envtest runs no controller-manager: create the ServiceAccount that
	// the ServiceAccount admission plugin looks for.
	if err := c.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: ns.Name}}); err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

func pod(name string, labels, ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Annotations: ann},
		Spec: corev1.PodSpec{
			RestartPolicy:  corev1.RestartPolicyNever,
			InitContainers: []corev1.Container{{Name: "init", Image: "busybox"}},
			Containers:     []corev1.Container{{Name: "main", Image: "busybox"}},
		},
	}
}

func create(t *testing.T, ctx context.Context, cs kubernetes.Interface, ns string, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	got, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func claimsOf(t *testing.T, p *corev1.Pod) []v1alpha1.Claim {
	t.Helper()
	var claims []v1alpha1.Claim
	if err := json.Unmarshal([]byte(p.Annotations[v1alpha1.AnnotationClaims]), &claims); err != nil {
		t.Fatalf("pod %s: claims annotation %q: %v", p.Name, p.Annotations[v1alpha1.AnnotationClaims], err)
	}
	return claims
}

func volume(p *corev1.Pod, name string) *corev1.Volume {
	for i := range p.Spec.Volumes {
		if p.Spec.Volumes[i].Name == name {
			return &p.Spec.Volumes[i]
		}
	}
	return nil
}

func podNamed(pods []corev1.Pod, name string) bool {
	for _, p := range pods {
		if p.Name == name {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ptr[T any](v T) *T { return &v }
