//go:build e2e

package e2e

import (
	"bytes"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// A rotation of the webhook's CA while labelled pods are created: the API
// server must trust every replica's serving certificate, old or new,
// throughout, so none is refused and none runs uncached (on main, the CA
// bundle switched to the new CA at once while the replicas served the old
// certificate for up to a minute: 113 of 200 pods ran uncached).
func TestCARotationSkipsNoPod(t *testing.T) {
	e := newEnv(t)
	e.twoManagers()
	secret := client.ObjectKey{Namespace: "layercache-system", Name: "layercache-webhook-server-cert"}
	bundle := func() []byte {
		wh := &admissionregistrationv1.MutatingWebhookConfiguration{}
		if err := c.Get(e.ctx, client.ObjectKey{Name: "layercache-mutating-webhook-configuration"}, wh); err != nil {
			t.Fatal(err)
		}
		return wh.Webhooks[0].ClientConfig.CABundle
	}
	before := bundle()

	stopStorm := e.stormUntil("rot", 200, 250*time.Millisecond)
	time.Sleep(3 * time.Second)
	// An invalid CA key makes the manager rotate the CA and the serving
	// certificate, as it does before the CA expires.
	s := &corev1.Secret{}
	if err := c.Get(e.ctx, secret, s); err != nil {
		t.Fatal(err)
	}
	s.Data["ca.key"] = []byte("expired")
	if err := c.Update(e.ctx, s); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	e.eventually("the CA bundle to change", 60*time.Second, func() bool { return !bytes.Equal(bundle(), before) })
	t.Logf("CA bundle changed %.1fs after the rotation began", time.Since(started).Seconds())
	// Until every replica serves the new certificate: each copies the
	// Secret every 30 s, then waits 5 s for the bundle to reach the API
	// server.
	time.Sleep(time.Until(started.Add(50 * time.Second)))
	names, refused := stopStorm()
	if skipped := e.stormOutcome("the rotation", started, names, refused); len(skipped) > 0 {
		t.Errorf("%d pods uncached during a CA rotation: %v", len(skipped), skipped)
	}
	e.settled()
}
