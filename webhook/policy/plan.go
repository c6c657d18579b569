// Package policy is the controller that makes running pods follow their
// namespace's policy: when a namespace opts in, changes its defaults or
// ceilings, or opts out, it resolves the namespace's pods again with the
// webhook's own resolution (webhook/resolve) and writes the
// kubediskguard.io/limits stamp where it differs, at a bounded rate. It runs
// in the webhook's binary on the elected leader only.
package policy

import (
	"maps"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// action is what the controller does with one pod.
type action uint8

const (
	// keep: the stamp is what resolution says, or the pod is never changed
	// (excluded namespace).
	keep action = iota
	// done: the pod is terminating or finished; its stamp no longer matters.
	done
	// stamp: write value as the pod's stamp.
	stamp
	// clear: remove the stamp (the namespace is not enabled).
	clear
	// invalid: the pod's own annotations are invalid, so nothing can be
	// stamped (the webhook refuses the pod's updates until they are fixed).
	invalid
)

// plan is the decision for one pod.
type plan struct {
	action action
	value  string         // the stamp, for stamp
	res    resolve.Result // for invalid: the errors
}

// writes reports whether carrying out the plan writes the pod.
func (p plan) writes() bool { return p.action == stamp || p.action == clear }

// planFor decides what a pod of namespace ns needs, from the same resolution
// the webhook applies at admission: the stamp must equal what admitting the
// pod now would write, and a namespace that is not enabled carries none.
func planFor(cfg *resolve.Config, ns *resolve.Namespace, pod *corev1.Pod) plan {
	if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return plan{action: done}
	}
	current, stamped := pod.Annotations[limits.ResolvedAnnotation]
	res := cfg.Resolve(ns, pod)
	switch {
	case res.Scope == resolve.ExcludedNamespace:
		return plan{action: keep}
	case res.Scope == resolve.NotEnabled:
		if stamped {
			return plan{action: clear}
		}
		return plan{action: keep}
	case len(res.Errors) > 0:
		return plan{action: invalid, res: res}
	}
	v := res.Limits.Encode()
	if stamped && current == v {
		return plan{action: keep}
	}
	return plan{action: stamp, value: v}
}

// policyChanged reports whether a namespace update can change how its pods
// resolve: the opt-in label, or any kubediskguard.io/ annotation (defaults,
// ceilings).
func policyChanged(old, new metav1.Object) bool {
	return old.GetLabels()[limits.EnabledLabel] != new.GetLabels()[limits.EnabledLabel] ||
		!maps.Equal(policyAnnotations(old), policyAnnotations(new))
}

func policyAnnotations(o metav1.Object) map[string]string {
	var out map[string]string
	for k, v := range o.GetAnnotations() {
		if strings.HasPrefix(k, limits.Prefix) {
			if out == nil {
				out = make(map[string]string)
			}
			out[k] = v
		}
	}
	return out
}

// slimPod is the pod cache's transform: it keeps what planFor and the writes
// read (identity, labels, annotations, container names and images, phase,
// deletion), so that a cache of every pod of the cluster stays small.
func slimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone
	}
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			Labels: pod.Labels, Annotations: pod.Annotations, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Status: corev1.PodStatus{Phase: pod.Status.Phase},
	}
	out.Spec.Containers = nameAndImage(pod.Spec.Containers)
	out.Spec.InitContainers = nameAndImage(pod.Spec.InitContainers)
	return out, nil
}

func nameAndImage(cs []corev1.Container) []corev1.Container {
	if len(cs) == 0 {
		return nil
	}
	out := make([]corev1.Container, len(cs))
	for i, c := range cs {
		out[i].Name, out[i].Image = c.Name, c.Image
	}
	return out
}
