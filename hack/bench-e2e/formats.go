package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// downloadInit is an init container's script that downloads the blobs of
// image (a reference by digest) to /dev/null: what a pull cannot beat.
func (b *bench) downloadInit(image string) (string, error) {
	user, pass, err := b.registryUser()
	if err != nil {
		return "", err
	}
	ref, err := name.ParseReference(image, name.Insecure)
	if err != nil {
		return "", err
	}
	img, err := remote.Image(ref, remote.WithContext(b.ctx), remote.WithAuth(&authn.Basic{Username: user, Password: pass}))
	if err != nil {
		return "", err
	}
	m, err := img.Manifest()
	if err != nil {
		return "", err
	}
	var gets []string
	for _, l := range m.Layers {
		gets = append(gets, fmt.Sprintf("wget -q -O /dev/null http://%s:%s@%s/v2/%s/blobs/%s", user, pass, registryHost, ref.Context().RepositoryStr(), l.Digest))
	}
	return strings.Join(gets, " && "), nil
}

// coldAndRead is a cold on-demand start on node2 and, once the cache is
// there, a pod reading every file of it (tar -cf /dev/null: the script's
// own time).
func (b *bench) coldAndRead(cache string) (start, read time.Duration, err error) {
	if err := b.forget(cache, "node2"); err != nil {
		return 0, 0, err
	}
	t, err := b.pod("pull", podSpec{node: "node2", cache: cache, trust: "read", script: "true"})
	if err != nil {
		return 0, 0, err
	}
	r, err := b.pod("read", podSpec{node: "node2", cache: cache, trust: "read", script: "tar -cf /dev/null /cache"})
	if err != nil {
		return 0, 0, err
	}
	return t.start, r.end - r.start, nil
}

// setLayerFormat rolls the node agents out with --layer-format=format
// ("" for the default) and waits until every node runs it.
func (b *bench) setLayerFormat(format string) error {
	dss := b.cs.AppsV1().DaemonSets("layercache-system")
	ds, err := dss.Get(b.ctx, "layercache-node-agent", metav1.GetOptions{})
	if err != nil {
		return err
	}
	c := &ds.Spec.Template.Spec.Containers[0]
	c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--layer-format=") })
	if format != "" {
		c.Args = append(c.Args, "--layer-format="+format)
	}
	if ds, err = dss.Update(b.ctx, ds, metav1.UpdateOptions{}); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "node agents rolling out with --layer-format=%s...\n", format)
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(time.Second) {
		cur, err := dss.Get(b.ctx, ds.Name, metav1.GetOptions{})
		if err == nil && cur.Status.ObservedGeneration >= ds.Generation && cur.Status.UpdatedNumberScheduled == cur.Status.DesiredNumberScheduled &&
			cur.Status.NumberAvailable == cur.Status.DesiredNumberScheduled {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the node agents did not roll out with --layer-format=%s", format)
		}
	}
}

// dirFormat measures cold starts and full reads with layers extracted
// into directories (today's way until image layers), the node agents
// rolled out with --layer-format=dir and back.
func (b *bench) dirFormat(cache string) (starts, reads []time.Duration, err error) {
	if err := b.setLayerFormat("dir"); err != nil {
		return nil, nil, err
	}
	defer func() {
		if rerr := b.setLayerFormat(""); err == nil {
			err = rerr
		}
	}()
	for r := range b.runs {
		fmt.Fprintf(os.Stderr, "registry, --layer-format=dir, run %d/%d...\n", r+1, b.runs)
		start, read, err := b.coldAndRead(cache)
		if err != nil {
			return nil, nil, err
		}
		starts, reads = append(starts, start), append(reads, read)
	}
	return starts, reads, nil
}
