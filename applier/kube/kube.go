// Package kube is the applier's Kubernetes client: core/v1 only (pods and
// events), over client-go's REST client with a scheme of just that group.
// The full clientset would register every API group at start and link them
// all in, which costs the node agent — one per node — memory for nothing.
package kube

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
)

// Scheme knows core/v1, for decoding and for event references.
var Scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}()

// NewCoreClient returns a REST client for the core/v1 API group.
func NewCoreClient(cfg *rest.Config) (rest.Interface, error) {
	c := rest.CopyConfig(cfg)
	c.APIPath = "/api"
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.NegotiatedSerializer = serializer.NewCodecFactory(Scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = "kubediskguard-applier"
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("creating the core/v1 client: %w", err)
	}
	return rc, nil
}

// EventSink writes events through a core/v1 REST client; it is a
// record.EventSink.
type EventSink struct {
	Client rest.Interface
}

// Create implements record.EventSink.
func (s EventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.Client.Post().Namespace(e.Namespace).Resource("events").Body(e).Do(context.TODO()).Into(out)
	return out, err
}

// Update implements record.EventSink.
func (s EventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.Client.Put().Namespace(e.Namespace).Resource("events").Name(e.Name).Body(e).Do(context.TODO()).Into(out)
	return out, err
}

// Patch implements record.EventSink.
func (s EventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.Client.Patch(types.StrategicMergePatchType).Namespace(e.Namespace).Resource("events").Name(e.Name).Body(data).Do(context.TODO()).Into(out)
	return out, err
}
