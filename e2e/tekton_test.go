//go:build e2e && extended

package e2e

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// tektonTask is a Task that runs go build with GOCACHE on its workspace and
// prints how many packages it compiled (go build -v names each package it
// compiles; a cached one is not compiled again).
const tektonTask = `
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: go-build
spec:
  workspaces:
  - name: gocache
  steps:
  - name: build
    image: localhost/golang:dev
    env:
    - name: GOCACHE
      value: $(workspaces.gocache.path)/go-build
    - name: HOME
      value: /tmp
    script: |
      #!/bin/sh
      set -e
      mkdir -p /tmp/src && cd /tmp/src
      printf 'module example.com/hello\n\ngo 1.26\n' > go.mod
      cat > main.go <<'GO'
      package main

      import (
      	"encoding/json"
      	"fmt"
      	"strings"
      )

      func main() {
      	b, _ := json.Marshal(map[string]string{"hello": strings.ToUpper("tekton")})
      	fmt.Println(string(b))
      }
      GO
      go build -v -o /tmp/hello . 2> /tmp/compiled
      /tmp/hello
      echo "compiled $(wc -l < /tmp/compiled) packages"
`

// tektonPipeline has a task without a cache before the build.
const tektonPipeline = `
apiVersion: tekton.dev/v1
kind: Pipeline
metadata:
  name: build
spec:
  workspaces:
  - name: gocache
  tasks:
  - name: checkout
    taskSpec:
      steps:
      - name: checkout
        image: localhost/busybox:dev
        script: |
          #!/bin/sh
          echo checked out
  - name: build
    runAfter: [checkout]
    taskRef: {name: go-build}
    workspaces:
    - name: gocache
      workspace: gocache
`

// tektonPipelineRun is docs/build-pods.md's recipe: the labels and the annotation go
// to the build task's pod only, through taskRunSpecs[].metadata.
const tektonPipelineRun = `
apiVersion: tekton.dev/v1
kind: PipelineRun
metadata:
  generateName: build-
spec:
  pipelineRef: {name: build}
  taskRunTemplate:
    serviceAccountName: builder
  workspaces:
  - name: gocache
    emptyDir: {}
  taskRunSpecs:
  - pipelineTaskName: build
    metadata:
      labels:
        layercache.io/cache: go-build
        layercache.io/trust: write
      annotations:
        layercache.io/volume-at: /workspace/gocache
`

func (e *env) createYAML(doc string) *unstructured.Unstructured {
	e.t.Helper()
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
		e.t.Fatal(err)
	}
	u.SetNamespace(e.ns)
	// Tekton's webhook may still be starting: retry for a while.
	var err error
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(2 * time.Second) {
		if err = c.Create(e.ctx, u); err == nil {
			return u
		}
	}
	e.t.Fatalf("creating %s %s: %v", u.GetKind(), u.GetName()+u.GetGenerateName(), err)
	return nil
}

// taskRunOf waits until the PipelineRun ended and returns its TaskRun for
// the pipeline task.
func (e *env) taskRunOf(pr *unstructured.Unstructured, task string) *unstructured.Unstructured {
	e.t.Helper()
	e.eventually("PipelineRun "+pr.GetName()+" to end", 6*time.Minute, func() bool {
		if c.Get(e.ctx, client.ObjectKeyFromObject(pr), pr) != nil {
			return false
		}
		_, done, _ := unstructured.NestedString(pr.Object, "status", "completionTime")
		return done
	})
	conds, _, _ := unstructured.NestedSlice(pr.Object, "status", "conditions")
	if len(conds) == 0 || conds[0].(map[string]any)["status"] != "True" {
		e.t.Fatalf("PipelineRun %s failed: %v\nevents:\n%s", pr.GetName(), conds, e.events(""))
	}
	list := &unstructured.UnstructuredList{}
	list.SetAPIVersion("tekton.dev/v1")
	list.SetKind("TaskRunList")
	if err := c.List(e.ctx, list, client.InNamespace(e.ns), client.MatchingLabels{
		"tekton.dev/pipelineRun": pr.GetName(), "tekton.dev/pipelineTask": task}); err != nil || len(list.Items) != 1 {
		e.t.Fatalf("TaskRun of %s/%s: %v (%d found)", pr.GetName(), task, err, len(list.Items))
	}
	return &list.Items[0]
}

func duration(tr *unstructured.Unstructured) time.Duration {
	start, _, _ := unstructured.NestedString(tr.Object, "status", "startTime")
	end, _, _ := unstructured.NestedString(tr.Object, "status", "completionTime")
	s, err1 := time.Parse(time.RFC3339, start)
	t, err2 := time.Parse(time.RFC3339, end)
	if err1 != nil || err2 != nil {
		return -1
	}
	return t.Sub(s)
}

var compiledRE = regexp.MustCompile(`compiled (\d+) packages`)

// buildRun runs one PipelineRun and returns its build TaskRun's duration
// and how many packages the build compiled; it checks that only the build
// task's pod got the cache.
func (e *env) buildRun() (time.Duration, int) {
	e.t.Helper()
	pr := e.createYAML(tektonPipelineRun)
	build := e.taskRunOf(pr, "build")
	checkout := e.taskRunOf(pr, "checkout")
	pods := map[string]*corev1.Pod{}
	for name, tr := range map[string]*unstructured.Unstructured{"build": build, "checkout": checkout} {
		podName, _, _ := unstructured.NestedString(tr.Object, "status", "podName")
		p := &corev1.Pod{}
		if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: podName}, p); err != nil {
			e.t.Fatalf("pod of %s: %v", name, err)
		}
		pods[name] = p
	}
	if _, ok := pods["checkout"].Annotations[v1alpha1.AnnotationClaims]; ok || pods["checkout"].Labels[v1alpha1.LabelCache] != "" {
		e.t.Errorf("the checkout task's pod got the cache: %v %v", pods["checkout"].Labels, pods["checkout"].Annotations)
	}
	claims := pods["build"].Annotations[v1alpha1.AnnotationClaims]
	if !strings.Contains(claims, `"cache":"go-build"`) || !strings.Contains(claims, `"volume":"ws-`) {
		e.t.Fatalf("the build pod's claims = %q, want the go-build cache on its ws-... workspace volume", claims)
	}
	out := e.logsOf(pods["build"].Name, "step-build")
	m := compiledRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, `{"hello":"TEKTON"}`) {
		e.t.Fatalf("the build's log:\n%s", out)
	}
	n, _ := strconv.Atoi(m[1])
	e.settled()
	return duration(build), n
}

func (e *env) logsOf(pod, container string) string {
	raw, err := cs.CoreV1().Pods(e.ns).GetLogs(pod, &corev1.PodLogOptions{Container: container}).DoRaw(e.ctx)
	if err != nil {
		e.t.Fatalf("logs of %s/%s: %v", pod, container, err)
	}
	return strings.TrimSpace(string(raw))
}

// A real Tekton Pipeline: the build task's workspace is a layercache
// volume, picked by where Tekton mounts it; the second PipelineRun's build
// compiles nothing again and takes less time.
func TestTektonPipelineWarmCache(t *testing.T) {
	e := newEnv(t)
	e.createYAML(tektonTask)
	e.createYAML(tektonPipeline)

	coldTime, cold := e.buildRun()
	if cold < 10 {
		t.Fatalf("the first build compiled %d packages: was the cache not empty?", cold)
	}
	e.eventually("the go-build cache's first commit", 30*time.Second, func() bool { return e.generation("go-build") >= 1 })
	warmTime, warm := e.buildRun()
	t.Logf("build TaskRun: cold %s (%d packages compiled), warm %s (%d compiled)", coldTime, cold, warmTime, warm)
	if warm > 1 {
		t.Errorf("the second build compiled %d packages, want at most 1 (the main package): GOCACHE was not warm", warm)
	}
	// A ratio in the same run, not a threshold: the warm build skips the
	// compilation of the whole standard library it uses.
	if warmTime >= coldTime {
		t.Errorf("the warm build TaskRun took %s, the cold one %s", warmTime, coldTime)
	}
}
