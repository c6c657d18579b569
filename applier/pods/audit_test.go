package pods

import (
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

type podList []*corev1.Pod

func (l *podList) List() []*corev1.Pod { return *l }

type nsSet map[string]bool

func (s nsSet) OptedIn(ns string) bool { return s[ns] }

func auditPod(ns, name string, stamp string, mutate ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(ns + "/" + name)},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	if stamp != "" {
		p.Annotations = map[string]string{limits.ResolvedAnnotation: stamp}
	}
	for _, m := range mutate {
		m(p)
	}
	return p
}

func TestAudit(t *testing.T) {
	const grace = 10 * time.Second
	t0 := time.Unix(1_000_000, 0)
	tests := map[string]struct {
		pod    *corev1.Pod
		report bool
	}{
		"reports an unstamped pod in an opted-in namespace":                {pod: auditPod("on", "p", ""), report: true},
		"leaves a stamped pod alone":                                       {pod: auditPod("on", "p", `{"app":{"readIOPS":500,"writeIOPS":500,"readBPS":0,"writeBPS":0}}`)},
		"leaves a pod stamped with no containers (excluded) alone":         {pod: auditPod("on", "p", "{}")},
		"leaves an unstamped pod of a namespace that did not opt in alone": {pod: auditPod("off", "p", "")},
		"leaves a finished pod alone":                                      {pod: auditPod("on", "p", "", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded })},
		"leaves a pod being deleted alone":                                 {pod: auditPod("on", "p", "", func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{Time: t0} })},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			rec := record.NewFakeRecorder(10)
			gauge := prometheus.NewGauge(prometheus.GaugeOpts{Name: "g"})
			pods := &podList{tc.pod}
			a := &Audit{Pods: pods, Namespaces: nsSet{"on": true}, Recorder: rec, Unstamped: gauge, Log: testr.New(t), Grace: grace}
			a.Check(t0)
			if len(rec.Events) != 0 || testutil.ToFloat64(gauge) != 0 {
				t.Fatalf("reported at once (%d events, gauge %v); want a grace of %s", len(rec.Events), testutil.ToFloat64(gauge), grace)
			}
			a.Check(t0.Add(grace))
			a.Check(t0.Add(2 * grace)) // a later pass: no second Event
			want := 0
			if tc.report {
				want = 1
			}
			if len(rec.Events) != want || testutil.ToFloat64(gauge) != float64(want) {
				t.Fatalf("%d events, gauge %v; want %d", len(rec.Events), testutil.ToFloat64(gauge), want)
			}
			if want == 1 {
				e := <-rec.Events
				if !strings.Contains(e, "Warning IOLimitsMissing") || !strings.Contains(e, "namespace on opts in") || !strings.Contains(e, limits.ResolvedAnnotation) {
					t.Errorf("event %q", e)
				}
			}
		})
	}

	t.Run("counts a pod again once stamped, and reports it again if it loses its stamp later", func(t *testing.T) {
		rec := record.NewFakeRecorder(10)
		gauge := prometheus.NewGauge(prometheus.GaugeOpts{Name: "g"})
		p := auditPod("on", "p", "")
		pods := &podList{p}
		a := &Audit{Pods: pods, Namespaces: nsSet{"on": true}, Recorder: rec, Unstamped: gauge, Grace: grace, Log: testr.New(t)}
		a.Check(t0)
		a.Check(t0.Add(grace))
		*pods = podList{auditPod("on", "p", "{}")} // the webhook's controller stamped it
		a.Check(t0.Add(2 * grace))
		if testutil.ToFloat64(gauge) != 0 {
			t.Errorf("gauge %v once stamped, want 0", testutil.ToFloat64(gauge))
		}
		*pods = podList{p}
		a.Check(t0.Add(3 * grace))
		a.Check(t0.Add(4 * grace))
		if len(rec.Events) != 2 {
			t.Errorf("%d events, want one per time it was found unstamped", len(rec.Events))
		}
	})

	t.Run("does not report a pod that is stamped within the grace", func(t *testing.T) {
		rec := record.NewFakeRecorder(10)
		pods := &podList{auditPod("on", "p", "")}
		a := &Audit{Pods: pods, Namespaces: nsSet{"on": true}, Recorder: rec, Grace: grace, Log: testr.New(t)}
		a.Check(t0)
		*pods = podList{auditPod("on", "p", "{}")}
		a.Check(t0.Add(grace / 2))
		*pods = podList{auditPod("on", "p", "")} // and loses it again: the clock starts over
		a.Check(t0.Add(grace))
		if len(rec.Events) != 0 {
			t.Errorf("event %q for a pod stamped within the grace", <-rec.Events)
		}
	})
}
