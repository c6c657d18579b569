// Package mutate is the admission handler that stamps each pod with its
// resolved IO limits (the kubediskguard.io/limits annotation).
package mutate

import (
	"context"
	"fmt"
	"net/http"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/utils/ptr"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// Path is where the handler is served.
const Path = "/mutate-v1-pod"

// NamespaceReader gives the labels and annotations of a namespace.
type NamespaceReader interface {
	Namespace(ctx context.Context, name string) (*resolve.Namespace, error)
}

// PodLimiter resolves a pod's limits and stamps them on it.
type PodLimiter struct {
	Resolver   *resolve.Config
	Namespaces NamespaceReader
	Metrics    *Metrics
}

var _ admission.Handler = &PodLimiter{}

// Webhook wraps the handler for serving: a panic becomes a 500 answer that
// keeps the request's UID, never a crash.
func (h *PodLimiter) Webhook() *admission.Webhook {
	return &admission.Webhook{Handler: h, RecoverPanic: ptr.To(true)}
}

// Decisions, as counted by the kubediskguard_webhook_pods_total metric.
const (
	decisionStamped   = "stamped"   // the annotation was written or replaced
	decisionUnchanged = "unchanged" // the annotation already held the resolved limits
	decisionSkipped   = "skipped"   // the pod is left alone (namespace not enabled or excluded)
	decisionDenied    = "denied"    // the pod's annotations are invalid
	decisionError     = "error"     // the request could not be decided
)

var podGroupKind = corev1.SchemeGroupVersion.WithKind("Pod").GroupKind()

// Handle implements admission.Handler.
func (h *PodLimiter) Handle(ctx context.Context, req admission.Request) admission.Response {
	log := logf.FromContext(ctx)
	if req.Kind.Group != "" || req.Kind.Kind != "Pod" || req.SubResource != "" ||
		(req.Operation != admissionv1.Create && req.Operation != admissionv1.Update) {
		return h.count(decisionSkipped, admission.Allowed("not a pod create or update"))
	}

	pod, hasMetadata, err := decodePod(req.Object.Raw)
	if err != nil {
		return h.count(decisionError, admission.Errored(http.StatusBadRequest, fmt.Errorf("decoding pod: %w", err)))
	}
	if req.Operation == admissionv1.Update && pod.DeletionTimestamp != nil {
		// Never stand in the way of a pod's deletion (finalizer removal).
		return h.count(decisionSkipped, admission.Allowed("pod is being deleted"))
	}

	ns, err := h.Namespaces.Namespace(ctx, req.Namespace)
	if err != nil {
		log.Error(err, "reading namespace", "namespace", req.Namespace)
		return h.count(decisionError, admission.Errored(http.StatusInternalServerError, fmt.Errorf("reading namespace %q: %w", req.Namespace, err)))
	}

	res := h.Resolver.Resolve(ns, pod)
	h.Metrics.warned(res.Warnings)
	if len(res.Errors) > 0 {
		status := apierrors.NewInvalid(podGroupKind, podName(pod), res.Errors).ErrStatus
		log.Info("pod denied: invalid limits", "errors", res.Errors.ToAggregate().Error())
		return h.count(decisionDenied, admission.Response{AdmissionResponse: admissionv1.AdmissionResponse{
			Allowed: false, Result: &status,
		}}.WithWarnings(res.Messages()...))
	}
	if !res.Mutate {
		return h.count(decisionSkipped, admission.Allowed(res.Reason))
	}

	value := res.Limits.Encode()
	if old, ok := pod.Annotations[limits.ResolvedAnnotation]; ok && old == value {
		return h.count(decisionUnchanged, admission.Allowed("limits unchanged").WithWarnings(res.Messages()...))
	}
	patch := resolvedPatch(pod, hasMetadata, value)
	log.V(1).Info("pod stamped", "pod", podName(pod), "limits", value, "reason", res.Reason)
	return h.count(decisionStamped, admission.Patched("", patch...).WithWarnings(res.Messages()...))
}

func (h *PodLimiter) count(decision string, resp admission.Response) admission.Response {
	h.Metrics.decision(decision)
	return resp
}

// podName names the pod in messages, also before the API server named it.
func podName(pod *corev1.Pod) string {
	if pod.Name == "" && pod.GenerateName != "" {
		return pod.GenerateName + "*"
	}
	return pod.Name
}
