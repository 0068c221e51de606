package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
)

// certProjector copies the certificate Secret that --cert-rotation fills
// into the webhook's cert dir, as the kubelet does for a Secret volume but
// without waiting for its sync period; it keeps doing so, so rotated
// certificates reach the webhook server (which reloads changed files).
type certProjector struct {
	reader client.Reader
	secret types.NamespacedName
	dir    string
	every  time.Duration
}

// NeedLeaderElection: every replica serves the webhook.
func (p *certProjector) NeedLeaderElection() bool { return false }

func (p *certProjector) Start(ctx context.Context) error {
	log := logf.FromContext(ctx).WithName("cert-projector")
	interval := time.Second // fast until the first certificate is there
	for {
		done, err := p.project(ctx)
		if err != nil {
			log.Error(err, "Copying the webhook certificate failed", "secret", p.secret)
		}
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

// project writes the Secret's tls.crt, tls.key and ca.crt that changed;
// done is true once a certificate is in place.
func (p *certProjector) project(ctx context.Context) (bool, error) {
	s := &corev1.Secret{}
	if err := p.reader.Get(ctx, p.secret, s); err != nil {
		return false, client.IgnoreNotFound(err)
	}
	if len(s.Data["tls.crt"]) == 0 || len(s.Data["tls.key"]) == 0 {
		return false, nil
	}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return false, err
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
			return false, err
		}
		if err := os.Rename(tmp, path); err != nil {
			return false, err
		}
	}
	return true, nil
}
