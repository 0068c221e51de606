package main

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
)

// drainer lets a replica leave without a refused or an uncached pod. The
// API server reaches the webhook through its Service, on kept-alive
// connections that kube-proxy keeps sending to this replica after its
// endpoint goes; a POST is never retried. On SIGTERM the replica keeps
// serving for the delay, unready, and answers every request with
// "Connection: close", so each connection ends cleanly after an answer and
// the next request opens one to another replica. Then it stops.
type drainer struct {
	delay    time.Duration
	draining atomic.Bool
}

// context is cancelled delay after the first SIGTERM or SIGINT; a second
// one exits at once.
func (d *drainer) context() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-signals
		ctrl.Log.WithName("shutdown").Info("Draining the webhook before stopping", "delay", d.delay)
		d.draining.Store(true)
		time.AfterFunc(d.delay, cancel)
		<-signals
		os.Exit(1)
	}()
	return ctx
}

// wrap closes each connection after its answer while draining.
func (d *drainer) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d.draining.Load() {
			w.Header().Set("Connection", "close")
		}
		h.ServeHTTP(w, r)
	})
}

// ready fails while draining: the endpoint leaves the Service at once.
func (d *drainer) ready(*http.Request) error {
	if d.draining.Load() {
		return errors.New("draining")
	}
	return nil
}
