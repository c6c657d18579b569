package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// lateNS opts in while its pod runs.
const lateNS = "e2e-late"

// testUnstampedPod: the applier's half of running pods following their
// namespace's policy. A pod runs in a namespace that has not opted in (no
// stamp); with the webhook (and whatever of it stamps running pods) down,
// the namespace opts in: the applier reports the unstamped pod with one
// IOLimitsMissing Event, not one per pass. With the webhook back, an
// update stamps it and its container is limited; the namespace opts out
// and the stamp is removed (what the webhook's controller does): the
// applier clears the running container's limits live.
func (e *env) testUnstampedPod(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(3*time.Minute))
	defer cancel()
	core := e.c.Client.CoreV1()
	if _, err := e.c.Kubectl(ctx, "create", "namespace", lateNS); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { core.Namespaces().Delete(context.Background(), lateNS, metav1.DeleteOptions{}) })
	if err := e.c.WaitServiceAccount(ctx, lateNS); err != nil {
		t.Fatal(err)
	}
	if _, err := core.Pods(lateNS).Create(ctx, e.c.Pod(lateNS, "late", "sleep", "inf"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod, err := e.c.WaitRunning(ctx, lateNS, "late", e.c.PodTimeout())
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
		t.Fatalf("a pod of a namespace that did not opt in was stamped: %s", v)
	}

	if err := e.g.StopWebhook(ctx); err != nil {
		t.Fatalf("stopping the webhook: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(2*time.Minute))
		defer cancel()
		if err := e.g.StartWebhook(ctx); err != nil {
			t.Errorf("restarting the webhook: %v", err)
		}
	})
	if _, err := e.c.Kubectl(ctx, "label", "namespace", lateNS, limits.EnabledLabel+"=true"); err != nil {
		t.Fatal(err)
	}
	labelled := time.Now()
	missing := func() []corev1.Event {
		list, err := core.Events(lateNS).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=late,reason=IOLimitsMissing"})
		if err != nil {
			t.Fatal(err)
		}
		return list.Items
	}
	if err := cluster.Poll(ctx, "IOLimitsMissing event", 500*time.Millisecond, e.f.slowed(45*time.Second), func() error {
		if len(missing()) == 0 {
			return fmt.Errorf("none yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("the unstamped pod of an opted-in namespace was not reported: %v", err)
	}
	ev := missing()[0]
	t.Logf("%s after the namespace opted in: %s %s: %s", time.Since(labelled).Round(100*time.Millisecond), ev.Type, ev.Reason, ev.Message)
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, limits.ResolvedAnnotation) || ev.InvolvedObject.UID != pod.UID {
		t.Errorf("event %+v: want a Warning on the pod naming %s", ev, limits.ResolvedAnnotation)
	}
	time.Sleep(12 * time.Second) // more audit passes
	if evs := missing(); len(evs) != 1 || evs[0].Count > 1 {
		t.Errorf("%d IOLimitsMissing events (count %d) after more passes, want one, once", len(evs), evs[0].Count)
	}
	e.waitCgroupBy(ctx, t, time.Now(), pod, "main", 0, 0)

	if err := e.g.StartWebhook(ctx); err != nil {
		t.Fatalf("restarting the webhook: %v", err)
	}
	const iops = 150
	if _, err := e.c.Kubectl(ctx, "annotate", "pod", "-n", lateNS, "late", fmt.Sprintf("%s=%d", limits.Prefix+"iops", iops), "--overwrite"); err != nil {
		t.Fatal(err)
	}
	e.waitCgroup(ctx, t, pod, "main", iops, iops)
	if _, err := e.c.Kubectl(ctx, "label", "namespace", lateNS, limits.EnabledLabel+"-"); err != nil {
		t.Fatal(err)
	}
	removed := time.Now()
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:null}}}`, limits.ResolvedAnnotation)
	if _, err := core.Pods(lateNS).Patch(ctx, "late", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if p := e.pod(ctx, t, lateNS, "late"); p.Annotations[limits.ResolvedAnnotation] != "" {
		t.Fatalf("the stamp is still there after the namespace opted out: %s", p.Annotations[limits.ResolvedAnnotation])
	}
	seen := e.waitCgroup(ctx, t, pod, "main", 0, 0)
	t.Logf("stamp removed: the running container's limits cleared %s later", seen.Sub(removed).Round(time.Millisecond))
}
