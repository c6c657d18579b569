// Package app is the kubediskguard-webhook command: its options and the
// manager that serves the admission handler.
package app

import (
	"fmt"
	"math"
	"strings"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubediskguard/kubediskguard/shared/command"
	"github.com/kubediskguard/kubediskguard/shared/config"
	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/mutate"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// Options is the webhook's whole configuration.
type Options struct {
	command.Common

	CertDir string
	Port    int
	Resolve resolve.Config

	// PolicyWritesPerSecond bounds the policy controller's pod writes, all
	// namespaces together.
	PolicyWritesPerSecond float64
	// LeaderElectionNamespace holds the policy controller's Lease; empty:
	// the webhook's own namespace in a pod, else DefaultLeaseNamespace.
	LeaderElectionNamespace string
	// Lease holds the election's durations; not settings (tests shorten
	// them), zero: controller-runtime's.
	Lease LeaseTimings
}

// Defaults of the SPEC.
const (
	DefaultContainerIOPS     = 500
	DefaultExcludeKeywords   = "pause,istio-proxy,psmdb,kube-system,koordinator,apisix"
	DefaultExcludeNamespaces = "kube-system"
	DefaultCertDir           = "/tmp/k8s-webhook-server/serving-certs"
	// DefaultPolicyWritesPerSecond is client-go's and kube-controller-manager's
	// default client rate (--kube-api-qps 20): the policy controller weighs on
	// the API server no more than one of the cluster's own controllers does.
	DefaultPolicyWritesPerSecond = 20
	// DefaultLeaseNamespace holds the Lease when the webhook runs outside a
	// pod (a local run with --kubeconfig): it exists in every cluster.
	DefaultLeaseNamespace = "kube-system"
)

// ParseOptions reads the options from the command line and the environment
// (lookupEnv is normally os.LookupEnv). A bad value is an error naming it.
func ParseOptions(args []string, lookupEnv func(string) (string, bool)) (*Options, error) {
	o := &Options{}
	fs := config.NewFlagSet("kubediskguard-webhook")
	fs.StringVar(&o.CertDir, "cert-dir", DefaultCertDir, "directory holding tls.crt and tls.key; reloaded when they change")
	fs.IntVar(&o.Port, "port", 9443, "port of the HTTPS server that serves "+mutate.Path)

	o.Resolve.Defaults.Set(limits.KeyIOPS, DefaultContainerIOPS)
	for _, d := range []struct {
		env string
		key limits.Key
	}{
		{"CONTAINER_IOPS_LIMIT", limits.KeyIOPS},
		{"CONTAINER_READ_IOPS_LIMIT", limits.KeyReadIOPS},
		{"CONTAINER_WRITE_IOPS_LIMIT", limits.KeyWriteIOPS},
		{"CONTAINER_READ_BPS_LIMIT", limits.KeyReadBPS},
		{"CONTAINER_WRITE_BPS_LIMIT", limits.KeyWriteBPS},
	} {
		name := envToFlag(d.env)
		fs.Var(&defaultValue{&o.Resolve.Defaults, d.key}, name, fmt.Sprintf("default %s of a container (0 or unlimited: none)", d.key))
		fs.Env(name, d.env)
	}

	keywords := config.StringList(strings.Split(DefaultExcludeKeywords, ","))
	namespaces := config.StringList(strings.Split(DefaultExcludeNamespaces, ","))
	var selector string
	fs.Var(&keywords, "exclude-keywords", "comma-separated keywords: a container whose name or image contains one gets no limit")
	fs.Env("exclude-keywords", "EXCLUDE_KEYWORDS")
	fs.Var(&namespaces, "exclude-namespaces", "comma-separated namespaces whose pods are never changed")
	fs.Env("exclude-namespaces", "EXCLUDE_NAMESPACES")
	fs.StringVar(&selector, "exclude-pod-selector", "", "label selector of pods that get no limits, e.g. 'app in (db),tier!=infra'")
	fs.Env("exclude-pod-selector", "EXCLUDE_POD_SELECTOR")
	fs.Float64Var(&o.PolicyWritesPerSecond, "policy-writes-per-second", DefaultPolicyWritesPerSecond,
		"pod writes per second of the policy controller, all namespaces together (up to one second's worth at once)")
	fs.Env("policy-writes-per-second", "POLICY_WRITES_PER_SECOND")
	fs.StringVar(&o.LeaderElectionNamespace, "leader-election-namespace", "",
		"namespace of the policy controller's Lease (default: the webhook's own namespace in a pod, else "+DefaultLeaseNamespace+")")
	o.Common.Bind(fs.FlagSet)

	if err := fs.Parse(args, lookupEnv); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, fs.Usage())
	}
	o.Resolve.ExcludeKeywords = keywords
	o.Resolve.ExcludeNamespaces = namespaces
	if strings.TrimSpace(selector) != "" {
		sel, err := labels.Parse(selector)
		if err != nil {
			return nil, fmt.Errorf("invalid value %q for --exclude-pod-selector / EXCLUDE_POD_SELECTOR: %w", selector, err)
		}
		o.Resolve.ExcludePodSelector = sel
	}
	if o.Port <= 0 || o.Port > 65535 {
		return nil, fmt.Errorf("invalid value %d for --port: want 1-65535", o.Port)
	}
	if !(o.PolicyWritesPerSecond > 0) || math.IsInf(o.PolicyWritesPerSecond, 0) {
		return nil, fmt.Errorf("invalid value %v for --policy-writes-per-second / POLICY_WRITES_PER_SECOND: want a number above 0", o.PolicyWritesPerSecond)
	}
	if o.CertDir == "" {
		return nil, fmt.Errorf("--cert-dir must not be empty")
	}
	return o, nil
}

// envToFlag turns CONTAINER_IOPS_LIMIT into container-iops-limit.
func envToFlag(env string) string { return strings.ToLower(strings.ReplaceAll(env, "_", "-")) }

// defaultValue is a flag that sets one key of the webhook defaults.
type defaultValue struct {
	s   *resolve.Settings
	key limits.Key
}

func (v *defaultValue) Set(s string) error {
	n, err := limits.ParseValue(v.key, s)
	if err != nil {
		return err
	}
	v.s.Set(v.key, n)
	return nil
}

func (v *defaultValue) String() string {
	if v == nil || v.s == nil {
		return ""
	}
	n, ok := v.s.Get(v.key)
	if !ok {
		return ""
	}
	return fmt.Sprint(n)
}
