package app

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/kubediskguard/kubediskguard/webhook/mutate"
)

// Run implements command.Options.
func (o *Options) Run(ctx context.Context, cfg *rest.Config) error { return Run(ctx, o, cfg) }

// Run serves the webhook until ctx is done.
func Run(ctx context.Context, o *Options, cfg *rest.Config) error {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	nsMeta := mutate.NamespaceMetadata()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: o.MetricsBindAddress},
		HealthProbeBindAddress: o.HealthProbeAddress,
		WebhookServer:          webhook.NewServer(webhook.Options{Port: o.Port, CertDir: o.CertDir}),
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			// Read-only use: the handler never changes what the cache hands out.
			nsMeta: {UnsafeDisableDeepCopy: ptr.To(true)},
		}},
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}

	// Register the namespace informer now, so that it starts and syncs with
	// the manager rather than on the first admission request.
	nsInformer, err := mgr.GetCache().GetInformer(ctx, nsMeta)
	if err != nil {
		return fmt.Errorf("creating the namespace informer: %w", err)
	}

	m, err := mutate.NewMetrics(metrics.Registry)
	if err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	handler := &mutate.PodLimiter{
		Resolver:   &o.Resolve,
		Namespaces: mutate.CachedNamespaces{Cache: mgr.GetCache(), API: mgr.GetAPIReader()},
		Metrics:    m,
	}
	srv := mgr.GetWebhookServer()
	srv.Register(mutate.Path, handler.Webhook())

	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("webhook-tls", srv.StartedChecker()); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("namespace-cache", func(*http.Request) error {
		if !nsInformer.HasSynced() {
			return errors.New("the namespace cache has not synced yet")
		}
		return nil
	}); err != nil {
		return err
	}

	ctrl.LoggerFrom(ctx).Info("starting kubediskguard-webhook", "port", o.Port, "certDir", o.CertDir,
		"defaults", o.Resolve.Defaults.String(), "excludeKeywords", o.Resolve.ExcludeKeywords,
		"excludeNamespaces", o.Resolve.ExcludeNamespaces, "excludePodSelector", fmt.Sprint(o.Resolve.ExcludePodSelector))
	return mgr.Start(ctx)
}
