package mutate

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// NamespaceMetadata returns the object the namespace cache holds: a
// namespace's metadata only (labels and annotations are all the webhook reads).
func NamespaceMetadata() *metav1.PartialObjectMetadata {
	m := &metav1.PartialObjectMetadata{}
	m.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
	return m
}

// CachedNamespaces reads namespaces from an informer cache. A namespace the
// cache does not hold yet (created a moment ago) is read from the API server.
type CachedNamespaces struct {
	Cache client.Reader
	API   client.Reader
}

var _ NamespaceReader = CachedNamespaces{}

// Namespace implements NamespaceReader.
func (c CachedNamespaces) Namespace(ctx context.Context, name string) (*resolve.Namespace, error) {
	m := NamespaceMetadata()
	err := c.Cache.Get(ctx, client.ObjectKey{Name: name}, m)
	if apierrors.IsNotFound(err) && c.API != nil {
		err = c.API.Get(ctx, client.ObjectKey{Name: name}, m)
	}
	if err != nil {
		return nil, err
	}
	return &resolve.Namespace{Name: name, Labels: m.Labels, Annotations: m.Annotations}, nil
}
