package app

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"
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
	"github.com/kubediskguard/kubediskguard/webhook/policy"
)

// Run implements command.Options.
func (o *Options) Run(ctx context.Context, cfg *rest.Config) error { return Run(ctx, o, cfg) }

// Run serves the webhook until ctx is done.
func Run(ctx context.Context, o *Options, cfg *rest.Config) error {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	log := ctrl.LoggerFrom(ctx)
	leaseNS, err := leaseNamespace(o.LeaderElectionNamespace)
	if err != nil {
		return err
	}
	nsMeta := mutate.NamespaceMetadata()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Logger:                 log,
		Metrics:                metricsserver.Options{BindAddress: o.MetricsBindAddress},
		HealthProbeBindAddress: o.HealthProbeAddress,
		WebhookServer:          webhook.NewServer(webhook.Options{Port: o.Port, CertDir: o.CertDir}),
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			// Read-only use: the handler never changes what the cache hands out.
			nsMeta: {UnsafeDisableDeepCopy: ptr.To(true)},
			// The policy controller's (started on the leader only).
			&corev1.Pod{}: policy.PodCache(),
		}},
		// Every replica serves the webhook; only the Lease holder runs the
		// policy controller, and a stopping holder hands the Lease over at
		// once (the binary exits when Run returns).
		LeaderElection:                true,
		LeaderElectionID:              LeaseName,
		LeaderElectionNamespace:       leaseNS,
		LeaderElectionReleaseOnCancel: true,
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

	pm, err := policy.NewMetrics(metrics.Registry)
	if err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	ctl := &policy.Reconciler{
		Client:   mgr.GetClient(),
		Resolver: &o.Resolve,
		Limiter:  policy.NewLimiter(o.PolicyWritesPerSecond),
		Recorder: mgr.GetEventRecorderFor(policy.Name), //nolint:staticcheck // core/v1 Events, as leader election records them: one API group in RBAC
		Metrics:  pm,
	}
	if err := ctl.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the policy controller: %w", err)
	}

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

	log.Info("starting kubediskguard-webhook", "port", o.Port, "certDir", o.CertDir,
		"policyWritesPerSecond", o.PolicyWritesPerSecond, "lease", leaseNS+"/"+LeaseName,
		"defaults", o.Resolve.Defaults.String(), "excludeKeywords", o.Resolve.ExcludeKeywords,
		"excludeNamespaces", o.Resolve.ExcludeNamespaces, "excludePodSelector", fmt.Sprint(o.Resolve.ExcludePodSelector))
	return mgr.Start(ctx)
}

// LeaseName is the policy controller's Lease.
const LeaseName = "kubediskguard-webhook-policy"

// serviceAccountNamespace is where a pod finds its own namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// leaseNamespace is the Lease's namespace: the flag's, else the webhook's own
// namespace when it runs in a pod, else DefaultLeaseNamespace.
func leaseNamespace(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	b, err := os.ReadFile(serviceAccountNamespace)
	if errors.Is(err, os.ErrNotExist) {
		return DefaultLeaseNamespace, nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the webhook's namespace for its Lease (set --leader-election-namespace): %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
