package policy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kubediskguard/kubediskguard/webhook/mutate"
)

// Pod results, as counted by kubediskguard_webhook_policy_pods_total.
const (
	resultStamped   = "stamped"   // the stamp was written (or replaced)
	resultCleared   = "cleared"   // the stamp was removed: the namespace is not enabled
	resultUnchanged = "unchanged" // the stamp already held the resolved limits, or the pod is never changed
	resultSkipped   = "skipped"   // terminating, finished, or deleted meanwhile
	resultInvalid   = "invalid"   // the pod's own annotations are invalid
	resultFailed    = "failed"    // the write failed or the webhook stored another stamp; retried
)

var results = []string{resultStamped, resultCleared, resultUnchanged, resultSkipped, resultInvalid, resultFailed}

// Metrics are the controller's Prometheus metrics. A nil *Metrics counts
// nothing.
type Metrics struct {
	pods   *prometheus.CounterVec
	passes prometheus.Histogram
	wait   prometheus.Counter
}

// NewMetrics creates the controller's metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		pods: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubediskguard_webhook_policy_pods_total",
			Help: "Pods the policy controller re-resolved, by result: stamped, cleared (namespace not enabled), unchanged, skipped (terminating or finished), invalid (the pod's annotations), failed (write failed; retried).",
		}, []string{"result"}),
		passes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubediskguard_webhook_policy_pass_duration_seconds",
			Help:    "Time of one pass of the policy controller over a namespace's pods, writes and rate-limit waits included.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10), // 1 ms to ~4 min
		}),
		wait: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kubediskguard_webhook_policy_rate_limit_wait_seconds_total",
			Help: "Time the policy controller's pod writes waited for the write rate limit (POLICY_WRITES_PER_SECOND).",
		}),
	}
	var err error
	if m.pods, err = mutate.Register(reg, m.pods); err != nil {
		return nil, err
	}
	if m.passes, err = mutate.Register(reg, m.passes); err != nil {
		return nil, err
	}
	if m.wait, err = mutate.Register(reg, m.wait); err != nil {
		return nil, err
	}
	for _, r := range results {
		m.pods.WithLabelValues(r)
	}
	return m, nil
}

func (m *Metrics) pod(result string) {
	if m != nil {
		m.pods.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) pass(d time.Duration) {
	if m != nil {
		m.passes.Observe(d.Seconds())
	}
}

func (m *Metrics) waited(d time.Duration) {
	if m != nil {
		m.wait.Add(d.Seconds())
	}
}
