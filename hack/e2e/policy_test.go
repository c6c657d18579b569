package e2e

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

const (
	policyNS = "e2e-policy" // not opted in until testPolicyReachesRunningPods labels it
	// The namespace's policy, step by step.
	// policyReach is how soon after `kubectl label/annotate namespace` the
	// running container's cgroup must hold the namespace's new limits.
	policyReach = 10 * time.Second
	// policyLease is the webhook's leader-election Lease (webhook/app).
	policyLease = "kubediskguard-webhook-policy"
)

// testPolicyReachesRunningPods: a pod runs fio in a namespace that has
// defaults but did not opt in (unstamped, unlimited); `kubectl label
// namespace` opts it in, then `kubectl annotate namespace` changes a default
// and sets a ceiling, then the label is removed. After each, the running
// container's cgroup holds the namespace's limits within policyReach
// (the webhook's policy controller re-stamps the pod, the applier follows
// the stamp) and fio measures them; opted out, it runs unthrottled. The
// container is never restarted.
func (e *env) testPolicyReachesRunningPods(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(4*time.Minute))
	defer cancel()
	for _, args := range [][]string{
		{"create", "namespace", policyNS},
		{"annotate", "namespace", policyNS, fmt.Sprintf("kubediskguard.io/iops=%d", e.f.policyIOPS)},
	} {
		if _, err := e.c.Kubectl(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	pods := e.c.Client.CoreV1().Pods(policyNS)
	pod := e.fioPod(policyNS, "running", nil, "app")
	if err := e.c.WaitServiceAccount(ctx, policyNS); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.deletePods(t, pod) })
	pod, err := e.c.WaitRunning(ctx, policyNS, pod.Name, e.c.PodTimeout())
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
		t.Fatalf("a pod of %s (not opted in) is stamped %s", policyNS, v)
	}
	e.waitCgroup(ctx, t, pod, "app", 0, 0)
	id := cluster.ContainerID(pod, "app")
	e.waitPolicyLeader(ctx, t)

	steps := []struct {
		what        string
		kubectl     []string
		read, write int // 0: unthrottled, no stamp
	}{
		{"opt-in", []string{"label", "namespace", policyNS, limits.EnabledLabel + "=true"}, e.f.policyIOPS, e.f.policyIOPS},
		{"new default", []string{"annotate", "namespace", policyNS, fmt.Sprintf("kubediskguard.io/read-iops=%d", e.f.policyRead)}, e.f.policyRead, e.f.policyIOPS},
		{"ceiling", []string{"annotate", "namespace", policyNS, fmt.Sprintf("%s=%d", limits.MaxIOPSAnnotation, e.f.policyMax)}, e.f.policyMax, e.f.policyMax},
		{"opt-out", []string{"label", "namespace", policyNS, limits.EnabledLabel + "-"}, 0, 0},
	}
	for _, s := range steps {
		start := time.Now()
		if _, err := e.c.Kubectl(ctx, s.kubectl...); err != nil {
			t.Fatal(err)
		}
		since := e.waitCgroupBy(ctx, t, start.Add(e.f.slowed(policyReach)), pod, "app", s.read, s.write)
		t.Logf("%-11s (kubectl %s): the running container's cgroup held read %d / write %d IOPS %s after kubectl started",
			s.what, strings.Join(s.kubectl, " "), s.read, s.write, since.Sub(start).Round(time.Millisecond))
		pod = e.pod(ctx, t, policyNS, pod.Name)
		stamp, stamped := pod.Annotations[limits.ResolvedAnnotation]
		if s.read == 0 && stamped {
			t.Errorf("%s: the pod is still stamped %s", s.what, stamp)
		}
		if s.read != 0 {
			want := limits.Resolved{"app": {ReadIOPS: uint64(s.read), WriteIOPS: uint64(s.write)}}.Encode()
			if stamp != want {
				t.Errorf("%s: the pod is stamped %q, want %s", s.what, stamp, want)
			}
		}
		what := fmt.Sprintf("%s/%s app (%s)", policyNS, pod.Name, s.what)
		if s.read != 0 {
			e.measureLimited(ctx, t, pod, "app", since, what, s.read, s.write)
			continue
		}
		r, err := e.nextRun(ctx, pod, "app", since)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%-28s read %7.1f IOPS  write %7.1f IOPS (unthrottled)", what, r.ReadIOPS, r.WriteIOPS)
		if r.ReadIOPS < 1.5*float64(e.f.policyRead) {
			t.Errorf("%s: %.1f read IOPS: throttled, want > %.0f (not limited)", what, r.ReadIOPS, 1.5*float64(e.f.policyRead))
		}
	}
	if now := cluster.ContainerID(pod, "app"); now != id || restartCount(pod, "app") != 0 {
		t.Errorf("the container was restarted: %.12s → %.12s, restartCount %d", id, now, restartCount(pod, "app"))
	}
	// The controller said what it did, on the namespace.
	evs, err := e.c.Client.CoreV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Namespace,involvedObject.name=" + policyNS + ",reason=IOLimitsResolved",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs.Items) == 0 {
		t.Errorf("no IOLimitsResolved Event on namespace %s", policyNS)
	}
	for _, ev := range evs.Items {
		t.Logf("Event %s on namespace %s (x%d): %s", ev.Reason, policyNS, ev.Count, ev.Message)
	}
}

// waitPolicyLeader waits until a webhook holds the policy controller's
// Lease and renews it: a live leader (a webhook killed while leading holds
// it until it expires).
func (e *env) waitPolicyLeader(ctx context.Context, t *testing.T) {
	t.Helper()
	after := metav1.NewMicroTime(time.Now())
	if err := cluster.Poll(ctx, "a live leader of Lease "+policyLease, 200*time.Millisecond, e.f.slowed(60*time.Second), func() error {
		list, err := e.c.Client.CoordinationV1().Leases(metav1.NamespaceAll).List(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + policyLease})
		if err != nil {
			return err
		}
		for _, l := range list.Items {
			if s := l.Spec; s.HolderIdentity != nil && *s.HolderIdentity != "" && s.RenewTime != nil && after.Before(s.RenewTime) {
				t.Logf("Lease %s/%s held by %s", l.Namespace, l.Name, *s.HolderIdentity)
				return nil
			}
		}
		return errors.New("no Lease renewed since the check started")
	}); err != nil {
		t.Fatal(err)
	}
}
