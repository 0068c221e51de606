package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
)

// certProjector installs the certificate that --cert-rotation keeps in a
// Secret: it copies the Secret into the webhook's cert dir, as the kubelet
// does for a Secret volume but without waiting for its sync period (the
// webhook server reloads changed files), and it keeps the webhook
// configuration's CA bundle trusting the Secret's CA and the one before
// it. A new CA goes into the bundle, and settle passes, before this
// replica serves a certificate that it signed: through a CA rotation the
// API server trusts every replica's certificate, old or new.
type certProjector struct {
	reader  client.Reader
	writer  client.Writer
	secret  types.NamespacedName
	webhook string
	dir     string
	every   time.Duration
	settle  time.Duration
	// trustedCA is the CA last seen in the bundle, since trustedSince.
	trustedCA    []byte
	trustedSince time.Time
}

// NeedLeaderElection: every replica serves the webhook.
func (p *certProjector) NeedLeaderElection() bool { return false }

func (p *certProjector) Start(ctx context.Context) error {
	log := logf.FromContext(ctx).WithName("cert-projector")
	interval := time.Second // fast until the certificate in place is current
	for {
		done, err := p.project(ctx)
		if err != nil {
			log.Error(err, "Installing the webhook certificate failed", "secret", p.secret)
		}
		interval = time.Second
		if done {
			interval = p.every
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

// project makes the bundle trust the Secret's CA, then writes the
// Secret's tls.crt, tls.key and ca.crt that changed; done is true once the
// Secret's certificate is in place.
func (p *certProjector) project(ctx context.Context) (bool, error) {
	s := &corev1.Secret{}
	if err := p.reader.Get(ctx, p.secret, s); err != nil {
		return false, client.IgnoreNotFound(err)
	}
	if len(s.Data["tls.crt"]) == 0 || len(s.Data["tls.key"]) == 0 || len(s.Data["ca.crt"]) == 0 {
		return false, nil
	}
	if err := p.trust(ctx, s.Data["ca.crt"]); err != nil {
		return false, err
	}
	current, err := os.ReadFile(filepath.Join(p.dir, "tls.crt"))
	if err == nil && !bytes.Equal(current, s.Data["tls.crt"]) && time.Since(p.trustedSince) < p.settle {
		// Serving already: give the API server time to see the bundle.
		return false, nil
	}
	return true, p.write(s)
}

// trust puts ca into every webhook's CA bundle (with the CA before it).
func (p *certProjector) trust(ctx context.Context, ca []byte) error {
	wh := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := p.reader.Get(ctx, client.ObjectKey{Name: p.webhook}, wh); err != nil {
		return fmt.Errorf("reading webhook configuration %s: %w", p.webhook, err)
	}
	changed := false
	for i := range wh.Webhooks {
		bundle := caBundle(ca, wh.Webhooks[i].ClientConfig.CABundle, time.Now())
		if !bytes.Equal(bundle, wh.Webhooks[i].ClientConfig.CABundle) {
			wh.Webhooks[i].ClientConfig.CABundle, changed = bundle, true
		}
	}
	if changed {
		if err := p.writer.Update(ctx, wh); err != nil {
			return fmt.Errorf("updating the CA bundle of webhook configuration %s: %w", p.webhook, err)
		}
	}
	if !bytes.Equal(ca, p.trustedCA) {
		p.trustedCA, p.trustedSince = ca, time.Now()
	}
	return nil
}

// caBundle is ca followed by the newest CA of old that is another one and
// has not expired at now: the CA before a rotation, whose certificates
// replicas may still serve.
func caBundle(ca, old []byte, now time.Time) []byte {
	current := pemBlocks(ca)
	var previous *pem.Block
	var previousStart time.Time
	for _, b := range pemBlocks(old) {
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil || now.After(cert.NotAfter) || slices.ContainsFunc(current, func(c *pem.Block) bool { return bytes.Equal(c.Bytes, b.Bytes) }) {
			continue
		}
		if previous == nil || cert.NotBefore.After(previousStart) {
			previous, previousStart = b, cert.NotBefore
		}
	}
	out := bytes.TrimRight(ca, "\n")
	out = append(append([]byte{}, out...), '\n')
	if previous != nil {
		out = append(out, pem.EncodeToMemory(previous)...)
	}
	return out
}

// pemBlocks decodes every PEM block of data.
func pemBlocks(data []byte) []*pem.Block {
	var out []*pem.Block
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return out
		}
		out = append(out, b)
	}
}

// write copies the Secret's files that changed into the cert dir.
func (p *certProjector) write(s *corev1.Secret) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	// The key first: the server reloads when tls.crt changes.
	for _, name := range []string{"tls.key", "ca.crt", "tls.crt"} {
		data, ok := s.Data[name]
		if !ok {
			continue
		}
		path := filepath.Join(p.dir, name)
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
			continue
		}
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			return err
		}
		if err := os.Rename(tmp, path); err != nil {
			return err
		}
	}
	return nil
}
