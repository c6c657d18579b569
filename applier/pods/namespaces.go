package pods

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// OptedInNamespaces is an informer over the namespaces that opted in to
// KubeDiskGuard (label kubediskguard.io/enabled=true). A namespace that
// opts out leaves the watch as if deleted.
type OptedInNamespaces struct {
	informer cache.SharedIndexInformer
}

// NewOptedInNamespaces watches the opted-in namespaces, keeping only their
// names. core is a core/v1 REST client.
func NewOptedInNamespaces(core rest.Interface) *OptedInNamespaces {
	selector := limits.EnabledLabel + "=true"
	lw := cache.NewFilteredListWatchFromClient(core, "namespaces", metav1.NamespaceAll,
		func(o *metav1.ListOptions) { o.LabelSelector = selector })
	inf := cache.NewSharedIndexInformer(lw, &corev1.Namespace{}, 0, cache.Indexers{})
	if err := inf.SetTransform(func(obj any) (any, error) {
		if ns, ok := obj.(*corev1.Namespace); ok {
			return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Name, ResourceVersion: ns.ResourceVersion}}, nil
		}
		return obj, nil
	}); err != nil {
		panic(err) // only fails once the informer has started
	}
	return &OptedInNamespaces{informer: inf}
}

// Run watches until ctx is done.
func (n *OptedInNamespaces) Run(ctx context.Context) { n.informer.Run(ctx.Done()) }

// HasSynced reports whether the first list has been stored.
func (n *OptedInNamespaces) HasSynced() bool { return n.informer.HasSynced() }

// OptedIn reports whether the namespace has opted in.
func (n *OptedInNamespaces) OptedIn(namespace string) bool {
	_, ok, err := n.informer.GetStore().GetByKey(namespace)
	return err == nil && ok
}
