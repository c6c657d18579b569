package reconcile

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Metrics are the reconciler's Prometheus metrics. A nil *Metrics counts nothing.
type Metrics struct {
	applied, failed, disconnects, capFailed prometheus.Counter
	latency                                 prometheus.Histogram
	limit                                   *prometheus.GaugeVec
	dataDevices, unstamped                  prometheus.Gauge
	full                                    *prometheus.CounterVec
}

var containerLabels = []string{"namespace", "pod", "container"}

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kubediskguard_applier_limits_applied_total",
			Help: "Containers whose cgroup IO limits were changed.",
		}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kubediskguard_applier_limits_failed_total",
			Help: "Failed attempts to set a container's cgroup IO limits.",
		}),
		disconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kubediskguard_applier_runtime_disconnects_total",
			Help: "Times the container runtime's event stream broke.",
		}),
		capFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kubediskguard_applier_node_cap_failures_total",
			Help: "Failed attempts to write the node-wide IOPS cap (DATA_TOTAL_IOPS) on the kubepods cgroup.",
		}),
		dataDevices: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubediskguard_applier_data_devices",
			Help: "Devices of the data disk being limited; 0 while the applier waits for the data disk (DATA_MOUNT not mounted, or on the root disk).",
		}),
		unstamped: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubediskguard_applier_unstamped_pods",
			Help: "Pods on this node in namespaces that opted in (kubediskguard.io/enabled=true) without a kubediskguard.io/limits annotation: not limited.",
		}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubediskguard_applier_apply_latency_seconds",
			Help:    "Time from a container's start event to its limits written.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 5},
		}),
		limit: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kubediskguard_applier_container_limit",
			Help: "Configured limit of a container per dimension (read-iops, write-iops in IO/s; read-bps, write-bps in bytes/s); 0 is unlimited.",
		}, append(containerLabels[:3:3], "dimension")),
		full: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubediskguard_applier_full_reconciles_total",
			Help: "Full reconciles (every container listed from the runtime) completed, by what asked for them: start, reconnect (the runtime's event stream opened again), interval (CHECK_INTERVAL). One pass asked for by several counts for each.",
		}, []string{"trigger"}),
	}
	for _, t := range []Trigger{TriggerStart, TriggerReconnect, TriggerInterval, TriggerDisk} {
		m.full.WithLabelValues(string(t)) // 0 until it happens
	}
	for _, c := range []prometheus.Collector{m.applied, m.failed, m.disconnects, m.capFailed, m.dataDevices, m.unstamped, m.latency, m.limit, m.full} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) appliedInc() {
	if m != nil {
		m.applied.Inc()
	}
}

func (m *Metrics) failedInc() {
	if m != nil {
		m.failed.Inc()
	}
}

// UnstampedPods is the gauge of opted-in pods without resolved limits
// (pods.Audit sets it); nil for a nil *Metrics.
func (m *Metrics) UnstampedPods() prometheus.Gauge {
	if m == nil {
		return nil
	}
	return m.unstamped
}

func (m *Metrics) nodeCapFailed() {
	if m != nil {
		m.capFailed.Inc()
	}
}

func (m *Metrics) setDataDevices(n int) {
	if m != nil {
		m.dataDevices.Set(float64(n))
	}
}

func (m *Metrics) runtimeDisconnect() {
	if m != nil {
		m.disconnects.Inc()
	}
}

func (m *Metrics) fullReconciled(triggers map[Trigger]bool) {
	if m == nil {
		return
	}
	for t := range triggers {
		m.full.WithLabelValues(string(t)).Inc()
	}
}

func (m *Metrics) observeLatency(d time.Duration) {
	if m != nil {
		m.latency.Observe(d.Seconds())
	}
}

func (m *Metrics) setLimit(c runtime.Container, l limits.Limits) {
	if m == nil {
		return
	}
	for _, d := range limits.Dimensions {
		m.limit.WithLabelValues(c.PodNamespace, c.PodName, c.Name, d.String()).Set(float64(l.Get(d)))
	}
}

func (m *Metrics) deleteContainer(c runtime.Container) {
	if m == nil {
		return
	}
	m.limit.DeletePartialMatch(prometheus.Labels{"namespace": c.PodNamespace, "pod": c.PodName, "container": c.Name})
}

// ioCollector reports each tracked container's IO on the data devices, read
// from its cgroup's own statistics when Prometheus scrapes.
type ioCollector struct {
	r          *Reconciler
	ops, bytes *prometheus.Desc
}

// IOCollector returns a collector of the observed IO of every container the
// reconciler tracks: kubediskguard_applier_container_io_operations_total and
// kubediskguard_applier_container_io_bytes_total by direction.
func (r *Reconciler) IOCollector() prometheus.Collector {
	labels := append(containerLabels[:3:3], "direction")
	return &ioCollector{
		r:     r,
		ops:   prometheus.NewDesc("kubediskguard_applier_container_io_operations_total", "IO operations a container completed on the data devices, from its cgroup's statistics.", labels, nil),
		bytes: prometheus.NewDesc("kubediskguard_applier_container_io_bytes_total", "Bytes a container transferred on the data devices, from its cgroup's statistics.", labels, nil),
	}
}

func (c *ioCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.ops; ch <- c.bytes }

func (c *ioCollector) Collect(ch chan<- prometheus.Metric) {
	c.r.mu.Lock()
	list := make([]tracked, 0, len(c.r.containers))
	for _, t := range c.r.containers {
		list = append(list, *t)
	}
	devices := c.r.disk.Devices
	c.r.mu.Unlock()
	for _, t := range list {
		stats, err := c.r.Cgroups.Stats(t.dir, devices)
		if err != nil {
			continue // exited since; its series ends
		}
		var rOps, wOps, rBytes, wBytes uint64
		for _, s := range stats {
			rOps, wOps, rBytes, wBytes = rOps+s.ReadIOs, wOps+s.WriteIOs, rBytes+s.ReadBytes, wBytes+s.WriteBytes
		}
		lv := []string{t.c.PodNamespace, t.c.PodName, t.c.Name}
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(rOps), append(lv, "read")...)
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(wOps), append(lv, "write")...)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(rBytes), append(lv, "read")...)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(wBytes), append(lv, "write")...)
	}
}
