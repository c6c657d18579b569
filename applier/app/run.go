package app

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/applier/kube"
	"github.com/kubediskguard/kubediskguard/applier/pods"
	"github.com/kubediskguard/kubediskguard/applier/reconcile"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/applier/runtime/connect"
)

// Run implements command.Options.
func (o *Options) Run(ctx context.Context, cfg *rest.Config) error {
	if o.Reset.Run {
		return Reset(ctx, o, os.Stdout)
	}
	return Run(ctx, o, cfg)
}

// Run applies limits until ctx is done. Bad settings (a data disk that does
// not resolve, no block IO cgroup controller) fail at once; a data mount
// with no data disk mounted yet is waited for (not ready, saying why); the
// runtime and the API server are waited for and reconnected, never fatal.
// Nothing is cleared when ctx ends: limits stay as they are while the
// applier is replaced (`reset` clears them).
func Run(ctx context.Context, o *Options, cfg *rest.Config) error {
	started := time.Now()
	log := logf.FromContext(ctx)
	resolver := device.Resolver{ProcRoot: o.ProcRoot}
	settings := o.DataSettings()
	disk, err := resolver.DataDisk(settings)
	if err != nil && !errors.Is(err, device.ErrNoDataDisk) {
		return fmt.Errorf("resolving the data disk (--data-mount %q, --data-devices %q, --data-allow-root-disk=%t): %w", o.DataMount, o.DataDevices, o.DataAllowRootDisk, err)
	}
	if err != nil {
		log.Info("no data disk yet: waiting for one to be mounted (not ready until then)", "dataMount", o.DataMount, "reason", err.Error())
	}
	h, err := openHierarchy(o)
	if err != nil {
		return err
	}
	if o.DataTotalIOPS > 0 {
		log.Info("DATA_TOTAL_IOPS is set: it caps the read and write IOPS of all pods on this node together on the data disk — kube-system and namespaces that did not opt in included — on the kubepods cgroup", "dataTotalIOPS", o.DataTotalIOPS)
		if h.Version() == cgroup.V1 {
			log.Info("cgroup v1: the kernel's blkio throttle is not hierarchical, so DATA_TOTAL_IOPS on the kubepods cgroup limits only processes directly in it, not the pods below; use cgroup v2 for a node-wide cap", "dataTotalIOPS", o.DataTotalIOPS)
		}
	}
	if err := h.CheckIOEnabled(); err != nil {
		log.Info("WARNING: containers below this cgroup stay unlimited until the io controller is enabled in it (systemd: IOAccounting=yes on the slice; by hand: echo +io > cgroup.subtree_control of it and of its parents)", "reason", err.Error())
	}
	if h.Version() == cgroup.V1 {
		log.Info("cgroup v1: the kernel limits only the IO a container submits itself (O_DIRECT, O_SYNC/O_DSYNC writes, its own fsync); buffered writes that the kernel writes back (flusher threads, sync) are neither limited nor counted in its statistics; use cgroup v2 to limit them")
	}
	core, err := kube.NewCoreClient(cfg)
	if err != nil {
		return err
	}
	log.Info("starting kubediskguard-applier", "node", o.NodeName, "dataDisk", disk.String(),
		"cgroupVersion", h.Version().String(), "cgroupRoot", o.CgroupRoot, "runtime", o.ContainerRuntime,
		"dataTotalIOPS", o.DataTotalIOPS, "checkInterval", o.CheckInterval)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := reconcile.NewMetrics(reg)
	if err != nil {
		return err
	}

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(kube.EventSink{Client: core})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(kube.Scheme, corev1.EventSource{Component: "kubediskguard-applier", Host: o.NodeName})

	store := pods.NewStore(core, o.NodeName)
	var rec atomic.Pointer[reconcile.Reconciler] // set once the runtime answers
	if err := store.OnChange(func(uid string) {
		if r := rec.Load(); r != nil {
			r.PodChanged(uid)
		}
	}); err != nil {
		return err
	}

	namespaces := pods.NewOptedInNamespaces(core)
	audit := &pods.Audit{
		Pods: store, Namespaces: namespaces, Synced: []cache.InformerSynced{store.HasSynced, namespaces.HasSynced},
		Recorder: recorder, Unstamped: metrics.UnstampedPods(), Log: log.WithName("audit"),
	}

	ready := func(*http.Request) error {
		r := rec.Load()
		switch {
		case !store.HasSynced():
			return errors.New("the pod list has not synced")
		case r == nil:
			return errors.New("the container runtime has not answered")
		}
		return r.Ready()
	}
	healthy := func(*http.Request) error {
		if r := rec.Load(); r != nil {
			return r.Healthy()
		}
		return nil // waiting for the API server or the runtime is not being stuck
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := serve(ctx, &wg, o, reg, ready, healthy); err != nil {
		return err
	}
	wg.Go(func() { store.Run(ctx) })
	wg.Go(func() { namespaces.Run(ctx) })
	wg.Go(func() { audit.Run(ctx) })
	if !settings.Explicit() {
		wg.Go(func() {
			err := resolver.WatchMounts(ctx, func() {
				if r := rec.Load(); r != nil {
					r.DiskChanged()
				}
			})
			if err != nil {
				log.Error(err, "not watching the mount table: a data disk mounted or unmounted later is seen at the next full reconcile only", "file", resolver.MountInfoFile())
			}
		})
	}
	// The runtime is connected to while the pod list syncs: on a busy node
	// each can take seconds, and the applier is ready only after both.
	connected := make(chan runtime.Runtime, 1)
	wg.Go(func() {
		rt, _ := connectRuntime(ctx, o, h) // nil: stopped while waiting for it
		connected <- rt
	})
	if err := store.WaitForSync(ctx); err != nil {
		if rt := <-connected; rt != nil {
			rt.Close()
		}
		return nil // stopped before the first list
	}
	log.Info("pod list synced", "took", time.Since(started).Round(time.Millisecond))
	rt := <-connected
	if rt == nil {
		return nil
	}
	defer rt.Close()
	r := reconcile.New(reconcile.Config{
		Runtime: rt, Cgroups: h, Disk: func() (device.DataDisk, error) { return resolver.DataDisk(settings) },
		Node: o.NodeName, ProcRoot: o.ProcRoot, Pods: store,
		Recorder: recorder, Metrics: metrics, TotalIOPS: o.DataTotalIOPS, Interval: o.CheckInterval,
		Log: log.WithName("reconcile"),
	})
	if err := reg.Register(r.IOCollector()); err != nil {
		return err
	}
	rec.Store(r)
	r.Run(ctx)
	return nil
}

// openHierarchy opens the cgroup hierarchy the settings name and checks
// that the applier sees cgroup paths as the host does.
func openHierarchy(o *Options) (*cgroup.Hierarchy, error) {
	h, err := cgroup.Open(o.CgroupRoot, o.CgroupVersion)
	if err != nil {
		return nil, fmt.Errorf("opening the cgroup hierarchy (--cgroup-root %q, --cgroup-version %v): %w", o.CgroupRoot, o.CgroupVersion, err)
	}
	if err := h.CheckNamespace(o.ProcRoot); err != nil {
		return nil, fmt.Errorf("checking the cgroup namespace (--proc-root %q): %w", o.ProcRoot, err)
	}
	return h, nil
}

// connectRuntime connects to the container runtime, retrying with backoff
// until it answers, or returns nil and an error once ctx is done.
func connectRuntime(ctx context.Context, o *Options, h *cgroup.Hierarchy) (runtime.Runtime, error) {
	started := time.Now()
	log := logf.FromContext(ctx)
	var rt runtime.Runtime
	backoff := wait.Backoff{Duration: time.Second, Factor: 2, Jitter: 0.1, Steps: 1 << 30, Cap: 30 * time.Second}
	err := wait.ExponentialBackoffWithContext(ctx, backoff, func(ctx context.Context) (bool, error) {
		var err error
		rt, err = connect.Runtime(ctx, o.ContainerRuntime, o.SocketPath, o.ContainerdNamespace, h)
		if err != nil {
			log.Error(err, "container runtime not answering; retrying", "runtime", o.ContainerRuntime, "socket", o.SocketPath)
			return false, nil
		}
		log.Info("connected to the container runtime", "runtime", rt.Name(), "took", time.Since(started).Round(time.Millisecond))
		return true, nil
	})
	if err != nil {
		return nil, err // not the last failed attempt's (typed nil) value
	}
	return rt, nil
}

// serve starts the metrics and health endpoints: /readyz answers what
// ready says, /healthz what healthy says (503 with the reason, or ok).
func serve(ctx context.Context, wg *sync.WaitGroup, o *Options, reg *prometheus.Registry, ready, healthy func(*http.Request) error) error {
	servers := map[string]http.Handler{}
	if o.MetricsBindAddress != "0" && o.MetricsBindAddress != "" {
		servers[o.MetricsBindAddress] = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	}
	if o.HealthProbeAddress != "0" && o.HealthProbeAddress != "" {
		mux := http.NewServeMux()
		probe := func(check func(*http.Request) error) http.HandlerFunc {
			return func(w http.ResponseWriter, req *http.Request) {
				if err := check(req); err != nil {
					http.Error(w, err.Error(), http.StatusServiceUnavailable)
					return
				}
				fmt.Fprintln(w, "ok")
			}
		}
		mux.Handle("/healthz", probe(healthy))
		mux.Handle("/readyz", probe(ready))
		if metrics, ok := servers[o.HealthProbeAddress]; ok { // one address for both
			mux.Handle("/metrics", metrics)
		}
		servers[o.HealthProbeAddress] = mux
	}
	for addr, handler := range servers {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", addr, err)
		}
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
		wg.Go(func() { _ = srv.Serve(l) })
		wg.Go(func() {
			<-ctx.Done()
			shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(shutdown)
		})
	}
	return nil
}
