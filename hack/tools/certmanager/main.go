// Command cert-manager-local runs, in one process and against one
// Kubernetes API server, the parts of cert-manager that KubeDiskGuard's
// manifests rely on: the controllers that issue and renew Certificates from
// SelfSigned and CA Issuers and ClusterIssuers, and the CA injector. It is
// built by hack/test-bins.sh for the tests, from the library packages of
// github.com/cert-manager/cert-manager (whose own commands are separate
// modules that the Go module proxy does not serve), and wired the way
// upstream's cmd/controller/app and cmd/cainjector/app wire them, minus
// leader election, metrics, ACME, Vault, Venafi and the ingress/gateway shims.
// cert-manager's own webhook (defaulting, validation) is not run.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	cmscheme "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned/scheme"
	"github.com/cert-manager/cert-manager/pkg/controller"
	"github.com/cert-manager/cert-manager/pkg/controller/cainjector"
	"github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	crca "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	crselfsigned "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	"github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	"github.com/cert-manager/cert-manager/pkg/controller/issuers"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/cert-manager/cert-manager/pkg/util"

	// The Issuer types the issuers and clusterissuers controllers set up
	// (they register themselves with pkg/issuer).
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
)

// controllers are the cert-manager controllers this command runs: upstream's
// default set restricted to what Certificates from SelfSigned and CA issuers
// need. Importing a controller's package registers it with pkg/controller.
var controllers = []string{
	issuers.ControllerName,
	clusterissuers.ControllerName,
	// Without cert-manager's webhook and an approval policy, this is what
	// approves CertificateRequests for cert-manager.io issuers.
	approver.ControllerName,
	crca.CRControllerName,
	crselfsigned.CRControllerName,
	trigger.ControllerName,
	issuing.ControllerName,
	keymanager.ControllerName,
	requestmanager.ControllerName,
	readiness.ControllerName,
	revisionmanager.ControllerName,
}

// Upstream's defaults (internal/apis/config/controller/v1alpha1) for the
// options this command does not expose, and the cainjector's wait for the
// Certificate CRD (cmd/cainjector/app).
const (
	kubeAPIQPS                   = 20
	kubeAPIBurst                 = 50
	certificateRequestMinBackoff = time.Hour
	certificateRequestMaxBackoff = 32 * time.Hour
	clusterIssuerAmbientCreds    = true
	certificatesCRDWaitTimeout   = 5 * time.Minute
	certificatesCRDName          = "certificates.cert-manager.io"
)

var copiedAnnotationPrefixes = []string{"*", "-kubectl.kubernetes.io/", "-fluxcd.io/", "-argocd.argoproj.io/"}

type options struct {
	kubeconfig               string
	clusterResourceNamespace string
	healthProbeAddr          string
	workers                  int
	logging                  *logsapi.LoggingConfiguration
}

func parseFlags(args []string) (*options, error) {
	o := &options{logging: logsapi.NewLoggingConfiguration()}
	logsapi.SetRecommendedLoggingConfiguration(o.logging)
	fs := pflag.NewFlagSet("cert-manager-local", pflag.ContinueOnError)
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster; empty: in-cluster configuration")
	fs.StringVar(&o.clusterResourceNamespace, "cluster-resource-namespace", "kube-system",
		"namespace of the Secrets that ClusterIssuers refer to")
	fs.StringVar(&o.healthProbeAddr, "health-probe-bind-address", ":9403",
		"address of /healthz and /readyz (ready once the controllers' and the CA injector's caches are synced); 0 disables")
	fs.IntVar(&o.workers, "concurrent-workers", 5, "workers per cert-manager controller")
	logf.AddFlagsNonDeprecated(o.logging, fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.workers < 1 {
		return nil, fmt.Errorf("--concurrent-workers must be at least 1, got %d", o.workers)
	}
	if err := logf.ValidateAndApply(o.logging); err != nil {
		return nil, fmt.Errorf("logging flags: %w", err)
	}
	return o, nil
}

func main() {
	logf.InitLogs()
	o, err := parseFlags(os.Args[1:])
	if errors.Is(err, pflag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cert-manager-local:", err)
		os.Exit(2)
	}
	ctrl.SetLogger(logf.Log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	ctx = logf.NewContext(ctx, logf.Log)
	err = run(ctx, o)
	stop()
	if err != nil {
		logf.Log.Error(err, "cert-manager-local failed")
	} else {
		logf.Log.Info("cert-manager-local stopped")
	}
	logf.FlushLogs()
	if err != nil {
		os.Exit(1)
	}
}

// run serves until ctx is done: the CA injector is a controller-runtime
// manager (as upstream's cainjector), the cert-manager controllers one of its
// runnables (as upstream's controller, without leader election).
func run(ctx context.Context, o *options) error {
	log := logf.FromContext(ctx, "cert-manager-local")
	log.Info("starting", "version", util.AppVersion, "controllers", controllers)

	kubeConfig, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return fmt.Errorf("loading kubeconfig %q: %w", o.kubeconfig, err)
	}
	mgr, err := newCAInjector(ctx, util.RestConfigWithUserAgent(kubeConfig, "cainjector"), o.healthProbeAddr)
	if err != nil {
		return err
	}

	var controllersSynced atomic.Bool
	if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		return runControllers(ctx, o, &controllersSynced)
	})); err != nil {
		return fmt.Errorf("adding the cert-manager controllers: %w", err)
	}
	if o.healthProbeAddr != "0" {
		if err := addProbes(mgr, &controllersSynced); err != nil {
			return err
		}
	}
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("running: %w", err)
	}
	return nil
}

func addProbes(mgr manager.Manager, controllersSynced *atomic.Bool) error {
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return fmt.Errorf("adding /healthz: %w", err)
	}
	if err := mgr.AddReadyzCheck("controllers", func(*http.Request) error {
		if !controllersSynced.Load() {
			return errors.New("cert-manager controllers' caches not synced")
		}
		return nil
	}); err != nil {
		return fmt.Errorf("adding /readyz: %w", err)
	}
	if err := mgr.AddReadyzCheck("cainjector", func(req *http.Request) error {
		ctx, cancel := context.WithTimeout(req.Context(), time.Second)
		defer cancel()
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return errors.New("CA injector's cache not synced")
		}
		return nil
	}); err != nil {
		return fmt.Errorf("adding /readyz: %w", err)
	}
	return nil
}

// newCAInjector builds the CA injector for every injectable kind, with the
// Certificate data source (cert-manager.io/inject-ca-from), as upstream's
// cmd/cainjector/app.Run does with its defaults.
func newCAInjector(ctx context.Context, restConfig *rest.Config, healthProbeAddr string) (manager.Manager, error) {
	scheme := runtime.NewScheme()
	utilruntime.Must(kscheme.AddToScheme(scheme))
	utilruntime.Must(cmscheme.AddToScheme(scheme))
	utilruntime.Must(apiextensionsv1.AddToScheme(scheme))
	utilruntime.Must(apiregistrationv1.AddToScheme(scheme))

	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme: scheme,
		Cache:  cache.Options{ReaderFailOnMissingInformer: true},
		// Like upstream: Secrets are read from the API server, not cached.
		Client:                 client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: healthProbeAddr,
	})
	if err != nil {
		return nil, fmt.Errorf("creating the CA injector's manager: %w", err)
	}
	if err := waitForCertificatesCRD(ctx, mgr); err != nil {
		return nil, err
	}
	if err := cainjector.RegisterAllInjectors(ctx, mgr, cainjector.SetupOptions{
		EnableCertificatesDataSource: true,
		EnabledReconcilersFor: map[string]bool{
			cainjector.MutatingWebhookConfigurationName:   true,
			cainjector.ValidatingWebhookConfigurationName: true,
			cainjector.APIServiceName:                     true,
			cainjector.CustomResourceDefinitionName:       true,
		},
	}); err != nil {
		return nil, fmt.Errorf("registering the CA injectors: %w", err)
	}
	return mgr, nil
}

// waitForCertificatesCRD waits, as upstream's cainjector does, for the
// Certificate CRD its Certificate data source watches.
func waitForCertificatesCRD(ctx context.Context, mgr manager.Manager) error {
	c, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper()})
	if err != nil {
		return fmt.Errorf("creating a client: %w", err)
	}
	log := logf.FromContext(ctx)
	err = wait.PollUntilContextTimeout(ctx, time.Second, certificatesCRDWaitTimeout, true, func(ctx context.Context) (bool, error) {
		err := c.Get(ctx, types.NamespacedName{Name: certificatesCRDName}, &apiextensionsv1.CustomResourceDefinition{})
		if apierrors.IsNotFound(err) {
			log.Info("CRD not found yet, retrying", "crd", certificatesCRDName)
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("waiting for the %s CRD: %w", certificatesCRDName, err)
	}
	return nil
}

// runControllers runs the cert-manager controllers until ctx is done, as
// upstream's cmd/controller/app.Run: one ContextFactory, each controller
// built from it, then the shared informer factories started.
func runControllers(ctx context.Context, o *options, synced *atomic.Bool) error {
	log := logf.FromContext(ctx)
	factory, err := controller.NewContextFactory(ctx, controller.ContextOptions{
		Kubeconfig:         o.kubeconfig,
		KubernetesAPIQPS:   kubeAPIQPS,
		KubernetesAPIBurst: kubeAPIBurst,
		IssuerOptions: controller.IssuerOptions{
			ClusterResourceNamespace:        o.clusterResourceNamespace,
			ClusterIssuerAmbientCredentials: clusterIssuerAmbientCreds,
		},
		CertificateOptions: controller.CertificateOptions{
			CopiedAnnotationPrefixes:                 copiedAnnotationPrefixes,
			CertificateRequestMinimumBackoffDuration: certificateRequestMinBackoff,
			CertificateRequestMaximumBackoffDuration: certificateRequestMaxBackoff,
		},
	})
	if err != nil {
		return fmt.Errorf("building the controller context: %w", err)
	}
	cmctx, err := factory.Build()
	if err != nil {
		return fmt.Errorf("building the controller context: %w", err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	known := controller.Known()
	for _, name := range controllers {
		constructor, ok := known[name]
		if !ok {
			cancel()
			return errors.Join(fmt.Errorf("controller %s is not registered", name), g.Wait())
		}
		c, err := constructor(factory)
		if err != nil {
			cancel()
			return errors.Join(fmt.Errorf("building controller %s: %w", name, err), g.Wait())
		}
		clog := log.WithValues("controller", name)
		g.Go(func() error {
			clog.V(logf.InfoLevel).Info("starting controller")
			if err := c.Run(o.workers, ctx); err != nil {
				return fmt.Errorf("controller %s: %w", name, err)
			}
			return nil
		})
	}

	cmctx.SharedInformerFactory.Start(ctx.Done())
	cmctx.KubeSharedInformerFactory.Start(ctx.Done())
	cmctx.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())
	g.Go(func() error {
		if !allSynced(cmctx.SharedInformerFactory.WaitForCacheSync(ctx.Done())) ||
			!allSynced(cmctx.KubeSharedInformerFactory.WaitForCacheSync(ctx.Done())) {
			return nil // ctx is done
		}
		synced.Store(true)
		log.Info("controllers' caches synced")
		return nil
	})

	err = g.Wait()
	cmctx.HTTP01ResourceMetadataInformersFactory.Shutdown()
	cmctx.KubeSharedInformerFactory.Shutdown()
	cmctx.SharedInformerFactory.Shutdown()
	return err
}

func allSynced[K comparable](synced map[K]bool) bool {
	for _, ok := range synced {
		if !ok {
			return false
		}
	}
	return true
}
