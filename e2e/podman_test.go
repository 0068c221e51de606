//go:build e2e && extended

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// pushImage pushes an image of the project (an OCI layout tarball under
// bin/) to the local cluster's registry as ref.
func pushImage(t *testing.T, tarball, ref string) {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("tar", "-xf", filepath.Join("..", "bin", tarball), "-C", dir).CombinedOutput(); err != nil {
		t.Fatalf("unpacking %s: %v %s", tarball, err, out)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil || len(m.Manifests) == 0 {
		t.Fatalf("%s's index: %v", tarball, err)
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	user, pass := registryUser(t)
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	// This host's route to the registry's cluster IP may take a moment.
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(2 * time.Second) {
		if err = remote.Write(r, img, remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
}

// nestedPodman is a build pod that runs podman inside, with its container
// storage on the cache: privileged (podman mounts fuse-overlayfs over
// /dev/fuse, and runs its container with crun).
func nestedPodman(name, script string) *corev1.Pod {
	p := buildPod(name, "containers", "write", "builder", script,
		map[string]string{v1alpha1.AnnotationMountPath: "/var/lib/containers"})
	c := &p.Spec.Containers[0]
	c.Image, c.Command = "localhost/podman:dev", []string{"bash", "-c", script}
	c.SecurityContext = &corev1.SecurityContext{Privileged: ptr(true)}
	// podman signs in to the local registry with the credentials that
	// registryClient copied into the namespace.
	c.Env = []corev1.EnvVar{{Name: "REGISTRY_AUTH_FILE", Value: "/run/registry-auth/" + corev1.DockerConfigJsonKey}}
	c.VolumeMounts = []corev1.VolumeMount{{Name: "registry-auth", MountPath: "/run/registry-auth", ReadOnly: true}}
	p.Spec.Volumes = []corev1.Volume{{Name: "registry-auth", VolumeSource: corev1.VolumeSource{
		Secret: &corev1.SecretVolumeSource{SecretName: "registry-auth"}}}}
	return p
}

// registryClient lets the namespace's pods pull from the local registry:
// its credentials as the Secret registry-auth, and the label that the
// registry's NetworkPolicy admits (config/local/registry.yaml).
func (e *env) registryClient() {
	e.t.Helper()
	sec := &corev1.Secret{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: "layercache-system", Name: "layercache-registry-auth"}, sec); err != nil {
		e.t.Fatal(err)
	}
	e.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "registry-auth", Namespace: e.ns}, Type: sec.Type, Data: sec.Data})
	e.labelNamespace("layercache-registry-client", "allow")
}

// The seed's original demo: a pod runs a nested podman whose storage is a
// cache; it pulls an image (the Go toolchain image, 66 MB) from the
// registry and runs it. The next pod runs the image without pulling it:
// podman says nothing of a pull.
func TestNestedPodmanImageStaysCached(t *testing.T) {
	for _, img := range []string{"podman/podman.tar", "bench/golang.tar"} {
		if _, err := os.Stat(filepath.Join("..", "bin", img)); err != nil {
			t.Fatalf("no bin/%s: make test-extended builds it (hack/images/build.sh podman, golang): %v", img, err)
		}
	}
	e := newEnv(t)
	e.labelNamespace(v1alpha1.LabelPrivileged, v1alpha1.PrivilegedAllow)
	e.registryClient()
	ref := registryHost + "/e2e/golang:nested"
	pushImage(t, "bench/golang.tar", ref)
	run := `set -e; TIMEFORMAT='podman run took %R s'; time podman run --rm ` + ref + ` sh -c 'echo hello-from-nested; go version' 2>&1
		echo "images: $(podman images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"`

	phase, first := e.run(nestedPodman("podman-1", run))
	if phase != corev1.PodSucceeded || !strings.Contains(first, "hello-from-nested") || !strings.Contains(first, "Trying to pull "+ref) {
		t.Fatalf("the first pod: %s:\n%s", phase, first)
	}
	e.settled()
	e.eventually("the containers cache's commit", 30*time.Second, func() bool { return e.generation("containers") >= 1 })

	phase, second := e.run(nestedPodman("podman-2", run))
	if phase != corev1.PodSucceeded || !strings.Contains(second, "hello-from-nested") {
		t.Fatalf("the second pod: %s:\n%s", phase, second)
	}
	if strings.Contains(second, "Trying to pull") || strings.Contains(second, "Copying blob") {
		t.Errorf("the second pod pulled the image again:\n%s", second)
	}
	if !strings.Contains(second, "images: "+ref) {
		t.Errorf("the second pod's podman does not list %s:\n%s", ref, second)
	}
	t.Logf("first pod:\n%s\nsecond pod:\n%s", first, second)
	if !strings.Contains(second, "go version go1.") {
		t.Errorf("the cached image does not run go:\n%s", second)
	}
}
