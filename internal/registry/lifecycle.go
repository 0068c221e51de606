package registry

import (
	"context"
	"errors"
	"net/http"
	"regexp"
	"slices"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

var ourTag = regexp.MustCompile(`^c[0-9]{20}$`)

// Tags lists the generations of cache k in the registry (by their tags,
// oldest first); none if the repository does not exist.
func (c *Client) Tags(ctx context.Context, k Cache) ([]string, error) {
	repo, err := c.Repository(k)
	if err != nil {
		return nil, err
	}
	return c.tags(ctx, repo)
}

func (c *Client) tags(ctx context.Context, repo name.Repository) ([]string, error) {
	all, err := remote.List(repo, c.RemoteOptions(remote.WithContext(ctx))...)
	if notFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var tags []string
	for _, t := range all {
		if ourTag.MatchString(t) {
			tags = append(tags, t)
		}
	}
	slices.Sort(tags)
	return tags, nil
}

// DeleteCache deletes every manifest of cache k (the registry collects the
// blobs no manifest references). It returns how many it deleted.
func (c *Client) DeleteCache(ctx context.Context, k Cache) (int, error) {
	repo, err := c.Repository(k)
	if err != nil {
		return 0, err
	}
	tags, err := c.tags(ctx, repo)
	if err != nil {
		return 0, err
	}
	return c.deleteTags(ctx, repo, tags, nil)
}

// Prune deletes all but the newest Keep generations of cache k, and never
// the manifest with digest keep (the one the Cache points at).
func (c *Client) Prune(ctx context.Context, k Cache, keep string) (int, error) {
	repo, err := c.Repository(k)
	if err != nil {
		return 0, err
	}
	tags, err := c.tags(ctx, repo)
	if err != nil || len(tags) <= c.cfg.Keep {
		return 0, err
	}
	kept := map[string]bool{keep: true}
	for _, t := range tags[len(tags)-c.cfg.Keep:] {
		d, err := c.digestOf(ctx, repo, t)
		if err != nil {
			return 0, err
		}
		kept[d] = true
	}
	return c.deleteTags(ctx, repo, tags[:len(tags)-c.cfg.Keep], kept)
}

func (c *Client) digestOf(ctx context.Context, repo name.Repository, tag string) (string, error) {
	d, err := remote.Head(repo.Tag(tag), c.RemoteOptions(remote.WithContext(ctx))...)
	if notFound(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return d.Digest.String(), nil
}

// deleteTags deletes the manifests the tags point at (a manifest's tags go
// with it), except those in kept.
func (c *Client) deleteTags(ctx context.Context, repo name.Repository, tags []string, kept map[string]bool) (int, error) {
	n := 0
	for _, t := range tags {
		d, err := c.digestOf(ctx, repo, t)
		if err != nil {
			return n, err
		}
		if d == "" || kept[d] {
			continue
		}
		err = remote.Delete(repo.Digest(d), c.RemoteOptions(remote.WithContext(ctx))...)
		if err != nil && !notFound(err) {
			return n, err
		}
		n++
	}
	return n, nil
}

func notFound(err error) bool {
	var te *transport.Error
	return errors.As(err, &te) && te.StatusCode == http.StatusNotFound
}
