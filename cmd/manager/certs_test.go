package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
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
}
