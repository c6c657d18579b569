package app

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-logr/logr"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
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
	// Every replica serves the webhook. The policy controller runs on the
	// Lease holder only, in a manager of its own (policyTerms): a replica that
	// loses the Lease (an API server starved past the renew deadline) stops
	// the controller and campaigns again, and never stops serving.
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Logger:                 log,
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

	pm, err := policy.NewMetrics(metrics.Registry)
	if err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	terms := &policyTerms{
		cfg: cfg, scheme: scheme, log: log.WithName("policy"), leaseNS: leaseNS, timings: o.Lease,
		reconciler: policy.Reconciler{
			Resolver: &o.Resolve,
			Limiter:  policy.NewLimiter(o.PolicyWritesPerSecond),
			Metrics:  pm,
		},
	}
	if err := mgr.Add(terms); err != nil {
		return fmt.Errorf("adding the policy controller: %w", err)
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

// policyTerms runs the policy controller for as long as this replica holds
// the Lease, in a manager of its own (its cache, its election), and
// campaigns again when a term ends: a lost Lease ends a term, not the
// webhook. A new term's manager has a new identity, so it waits for the lost
// term's Lease to expire; by then the old controller has stopped.
type policyTerms struct {
	cfg        *rest.Config
	scheme     *runtime.Scheme
	log        logr.Logger
	leaseNS    string
	timings    LeaseTimings
	reconciler policy.Reconciler // a copy per term, with the term's client and recorder
}

// NeedLeaderElection implements manager.LeaderElectionRunnable: every
// replica campaigns.
func (p *policyTerms) NeedLeaderElection() bool { return false }

// Start implements manager.Runnable: it returns when ctx is done.
func (p *policyTerms) Start(ctx context.Context) error {
	backoff := termBackoff()
	for {
		began := time.Now()
		err := p.term(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(began) > backoff.Cap {
			// A term that ran for a while: the next attempt starts again from 1 s.
			backoff = termBackoff()
		}
		delay := backoff.Step()
		p.log.Error(err, "the policy controller stopped; this replica keeps serving admission and campaigns for the Lease again",
			"lease", p.leaseNS+"/"+LeaseName, "in", delay.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
	}
}

// termBackoff is the wait between terms: 1 s, doubling up to 1 min.
func termBackoff() wait.Backoff {
	return wait.Backoff{Duration: time.Second, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: time.Minute}
}

// term campaigns for the Lease and, once it holds it, runs the policy
// controller until ctx is done (nil) or the Lease is lost (an error).
func (p *policyTerms) term(ctx context.Context) error {
	mgr, err := ctrl.NewManager(p.cfg, ctrl.Options{
		Scheme:                 p.scheme,
		Logger:                 p.log,
		Metrics:                metricsserver.Options{BindAddress: "0"}, // served by the webhook's manager
		HealthProbeBindAddress: "0",
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			mutate.NamespaceMetadata(): {UnsafeDisableDeepCopy: ptr.To(true)},
			&corev1.Pod{}:              policy.PodCache(),
		}},
		LeaderElection:                true,
		LeaderElectionID:              LeaseName,
		LeaderElectionNamespace:       p.leaseNS,
		LeaderElectionReleaseOnCancel: true, // a stopping replica hands the Lease over at once
		LeaseDuration:                 p.timings.LeaseDuration,
		RenewDeadline:                 p.timings.RenewDeadline,
		RetryPeriod:                   p.timings.RetryPeriod,
	})
	if err != nil {
		return fmt.Errorf("creating the policy controller's manager: %w", err)
	}
	r := p.reconciler
	r.Client = mgr.GetClient()
	r.Recorder = mgr.GetEventRecorderFor(policy.Name) //nolint:staticcheck // core/v1 Events, as leader election records them: one API group in RBAC
	if err := r.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the policy controller: %w", err)
	}
	return mgr.Start(ctx)
}

// LeaseTimings are the policy controller's leader-election durations; nil:
// controller-runtime's (15 s lease, 10 s renew deadline, 2 s retry).
type LeaseTimings struct {
	LeaseDuration, RenewDeadline, RetryPeriod *time.Duration
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
