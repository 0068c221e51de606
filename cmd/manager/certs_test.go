package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/layercache/layercache/internal/testenv"
)

// Without cert-manager (--cert-rotation) the manager provisions its
// webhook's certificate: a CA and a serving certificate in a Secret, the
// files in the cert dir, and the CA in the webhook configuration that
// config/webhook installs. Then it reports ready.
func TestManagerProvisionsItsOwnCertificate(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	ns := "layercache-system"
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	// config/local ships the (empty) Secret the rotator fills.
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "layercache-webhook-server-cert"}}
	if err := env.Client.Create(ctx, secret); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(env.Root, "config", "webhook", "manifests.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	wh := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := yaml.NewYAMLOrJSONDecoder(f, 4096).Decode(wh); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, wh); err != nil {
		t.Fatal(err)
	}

	certDir := t.TempDir()
	port := freePort(t)
	cfg := parse(t, "--cert-rotation", "--namespace", ns, "--webhook-cert-dir", certDir,
		"--webhook-port", fmt.Sprint(freePort(t)), "--health-probe-bind-address", fmt.Sprintf("127.0.0.1:%d", port))
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- run(runCtx, cfg, env.Config) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}()

	ready := func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	for deadline := time.Now().Add(60 * time.Second); !ready(); time.Sleep(200 * time.Millisecond) {
		select {
		case err := <-done:
			done <- nil // for the deferred stop
			t.Fatalf("the manager stopped: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the manager never became ready")
		}
	}
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(secret), secret); err != nil || len(secret.Data["tls.crt"]) == 0 {
		t.Fatalf("no certificate in the Secret: %v", err)
	}
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(wh), wh); err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(wh.Webhooks[0].ClientConfig.CABundle) {
		t.Fatal("no CA bundle injected into the webhook configuration")
	}
	pemBytes, err := os.ReadFile(filepath.Join(certDir, "tls.crt"))
	if err != nil {
		t.Fatalf("no certificate in the cert dir: %v", err)
	}
	block, _ := pem.Decode(pemBytes)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	dns := "layercache-webhook-service.layercache-system.svc"
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: dns}); err != nil {
		t.Errorf("the serving certificate does not verify for %s against the injected CA: %v", dns, err)
	}
	if !slices.Contains(cert.DNSNames, dns+".cluster.local") {
		t.Errorf("DNS names = %v", cert.DNSNames)
	}

	// A CA rotation (forced by an invalid CA key): at every moment the
	// certificate the replica serves verifies against the bundle; at the
	// end the bundle holds the new CA and the old one, and the replica
	// serves the new certificate. On main the bundle held only the new CA
	// for up to a minute while the old certificate was served.
	oldCert := pemBytes
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(secret), secret); err != nil {
		t.Fatal(err)
	}
	secret.Data["ca.key"] = []byte("expired")
	if err := env.Client.Update(ctx, secret); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(wh), wh); err != nil {
			t.Fatal(err)
		}
		served, err := os.ReadFile(filepath.Join(certDir, "tls.crt"))
		if err != nil {
			t.Fatal(err)
		}
		if err := verifies(served, wh.Webhooks[0].ClientConfig.CABundle, dns); err != nil {
			t.Fatalf("during the rotation, the served certificate does not verify against the bundle: %v", err)
		}
		if !bytes.Equal(served, oldCert) {
			if err := verifies(oldCert, wh.Webhooks[0].ClientConfig.CABundle, dns); err != nil {
				t.Errorf("after the rotation, the old certificate (other replicas may serve it) does not verify: %v", err)
			}
			if n := len(pemCerts(t, wh.Webhooks[0].ClientConfig.CABundle)); n != 2 {
				t.Errorf("after the rotation the bundle holds %d CAs, want the new one and the old one", n)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the replica never served the rotated certificate")
		}
	}
}

func verifies(certPEM, bundle []byte, dns string) error {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundle) {
		return fmt.Errorf("no CA in the bundle")
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return fmt.Errorf("no PEM certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return err
	}
	_, err = cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: dns})
	return err
}

func pemCerts(t *testing.T, data []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return out
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
}

// The bundle keeps the CA before the current one while it is valid, and
// only the newest such: certificates it signed may still be served.
func TestCABundleKeepsThePreviousCA(t *testing.T) {
	now := time.Now()
	ca := func(name string, start time.Time, life time.Duration) []byte {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
			NotBefore: start, NotAfter: start.Add(life), IsCA: true, BasicConstraintsValid: true}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	names := func(bundle []byte) []string {
		var out []string
		for _, c := range pemCerts(t, bundle) {
			out = append(out, c.Subject.CommonName)
		}
		return out
	}
	older, old, expired := ca("older", now.Add(-3*time.Hour), 10*time.Hour), ca("old", now.Add(-2*time.Hour), 10*time.Hour), ca("expired", now.Add(-time.Hour), time.Minute)
	current := ca("current", now.Add(-time.Hour), 10*time.Hour)
	for _, tt := range []struct {
		name string
		old  []byte
		want []string
	}{
		{"first", nil, []string{"current"}},
		{"garbage", []byte("Cg=="), []string{"current"}},
		{"unchanged", current, []string{"current"}},
		{"after a rotation", old, []string{"current", "old"}},
		{"the next rotation drops the oldest", slices.Concat(old, older), []string{"current", "old"}},
		{"an expired CA is dropped", slices.Concat(expired, current), []string{"current"}},
		{"stable", caBundle(current, old, now), []string{"current", "old"}},
	} {
		if got := names(caBundle(current, tt.old, now)); !slices.Equal(got, tt.want) {
			t.Errorf("%s: bundle of %v, want %v", tt.name, got, tt.want)
		}
	}
	if b := caBundle(current, old, now); !bytes.Equal(caBundle(current, b, now), b) {
		t.Error("the bundle is not stable: every pass would update the webhook configuration")
	}
}
