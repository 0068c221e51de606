//go:build e2e && extended

package e2e

import (
	"testing"
	"time"
)

// A rollout restart of the manager while labelled pods are created: the
// new replicas are ready before the old ones drain (maxUnavailable 0, and
// each old replica answers, closing its connections, for
// --shutdown-delay): none is refused and none runs uncached. In make
// test-extended, on one node: a pod every 400 ms (at 200 ms, 400 pods
// took that node 4 minutes).
func TestManagerRolloutRestart(t *testing.T) {
	e := newEnv(t)
	e.twoManagers()
	stopStorm := e.stormUntil("roll", 300, 400*time.Millisecond)
	time.Sleep(3 * time.Second)
	started := time.Now()
	kubectl(t, "-n", "layercache-system", "rollout", "restart", "deployment/layercache-controller-manager")
	kubectl(t, "-n", "layercache-system", "rollout", "status", "deployment/layercache-controller-manager", "--timeout=180s")
	t.Logf("rollout done in %.1fs", time.Since(started).Seconds())
	// The last old replica drains for --shutdown-delay after the rollout
	// reports done.
	time.Sleep(10 * time.Second)
	names, refused := stopStorm()
	if skipped := e.stormOutcome("the restart", started, names, refused); len(skipped) > 0 {
		t.Errorf("%d pods uncached during a rollout: %v", len(skipped), skipped)
	}
	e.twoManagers()
	e.settled()
}
