// Package pods watches the pods bound to this node and keeps, for each, only
// what the applier needs: its identity, phase and resolved limits
// annotation; it watches the namespaces that opted in, and reports the
// opted-in pods that have no resolved annotation (Audit).
package pods

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

const byUID = "uid"

// Store is an informer over the node's pods, indexed by UID.
type Store struct {
	informer cache.SharedIndexInformer
}

// NewStore watches the pods whose spec.nodeName is nodeName. Each pod is cut
// down to its name, namespace, UID, phase, deletion time and resolved limits
// annotation before it is stored, which keeps the applier's memory small on
// busy nodes.
// core is a core/v1 REST client.
func NewStore(core rest.Interface, nodeName string) *Store {
	selector := fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
	lw := cache.NewFilteredListWatchFromClient(core, "pods", metav1.NamespaceAll,
		func(o *metav1.ListOptions) { o.FieldSelector = selector })
	inf := cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, cache.Indexers{
		byUID: func(obj any) ([]string, error) { return []string{string(obj.(*corev1.Pod).UID)}, nil },
	})
	if err := inf.SetTransform(slim); err != nil {
		panic(err) // only fails once the informer has started
	}
	return &Store{informer: inf}
}

// slim keeps what the applier reads of a pod.
func slim(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	out := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
		DeletionTimestamp: pod.DeletionTimestamp,
	}, Status: corev1.PodStatus{Phase: pod.Status.Phase}}
	if v, ok := pod.Annotations[limits.ResolvedAnnotation]; ok {
		out.Annotations = map[string]string{limits.ResolvedAnnotation: v}
	}
	return out, nil
}

// OnChange calls f with a pod's UID when the pod appears, when its resolved
// limits change, and when it is deleted. Call it before Run.
func (s *Store) OnChange(f func(uid string)) error {
	_, err := s.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { f(uidOf(obj)) },
		UpdateFunc: func(old, new any) {
			o, n := old.(*corev1.Pod), new.(*corev1.Pod)
			if o.Annotations[limits.ResolvedAnnotation] != n.Annotations[limits.ResolvedAnnotation] {
				f(string(n.UID))
			}
		},
		DeleteFunc: func(obj any) { f(uidOf(obj)) },
	})
	return err
}

func uidOf(obj any) string {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if pod, ok := obj.(*corev1.Pod); ok {
		return string(pod.UID)
	}
	return ""
}

// Run watches until ctx is done. The informer retries a broken watch by
// itself, relisting when needed.
func (s *Store) Run(ctx context.Context) { s.informer.Run(ctx.Done()) }

// HasSynced reports whether the first list has been stored.
func (s *Store) HasSynced() bool { return s.informer.HasSynced() }

// WaitForSync blocks until the first list is stored or ctx is done.
func (s *Store) WaitForSync(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), s.informer.HasSynced) {
		return fmt.Errorf("pod list not synced: %w", ctx.Err())
	}
	return nil
}

// Pod returns the stored pod with the given UID (cut down as NewStore
// says); ok is false when the store does not know it (yet).
func (s *Store) Pod(uid string) (pod *corev1.Pod, ok bool) {
	objs, err := s.informer.GetIndexer().ByIndex(byUID, uid)
	if err != nil || len(objs) == 0 {
		return nil, false
	}
	return objs[0].(*corev1.Pod), true
}

// List returns the stored pods (cut down as NewStore says).
func (s *Store) List() []*corev1.Pod {
	objs := s.informer.GetStore().List()
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		if p, ok := o.(*corev1.Pod); ok {
			out = append(out, p)
		}
	}
	return out
}
