package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// applierCatchUp is how soon after it is ready a restarted applier must have
// limited the containers it missed: by the full pass at start (the periodic
// one never runs in the checks: checkInterval). On the host; figures.slowed
// scales it to the node kind.
const applierCatchUp = 4 * time.Second

// testContainerRestart: the main process of Throttle's db container is
// SIGKILLed on the node (not in the container), its PID from containerd (`kubectl exec ... kill 1`
// would not do: from inside its PID namespace the kernel delivers to the
// namespace's init only signals it handles, never SIGKILL, and the
// container's sh handles none); the kubelet starts a new container, whose
// cgroup gets db's limits and whose fio measures them.
func (e *env) testContainerRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(90*time.Second))
	defer cancel()
	const container = "db"
	pod := e.pod(ctx, t, optedIn, "limited")
	oldID := cluster.ContainerID(pod, container)
	oldRestarts := restartCount(pod, container)
	pid, err := cluster.TaskPID(ctx, e.c.Node, oldID)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := e.c.Node.ReadFile(ctx, fmt.Sprintf("/proc/%d/cgroup", pid)); err != nil || !strings.Contains(string(b), oldID) {
		t.Fatalf("process %d is not in container %s's cgroup (%v): %s", pid, oldID, err, b)
	}
	killed := time.Now()
	if err := cluster.Signal(ctx, e.c.Node, pid, "KILL"); err != nil {
		t.Fatalf("killing %s's process %d: %v", container, pid, err)
	}
	pod = e.waitRestarted(ctx, t, pod, container, oldID, oldRestarts)
	newID := cluster.ContainerID(pod, container)
	t.Logf("killed %s's process %d (container %.12s); the kubelet started container %.12s, restartCount %d → %d, %s later",
		container, pid, oldID, newID, oldRestarts, restartCount(pod, container), time.Since(killed).Round(time.Millisecond))

	since := e.waitCgroup(ctx, t, pod, container, e.f.dbRead, e.f.dbWrite)
	t.Logf("the new container's cgroup seen holding read %d / write %d IOPS %s after the kill", e.f.dbRead, e.f.dbWrite, since.Sub(killed).Round(time.Millisecond))
	e.measureLimited(ctx, t, pod, container, since, fmt.Sprintf("%s/%s %s (restarted)", pod.Namespace, pod.Name, container), e.f.dbRead, e.f.dbWrite)
}

// testAnnotateLive: `kubectl annotate` of a pod-level read limit on
// Throttle's running pod: the webhook resolves the pod again on UPDATE, the
// applier rewrites the running app container's cgroup, and its next fio run
// measures the new read limit with the write limit as it was. db keeps its
// per-container annotation (it beats the pod's), istio-proxy stays
// excluded.
func (e *env) testAnnotateLive(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(90*time.Second))
	defer cancel()
	annotated := time.Now()
	if _, err := e.c.Kubectl(ctx, "annotate", "pod", "-n", optedIn, "limited",
		fmt.Sprintf("kubediskguard.io/read-iops=%d", e.f.liveRead), "--overwrite"); err != nil {
		t.Fatal(err)
	}
	pod := e.pod(ctx, t, optedIn, "limited")
	v := pod.Annotations[limits.ResolvedAnnotation]
	t.Logf("%s after kubectl annotate: %s", limits.ResolvedAnnotation, v)
	res, err := limits.DecodeResolved(v)
	if err != nil {
		t.Fatal(err)
	}
	for c, want := range map[string]limits.Limits{
		"app": {ReadIOPS: uint64(e.f.liveRead), WriteIOPS: uint64(e.f.nsIOPS)},
		"db":  {ReadIOPS: uint64(e.f.dbRead), WriteIOPS: uint64(e.f.dbWrite)},
	} {
		if res[c] != want {
			t.Errorf("resolved limits of %s: %+v, want %+v", c, res[c], want)
		}
	}
	if l, ok := res["istio-proxy"]; ok {
		t.Errorf("istio-proxy (excluded) got limits %+v", l)
	}

	since := e.waitCgroup(ctx, t, pod, "app", e.f.liveRead, e.f.nsIOPS)
	t.Logf("app's cgroup seen holding read %d IOPS %s after kubectl annotate was started", e.f.liveRead, since.Sub(annotated).Round(time.Millisecond))
	e.waitCgroup(ctx, t, pod, "db", e.f.dbRead, e.f.dbWrite)
	e.waitCgroup(ctx, t, pod, "istio-proxy", 0, 0)
	e.measureLimited(ctx, t, pod, "app", since, fmt.Sprintf("%s/%s app (annotated)", pod.Namespace, pod.Name), e.f.liveRead, e.f.nsIOPS)
}

// testApplierCrash: the applier is SIGKILLed; opted-in pods are created and
// run while it is down (their cgroups unlimited); once it is started again,
// with the same settings, every one of their containers gets its own limits
// within applierCatchUp, and fio in one of them measures them.
func (e *env) testApplierCrash(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(2*time.Minute))
	defer cancel()
	t.Cleanup(func() { e.restoreApplier(t) })
	if err := e.g.StopApplier(ctx, true); err != nil {
		t.Fatalf("crashing the applier: %v", err)
	}

	type want struct {
		pod         *corev1.Pod
		container   string
		read, write int
	}
	var cases []want
	for i, w := range e.f.crashWrite { // each pod its own write limit
		p := e.c.Pod(optedIn, fmt.Sprintf("crash-%d", i), "sleep", "inf")
		p.Annotations = map[string]string{"kubediskguard.io/write-iops": strconv.Itoa(w)}
		cases = append(cases, want{p, "main", e.f.nsIOPS, w})
	}
	fioIOPS := e.f.crashFio
	fio := e.fioPod(optedIn, "crash-fio", map[string]string{"kubediskguard.io/iops": strconv.Itoa(fioIOPS)}, "app")
	cases = append(cases, want{fio, "app", fioIOPS, fioIOPS})
	pods := e.c.Client.CoreV1().Pods(optedIn)
	t.Cleanup(func() {
		var all []*corev1.Pod
		for _, w := range cases {
			all = append(all, w.pod)
		}
		e.deletePods(t, all...)
	})
	for _, w := range cases {
		if _, err := pods.Create(ctx, w.pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating %s: %v", w.pod.Name, err)
		}
	}
	for i, w := range cases {
		p, err := e.c.WaitRunning(ctx, optedIn, w.pod.Name, e.c.PodTimeout())
		if err != nil {
			t.Fatal(err)
		}
		cases[i].pod = p
		// With the applier down nothing has limited it yet.
		dir, err := e.c.ContainerCgroup(p, w.container)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := e.iopsAre(ctx, dir, 0, 0); !ok {
			t.Errorf("%s %s limited with the applier down: %s", p.Name, w.container, got)
		}
	}
	t.Logf("%d pods Running with the applier down", len(cases))

	started := time.Now()
	if err := e.g.StartApplier(ctx); err != nil {
		t.Fatalf("starting the applier again: %v", err)
	}
	readyAt := time.Now()
	ready := readyAt.Sub(started)
	var since time.Time
	for _, w := range cases {
		if s := e.waitCgroupBy(ctx, t, readyAt.Add(e.f.slowed(applierCatchUp)), w.pod, w.container, w.read, w.write); s.After(since) {
			since = s
		}
	}
	t.Logf("applier started again: ready after %s; all %d containers seen limited %s after its start",
		ready.Round(time.Millisecond), len(cases), since.Sub(started).Round(time.Millisecond))
	e.measureLimited(ctx, t, cases[len(cases)-1].pod, "app", since, optedIn+"/crash-fio app", fioIOPS, fioIOPS)
}

// restartCount is the container's restart count in the pod's status.
func restartCount(pod *corev1.Pod, container string) int32 {
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == container {
			return cs.RestartCount
		}
	}
	return -1
}

// waitRestarted waits until the kubelet has started a new container for
// one whose ID was oldID, and returns the pod.
func (e *env) waitRestarted(ctx context.Context, t *testing.T, pod *corev1.Pod, container, oldID string, oldRestarts int32) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	if err := cluster.Poll(ctx, "restart", 200*time.Millisecond, e.f.slowed(60*time.Second), func() (err error) {
		if p, err = e.c.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{}); err != nil {
			return err
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Name == container && cs.RestartCount > oldRestarts && cs.State.Running != nil &&
				cs.ContainerID != "" && cluster.ContainerID(p, container) != oldID {
				return nil
			}
		}
		return fmt.Errorf("%+v", p.Status.ContainerStatuses)
	}); err != nil {
		t.Fatalf("%s/%s %s not restarted after 60s: %v", pod.Namespace, pod.Name, container, err)
	}
	return p
}
