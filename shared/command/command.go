// Package command is the shared main of both binaries: parse the options,
// set up structured logging, find the cluster, run until SIGTERM/SIGINT, and
// exit non-zero with the reason on any failure.
package command

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client/config"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/manager/signals"
)

// Options are a binary's parsed options.
type Options interface {
	// Logging returns the log options bound to the command line.
	Logging() *zap.Options
	// KubeconfigPath is --kubeconfig ("" for in-cluster or $KUBECONFIG).
	KubeconfigPath() string
	// Run runs the binary until ctx is done.
	Run(ctx context.Context, cfg *rest.Config) error
}

// Clusterless is implemented by Options that may not need the cluster (a
// subcommand that works on the node only): Main then looks for no cluster
// configuration and runs them with a nil *rest.Config.
type Clusterless interface {
	NeedsCluster() bool
}

// Main runs the binary name: parse reads its options from the command line
// and the environment. Bad options exit 2, a failed run exits 1.
func Main[O Options](name string, parse func(args []string, lookupEnv func(string) (string, bool)) (O, error)) {
	o, err := parse(os.Args[1:], os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println(err)
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(2)
	}
	logf.SetLogger(zap.New(zap.UseFlagOptions(o.Logging())))
	log := logf.Log.WithName(name)
	var cfg *rest.Config
	if c, ok := any(o).(Clusterless); !ok || c.NeedsCluster() {
		cfg, err = restConfig(o.KubeconfigPath())
	}
	if err == nil {
		err = o.Run(logf.IntoContext(signals.SetupSignalHandler(), log), cfg)
	}
	if err != nil {
		log.Error(err, "exiting")
		os.Exit(1)
	}
}

// restConfig loads the cluster connection: the kubeconfig file when given,
// else the in-cluster configuration or $KUBECONFIG.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("loading --kubeconfig %s: %w", kubeconfig, err)
		}
		if cfg.QPS == 0 {
			// As config.GetConfig does in a pod: no client-side rate limit
			// (client-go's default is 5 requests/s), the API server's
			// priority and fairness instead; the webhook's policy controller
			// bounds its own writes.
			cfg.QPS = -1
		}
		return cfg, nil
	}
	cfg, err := config.GetConfig()
	if err != nil {
		return nil, fmt.Errorf("finding the cluster (set --kubeconfig): %w", err)
	}
	return cfg, nil
}

// Common are the options both binaries have; their Options embed it.
type Common struct {
	Kubeconfig         string
	MetricsBindAddress string
	HealthProbeAddress string
	Log                zap.Options
}

// Bind adds --kubeconfig, --metrics-bind-address,
// --health-probe-bind-address and the logging flags to fs.
func (c *Common) Bind(fs *flag.FlagSet) {
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file, for running outside the cluster (default: in-cluster or $KUBECONFIG)")
	fs.StringVar(&c.MetricsBindAddress, "metrics-bind-address", ":8080", `address of the Prometheus metrics endpoint ("0" disables it)`)
	fs.StringVar(&c.HealthProbeAddress, "health-probe-bind-address", ":8081", "address of /healthz and /readyz")
	c.Log.BindFlags(fs)
}

// Logging implements Options.
func (c *Common) Logging() *zap.Options { return &c.Log }

// KubeconfigPath implements Options.
func (c *Common) KubeconfigPath() string { return c.Kubeconfig }
