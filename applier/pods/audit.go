package pods

import (
	"context"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// DefaultGrace is how long a pod may be without a resolved annotation in an
// opted-in namespace before Audit reports it: long enough for the webhook's
// controller to stamp the pods of a namespace that just opted in.
const DefaultGrace = 10 * time.Second

// UnstampedReason is the reason of the Event on an unstamped pod.
const UnstampedReason = "IOLimitsMissing"

// Audit reports the pods on this node that are in an opted-in namespace but
// carry no kubediskguard.io/limits annotation — admitted while the webhook
// was not running, or before their namespace opted in — and so are not
// limited. Each such pod gets one Warning Event (not one per pass) once it
// has been unstamped for Grace, and the gauge counts them. The applier only
// reports: stamping them is the webhook's job.
type Audit struct {
	Pods       interface{ List() []*corev1.Pod }
	Namespaces interface{ OptedIn(namespace string) bool }
	// Synced are the informers the audit waits for before its first check.
	Synced []cache.InformerSynced
	// Recorder records the Events; nil records none.
	Recorder record.EventRecorder
	// Unstamped is set to the number of pods reported now; nil counts none.
	Unstamped prometheus.Gauge
	Log       logr.Logger
	// Grace is how long a pod is unstamped before it is reported; 0 is
	// DefaultGrace. The audit checks every Grace/2.
	Grace time.Duration

	since    map[types.UID]time.Time // first seen unstamped
	reported map[types.UID]bool
}

func (a *Audit) grace() time.Duration {
	if a.Grace > 0 {
		return a.Grace
	}
	return DefaultGrace
}

// Run checks every Grace/2 until ctx is done.
func (a *Audit) Run(ctx context.Context) {
	if !cache.WaitForCacheSync(ctx.Done(), a.Synced...) {
		return
	}
	wait.Until(func() { a.Check(time.Now()) }, a.grace()/2, ctx.Done())
}

// Check looks at every pod once, as of now, and reports those unstamped for
// Grace that were not reported yet. It is not safe for concurrent use.
func (a *Audit) Check(now time.Time) {
	if a.since == nil {
		a.since, a.reported = map[types.UID]time.Time{}, map[types.UID]bool{}
	}
	seen := map[types.UID]bool{}
	count := 0
	for _, pod := range a.Pods.List() {
		if !a.unstamped(pod) {
			continue
		}
		seen[pod.UID] = true
		first, ok := a.since[pod.UID]
		if !ok {
			a.since[pod.UID] = now
			first = now
		}
		if now.Sub(first) < a.grace() {
			continue
		}
		count++
		if a.reported[pod.UID] {
			continue
		}
		a.reported[pod.UID] = true
		a.Log.Info("pod in an opted-in namespace has no resolved limits: not limited", "pod", pod.Namespace+"/"+pod.Name, "annotation", limits.ResolvedAnnotation)
		if a.Recorder != nil {
			ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
			a.Recorder.Eventf(ref, corev1.EventTypeWarning, UnstampedReason,
				"namespace %s opts in to KubeDiskGuard (%s=true) but this pod has no %s annotation (admitted while the webhook was not running, or before the namespace opted in): its containers' disk IO is not limited until the webhook resolves it",
				pod.Namespace, limits.EnabledLabel, limits.ResolvedAnnotation)
		}
	}
	for uid := range a.since {
		if !seen[uid] { // stamped, opted out, or gone
			delete(a.since, uid)
			delete(a.reported, uid)
		}
	}
	if a.Unstamped != nil {
		a.Unstamped.Set(float64(count))
	}
}

// unstamped reports whether a pod should carry a resolved annotation and
// does not: it runs (or will), in an opted-in namespace, without one.
func (a *Audit) unstamped(pod *corev1.Pod) bool {
	if _, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
		return false
	}
	if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return false
	}
	return a.Namespaces.OptedIn(pod.Namespace)
}
