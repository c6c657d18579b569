package mutate

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// Metrics are the handler's Prometheus metrics. A nil *Metrics counts nothing.
type Metrics struct {
	pods     *prometheus.CounterVec
	warnings *prometheus.CounterVec
}

// NewMetrics creates the handler's metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		pods: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubediskguard_webhook_pods_total",
			Help: "Pod admission requests by decision: stamped, unchanged, skipped, denied, error.",
		}, []string{"decision"}),
		warnings: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubediskguard_webhook_warnings_total",
			Help: "Admission warnings returned, by kind: clamp (a value capped by a namespace ceiling), namespace (an invalid namespace annotation ignored), pod (an unknown pod annotation ignored).",
		}, []string{"kind"}),
	}
	for _, c := range []**prometheus.CounterVec{&m.pods, &m.warnings} {
		var err error
		if *c, err = Register(reg, *c); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{decisionStamped, decisionUnchanged, decisionSkipped, decisionDenied, decisionError} {
		m.pods.WithLabelValues(d)
	}
	for _, k := range resolve.WarningKinds {
		m.warnings.WithLabelValues(string(k))
	}
	return m, nil
}

func (m *Metrics) decision(d string) {
	if m != nil {
		m.pods.WithLabelValues(d).Inc()
	}
}

func (m *Metrics) warned(ws []resolve.Warning) {
	if m == nil {
		return
	}
	for _, w := range ws {
		m.warnings.WithLabelValues(string(w.Kind)).Inc()
	}
}

// Register registers c with reg and returns it; when reg already holds the
// same metric (a second webhook in the same process: tests), it returns that
// one instead, so that both count on the same series.
func Register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return c, err
		}
		existing, ok := are.ExistingCollector.(C)
		if !ok {
			return c, fmt.Errorf("metric registered twice with different types: %w", err)
		}
		return existing, nil
	}
	return c, nil
}
