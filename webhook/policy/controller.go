package policy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/mutate"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// Name names the controller: its logs, its Events' source and the field
// manager of its writes.
const Name = "kubediskguard-policy"

// Event reasons.
const (
	// ReasonResolved (Normal, on the namespace): pods were stamped or cleared.
	ReasonResolved = "IOLimitsResolved"
	// ReasonResolveFailed (Warning, on the namespace): some pods could not be
	// written, or have invalid annotations.
	ReasonResolveFailed = "IOLimitsResolveFailed"
	// ReasonNotResolved (Warning, on the pod): its own annotations are invalid.
	ReasonNotResolved = "IOLimitsNotResolved"
)

// concurrentNamespaces is how many namespaces are re-resolved at once; their
// writes share one rate limit, so a namespace of thousands of pods does not
// hold back a small one entirely.
const concurrentNamespaces = 4

// PodCache is the cache setting for pods: only what the controller reads is
// kept (see slimPod).
func PodCache() cache.ByObject { return cache.ByObject{Transform: slimPod} }

// Reconciler re-resolves the pods of one namespace (the request's name).
type Reconciler struct {
	// Client reads namespaces and pods from the manager's cache and writes
	// pods to the API server.
	Client   client.Client
	Resolver *resolve.Config
	// Limiter is taken once before every pod write.
	Limiter  flowcontrol.RateLimiter
	Recorder record.EventRecorder
	Metrics  *Metrics
}

// NewLimiter is the write rate limit: writesPerSecond on average, and up to
// one second's worth at once (at least one).
func NewLimiter(writesPerSecond float64) flowcontrol.RateLimiter {
	return flowcontrol.NewTokenBucketRateLimiter(float32(writesPerSecond), max(1, int(writesPerSecond+0.999)))
}

// SetupWithManager registers the controller. It watches namespace metadata
// (the informer the webhook reads) and pods, and runs only on the elected
// leader: a manager started without leader election runs it at once.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("policy").
		For(mutate.NamespaceMetadata(), builder.WithPredicates(predicate.Funcs{
			// At start (and on a new leader), every opted-in namespace.
			CreateFunc: func(e event.CreateEvent) bool {
				return r.Resolver.ScopeOf(&resolve.Namespace{Name: e.Object.GetName(), Labels: e.Object.GetLabels()}) == resolve.InScope
			},
			UpdateFunc: func(e event.UpdateEvent) bool { return policyChanged(e.ObjectOld, e.ObjectNew) },
			DeleteFunc: func(event.DeleteEvent) bool { return false },
		})).
		// A pod whose stamp is not what resolution says (admitted while the
		// webhook was absent, or stamped in a namespace that opted out while
		// the controller was down) brings its namespace in. Only the pod as
		// it is now counts (a map function would also map an update's old
		// object, whose stamp was just replaced). A pod with invalid
		// annotations is reported when it appears and when its annotations
		// change, not on every status update.
		Watches(&corev1.Pod{}, handler.Funcs{
			CreateFunc: func(ctx context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				r.enqueueIfNeeded(ctx, e.Object, q, true)
			},
			UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				r.enqueueIfNeeded(ctx, e.ObjectNew, q, !maps.Equal(e.ObjectOld.GetAnnotations(), e.ObjectNew.GetAnnotations()))
			},
		}).
		WithOptions(controller.Options{
			MaxConcurrentReconciles: concurrentNamespaces,
			// One per binary; tests run several webhooks in one process.
			SkipNameValidation: ptr.To(true),
		}).
		Complete(r)
}

// enqueueIfNeeded brings in the namespace of a pod that needs a write, or,
// with reportInvalid, that has invalid annotations.
func (r *Reconciler) enqueueIfNeeded(ctx context.Context, obj client.Object, q workqueue.TypedRateLimitingInterface[reconcile.Request], reportInvalid bool) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	req := reconcile.Request{NamespacedName: types.NamespacedName{Name: pod.Namespace}}
	_, ns, err := r.namespace(ctx, pod.Namespace)
	if err != nil {
		q.Add(req) // the pass reads it again and says what is wrong
		return
	}
	if p := planFor(r.Resolver, ns, pod); p.writes() || (reportInvalid && p.action == invalid) {
		q.Add(req)
	}
}

// namespace reads a namespace's metadata from the cache.
func (r *Reconciler) namespace(ctx context.Context, name string) (*metav1.PartialObjectMetadata, *resolve.Namespace, error) {
	m := mutate.NamespaceMetadata()
	if err := r.Client.Get(ctx, client.ObjectKey{Name: name}, m); err != nil {
		return nil, nil, err
	}
	return m, &resolve.Namespace{Name: name, Labels: m.Labels, Annotations: m.Annotations}, nil
}

// tally counts one pass's pods by outcome.
type tally struct {
	pods                                                int
	stamped, cleared, unchanged, skipped, invalid, fail int
	firstErr                                            error
	firstInvalid                                        string
}

func (t *tally) add(result string) {
	switch result {
	case resultStamped:
		t.stamped++
	case resultCleared:
		t.cleared++
	case resultUnchanged:
		t.unchanged++
	case resultSkipped:
		t.skipped++
	case resultInvalid:
		t.invalid++
	case resultFailed:
		t.fail++
	}
}

func (t *tally) String() string {
	return fmt.Sprintf("pods re-resolved: %d (stamped %d, cleared %d, unchanged %d, skipped %d, invalid %d, failed %d)",
		t.pods, t.stamped, t.cleared, t.unchanged, t.skipped, t.invalid, t.fail)
}

// Reconcile implements reconcile.Reconciler: one pass over the namespace's
// pods. Pods whose write failed make it return an error, so the namespace is
// retried with the controller's backoff; invalid pods wait for their owner's
// fix (which, as an update of the pod, brings the namespace in again).
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	log := logf.FromContext(ctx)
	start := time.Now()
	meta, ns, err := r.namespace(ctx, req.Name)
	if apierrors.IsNotFound(err) {
		return reconcile.Result{}, nil
	}
	if err != nil {
		return reconcile.Result{}, fmt.Errorf("reading namespace %s: %w", req.Name, err)
	}
	if meta.DeletionTimestamp != nil {
		return reconcile.Result{}, nil
	}
	var pods corev1.PodList
	if err := r.Client.List(ctx, &pods, client.InNamespace(req.Name)); err != nil {
		return reconcile.Result{}, fmt.Errorf("listing the pods of namespace %s: %w", req.Name, err)
	}

	t := tally{pods: len(pods.Items)}
	for i := range pods.Items {
		pod := &pods.Items[i]
		// The namespace as it is now: a pass over thousands of pods at the
		// write rate outlives a change made meanwhile.
		if _, ns, err = r.namespace(ctx, req.Name); err != nil {
			return reconcile.Result{}, fmt.Errorf("reading namespace %s: %w", req.Name, err)
		}
		result, err := r.apply(ctx, pod, planFor(r.Resolver, ns, pod))
		if ctx.Err() != nil {
			// Stopping, or no longer the leader: the next leader starts over.
			return reconcile.Result{}, ctx.Err()
		}
		t.add(result)
		r.Metrics.pod(result)
		if err != nil && t.firstErr == nil {
			t.firstErr = fmt.Errorf("pod %s: %w", pod.Name, err)
		}
		if result == resultInvalid && t.firstInvalid == "" {
			t.firstInvalid = pod.Name
		}
	}
	took := time.Since(start)
	r.Metrics.pass(took)
	r.report(log, meta, &t, took)
	if t.fail > 0 {
		return reconcile.Result{}, fmt.Errorf("namespace %s: %d of %d pod writes failed; first: %w", req.Name, t.fail, t.stamped+t.cleared+t.fail, t.firstErr)
	}
	return reconcile.Result{}, nil
}

// apply carries out a pod's plan and returns its result.
func (r *Reconciler) apply(ctx context.Context, pod *corev1.Pod, p plan) (string, error) {
	switch p.action {
	case keep:
		return resultUnchanged, nil
	case done:
		return resultSkipped, nil
	case invalid:
		r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonNotResolved,
			"disk IO limits not resolved: %v; the pod keeps its limits as they are, and its updates are refused until the annotation is fixed",
			p.res.Errors.ToAggregate())
		return resultInvalid, nil
	}
	err := r.write(ctx, pod, p)
	switch {
	case apierrors.IsNotFound(err):
		return resultSkipped, nil // deleted meanwhile
	case err != nil:
		return resultFailed, err
	case p.action == clear:
		logf.FromContext(ctx).V(1).Info("stamp cleared", "pod", pod.Name)
		return resultCleared, nil
	default:
		logf.FromContext(ctx).V(1).Info("pod stamped", "pod", pod.Name, "limits", p.value)
		return resultStamped, nil
	}
}

// errWebhookDisagrees: the stored stamp is not the one written.
var errWebhookDisagrees = errors.New("the stored stamp differs from the one written")

// write sets or removes the pod's stamp with a merge patch, once the rate
// limit allows. In an enabled namespace the webhook intercepts the update and
// stamps the pod with its own resolution (a pod cannot forge its stamp, and
// the controller cannot write anything the webhook would not); the stored
// stamp is checked against the one written, so a webhook replica whose
// namespace cache lags is caught and the pod retried. The pod's UID is a
// precondition: a pod recreated under the same name is not written.
func (r *Reconciler) write(ctx context.Context, pod *corev1.Pod, p plan) error {
	waitStart := time.Now()
	if err := r.Limiter.Wait(ctx); err != nil {
		return err
	}
	r.Metrics.waited(time.Since(waitStart))

	var value *string // nil: remove
	if p.action == stamp {
		value = &p.value
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"uid":         pod.UID,
		"annotations": map[string]*string{limits.ResolvedAnnotation: value},
	}})
	if err != nil {
		return err
	}
	obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace}}
	if err := r.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch), client.FieldOwner(Name)); err != nil {
		return fmt.Errorf("writing its stamp: %w", err)
	}
	got, has := obj.Annotations[limits.ResolvedAnnotation]
	if (value == nil && has) || (value != nil && (!has || got != *value)) {
		want := "none"
		if value != nil {
			want = *value
		}
		return fmt.Errorf("%w: stored %q, written %q (the webhook resolved it otherwise: a replica's namespace cache may lag, or its settings differ); retrying", errWebhookDisagrees, got, want)
	}
	return nil
}

// report logs the pass and, when pods were written, failed or are invalid,
// records an Event on the namespace. A pass that changed nothing logs at
// V(1) only: at start every opted-in namespace has one.
func (r *Reconciler) report(log logr.Logger, meta *metav1.PartialObjectMetadata, t *tally, took time.Duration) {
	kv := []any{"pods", t.pods, "stamped", t.stamped, "cleared", t.cleared, "unchanged", t.unchanged,
		"skipped", t.skipped, "invalid", t.invalid, "failed", t.fail, "duration", took.Round(time.Millisecond).String()}
	if t.stamped+t.cleared+t.fail+t.invalid == 0 {
		log.V(1).Info("namespace re-resolved: nothing to change", kv...)
		return
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meta.Name, UID: meta.UID}}
	if t.fail+t.invalid == 0 {
		log.Info("namespace re-resolved", kv...)
		r.Recorder.Eventf(ns, corev1.EventTypeNormal, ReasonResolved, "%s, in %s", t, took.Round(time.Millisecond))
		return
	}
	msg := t.String()
	if t.firstErr != nil {
		msg += fmt.Sprintf("; first failure: %v", t.firstErr)
		kv = append(kv, "firstError", t.firstErr.Error())
	}
	if t.firstInvalid != "" {
		msg += fmt.Sprintf("; invalid annotations on pod %s and maybe others (see their %s Events)", t.firstInvalid, ReasonNotResolved)
	}
	log.Info("namespace re-resolved with problems", kv...)
	r.Recorder.Eventf(ns, corev1.EventTypeWarning, ReasonResolveFailed, "%s", msg)
}
