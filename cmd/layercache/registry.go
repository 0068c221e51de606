package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/registry/transfer"
)

// push sends a cache's head to a registry, as the node agent does.
func (c *cli) push(args []string) error {
	k, err := parseKey(args[0])
	if err != nil {
		return err
	}
	client, ref, err := registry.ForReference(c.registry, args[1])
	if err != nil {
		return usagef("%s", err)
	}
	tag, ok := ref.(name.Tag)
	if !ok {
		return usagef("push to %s: want a tag (REGISTRY/PATH:TAG), not a digest", args[1])
	}
	info, err := c.store.Inspect(k)
	if err != nil {
		return err
	}
	if info.Head == nil {
		return fmt.Errorf("cache %s has no commit to push", k)
	}
	host, _ := os.Hostname()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	start := time.Now()
	p, err := transfer.PushTo(ctx, client, c.store, k, *info.Head, host, tag)
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(p)
	}
	fmt.Fprintf(c.out, "pushed generation %d of %s to %s@%s: %d of %d layers sent, %s in %s\n",
		info.Head.Number, k, tag.Context(), p.Digest, p.LayersSent, p.Layers, humanBytes(p.Bytes), time.Since(start).Round(time.Millisecond))
	return nil
}

// pull makes an image the cache's next generation, as the node agent does.
func (c *cli) pull(args []string) error {
	k, err := parseKey(args[1])
	if err != nil {
		return err
	}
	client, ref, err := registry.ForReference(c.registry, args[0])
	if err != nil {
		return usagef("%s", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	start := time.Now()
	p, err := transfer.PullFrom(ctx, client, c.store, k, ref, transfer.PullOptions{})
	if err != nil {
		return err
	}
	if c.output == "json" {
		return c.json(p)
	}
	format, _ := c.store.ImportFormat()
	fmt.Fprintf(c.out, "pulled %s into %s as generation %d: %d of %d layers fetched (%s, kept as %s) in %s\n",
		ref, k, p.Generation.Number, p.LayersFetched, p.Layers, humanBytes(p.Bytes), format, time.Since(start).Round(time.Millisecond))
	return nil
}
