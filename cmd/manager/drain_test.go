package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// While draining, a replica still answers, but closes each kept-alive
// connection after the answer and is unready.
func TestDrainClosesConnectionsAfterAnswering(t *testing.T) {
	d := &drainer{}
	srv := httptest.NewServer(d.wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})))
	defer srv.Close()
	get := func() *http.Response {
		t.Helper()
		resp, err := srv.Client().Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		return resp
	}
	if resp := get(); resp.Close || d.ready(nil) != nil {
		t.Fatalf("before SIGTERM: connection closed %v, ready error %v", resp.Close, d.ready(nil))
	}
	d.draining.Store(true)
	if resp := get(); !resp.Close || d.ready(nil) == nil {
		t.Fatalf("draining: connection closed %v, ready error %v; want closed and unready", resp.Close, d.ready(nil))
	}
}
