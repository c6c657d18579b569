package mutate

import (
	"strings"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"gomodules.xyz/jsonpatch/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
// *corev1.Pod. It uses the encoding/json/v2 implementation (still behind
// GOEXPERIMENT in the standard library; go-json-experiment is its upstream):
// one pass over the bytes instead of encoding/json's two, about half the time
// on the webhook's hot path, and case-sensitive field names as the API
// server decodes them.
func decodePod(raw []byte) (*corev1.Pod, bool, error) {
	var v podView
	// The API server writes the request: no duplicate names to look for.
	if err := jsonv2.Unmarshal(raw, &v, jsontext.AllowDuplicateNames(true)); err != nil {
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

// resolvedPatch returns the JSON patch that sets the resolved annotation to
// value on the pod as it came in the request — the only change the webhook
// makes. The operation follows from what the request held: no metadata or no
// annotations (add the map), annotations without the key (add the key), or
// the key already there, possibly forged (replace it). TestResolvedPatch*
// applies it with the API server's patch library to prove the result.
func resolvedPatch(pod *corev1.Pod, hasMetadata bool, value string) []jsonpatch.Operation {
	switch {
	case !hasMetadata:
		return []jsonpatch.Operation{jsonpatch.NewOperation("add", "/metadata",
			map[string]any{"annotations": map[string]string{limits.ResolvedAnnotation: value}})}
	case pod.Annotations == nil:
		return []jsonpatch.Operation{jsonpatch.NewOperation("add", "/metadata/annotations",
			map[string]string{limits.ResolvedAnnotation: value})}
	}
	op := "add"
	if _, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
		op = "replace"
	}
	return []jsonpatch.Operation{jsonpatch.NewOperation(op, resolvedAnnotationPath, value)}
}

// resolvedAnnotationPath is the JSON pointer of the annotation ("/" in a key is "~1").
var resolvedAnnotationPath = "/metadata/annotations/" + strings.ReplaceAll(strings.ReplaceAll(limits.ResolvedAnnotation, "~", "~0"), "/", "~1")
