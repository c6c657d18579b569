package mutate

import (
	"encoding/json"
	"fmt"

	"gomodules.xyz/jsonpatch/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// podView is the part of a pod that resolution reads. Decoding only this part
// (not status, managedFields, volumes, env...) keeps the handler cheap on the
// path of every pod create and update, whatever the size of the pod.
type podView struct {
	Metadata *struct {
		Name              string            `json:"name"`
		GenerateName      string            `json:"generateName"`
		Labels            map[string]string `json:"labels"`
		Annotations       map[string]string `json:"annotations"`
		DeletionTimestamp *metav1.Time      `json:"deletionTimestamp"`
	} `json:"metadata"`
	Spec struct {
		Containers     []containerView `json:"containers"`
		InitContainers []containerView `json:"initContainers"`
	} `json:"spec"`
}

type containerView struct {
	Name  string `json:"name"`
	Image string `json:"image"`
}

// decodePod decodes the parts of a pod that resolution reads into a sparse
// *corev1.Pod, with the API machinery's JSON rules (case-sensitive field
// names, as the API server decodes them).
func decodePod(raw []byte) (*corev1.Pod, bool, error) {
	var v podView
	if err := kjson.UnmarshalCaseSensitivePreserveInts(raw, &v); err != nil {
		return nil, false, err
	}
	pod := &corev1.Pod{}
	if m := v.Metadata; m != nil {
		pod.Name, pod.GenerateName = m.Name, m.GenerateName
		pod.Labels, pod.Annotations = m.Labels, m.Annotations
		pod.DeletionTimestamp = m.DeletionTimestamp
	}
	pod.Spec.Containers = containers(v.Spec.Containers)
	pod.Spec.InitContainers = containers(v.Spec.InitContainers)
	return pod, v.Metadata != nil, nil
}

func containers(views []containerView) []corev1.Container {
	if len(views) == 0 {
		return nil
	}
	cs := make([]corev1.Container, len(views))
	for i, c := range views {
		cs[i].Name, cs[i].Image = c.Name, c.Image
	}
	return cs
}

// resolvedDoc is a pod reduced to its resolved-limits annotation.
type resolvedDoc struct {
	Metadata *struct {
		Annotations *map[string]string `json:"annotations,omitempty"`
	} `json:"metadata,omitempty"`
}

// resolvedPatch computes, with jsonpatch, the JSON patch that sets the
// resolved annotation to value on the pod as it came in the request. That is
// the only change the webhook makes, so the diff of the pod reduced to that
// annotation (and to whether metadata and annotations exist at all) is the
// diff of the whole pod; reducing it first spares decoding the pod twice.
func resolvedPatch(pod *corev1.Pod, hasMetadata bool, value string) ([]jsonpatch.Operation, error) {
	reduce := func(annotations map[string]string) resolvedDoc {
		var d resolvedDoc
		if hasMetadata {
			d.Metadata = &struct {
				Annotations *map[string]string `json:"annotations,omitempty"`
			}{}
			if annotations != nil {
				d.Metadata.Annotations = &annotations
			}
		}
		return d
	}
	before := map[string]string(nil)
	if pod.Annotations != nil {
		before = map[string]string{}
		if old, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
			before[limits.ResolvedAnnotation] = old
		}
	}
	a, err := json.Marshal(reduce(before))
	if err != nil {
		return nil, fmt.Errorf("encoding the pod's annotation: %w", err)
	}
	hasMetadata = true // the patch creates metadata if it was missing
	b, err := json.Marshal(reduce(map[string]string{limits.ResolvedAnnotation: value}))
	if err != nil {
		return nil, fmt.Errorf("encoding the resolved annotation: %w", err)
	}
	return jsonpatch.CreatePatch(a, b)
}
