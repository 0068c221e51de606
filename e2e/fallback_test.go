//go:build e2e

package e2e

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// A branch's first build starts from main's cache (layercache.io/restore-from),
// on a node that never held main: main's image is pulled for it. The build
// commits to the branch's own cache; main is unchanged; the branch's next
// build starts from the branch.
func TestBranchStartsFromMainsCache(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "main", "main-1", `cd /cache && echo main > dep && mkdir d && echo old > d/f`)
	e.registryImage("main", "node2", 1)
	mainBefore := e.runOn("node2", "main-before", "main", listFiles)

	ann := map[string]string{v1alpha1.AnnotationRestoreFrom: "release, main"}
	phase, out := e.run(on("node3", buildPod("branch-1", "feature-x", "write", "builder",
		`cat /cache/dep && rm /cache/d/f && echo branch > /cache/mine`, ann)))
	if phase != corev1.PodSucceeded || out != "main" {
		t.Fatalf("the branch's first build: %s, %q; want it to read main's dep", phase, out)
	}
	e.settled()
	e.eventually("the branch's commit on node3", 30*time.Second, func() bool {
		s := e.nodeStatus("feature-x", "node3")
		return s != nil && s.Generation > 0
	})

	got := e.runOn("node3", "branch-2", "feature-x", `cd /cache && find . -mindepth 1 | sort | while read f; do echo "$f $(cat $f 2>/dev/null)"; done`)
	if want := "./d \n./dep main\n./mine branch"; got != want {
		t.Errorf("the branch's next build sees:\n%s\nwant:\n%s", got, want)
	}
	if after := e.runOn("node2", "main-after", "main", listFiles); after != mainBefore {
		t.Errorf("main changed:\n%s\nwas:\n%s", after, mainBefore)
	}
	if s := e.nodeStatus("main", "node2"); s == nil || s.Generation != 1 {
		t.Errorf("main's status on node2 = %+v, want generation 1", s)
	}
	if ev := e.events("main"); !strings.Contains(ev, "Node node3: ") || !strings.Contains(ev, "(pull;") {
		t.Errorf("no pull of main on node3 in the events:\n%s", ev)
	}
	if ev := e.events("feature-x"); !strings.Contains(ev, "Committed") {
		t.Errorf("no commit of the branch in its events:\n%s", ev)
	}
}
