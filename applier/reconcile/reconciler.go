// Package reconcile keeps every container's cgroup IO limits equal to what
// its pod's resolved annotation asks for, on the data disk's devices.
// Desired state is the annotation, actual state is the cgroup files; runtime
// events, pod changes and mount changes make it fast, a full pass at start,
// after every runtime reconnect and every interval makes it correct after
// anything was missed. The data disk is resolved again at every full pass
// and mount change: limits on devices that are no longer the data disk are
// cleared.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Pods gives the pods bound to this node.
type Pods interface {
	// Pod returns the pod with the UID; ok is false when it is not known
	// (yet). The pod carries at least its name, namespace, UID and the
	// resolved limits annotation.
	Pod(uid string) (pod *corev1.Pod, ok bool)
}

// Config is what a Reconciler works with.
type Config struct {
	Runtime runtime.Runtime
	Cgroups *cgroup.Hierarchy
	// Disk resolves the data disk, whose devices are limited in every
	// container; an error (device.ErrNoDataDisk: not mounted yet) means
	// there is none for now. It is called at every full reconcile and after
	// DiskChanged.
	Disk func() (device.DataDisk, error)
	// Node is this node's name, for Events on the Node; "" records none.
	Node string
	// ProcRoot is the host's /proc, for the cgroup of a container's init process.
	ProcRoot string
	Pods     Pods
	// Recorder records Events on pods; nil records none.
	Recorder record.EventRecorder
	Metrics  *Metrics
	// TotalIOPS caps read and write IOPS of all pods together, on the
	// kubepods cgroup; 0 clears that cap.
	TotalIOPS uint64
	// Interval is the time between full reconciles.
	Interval time.Duration
	// StallAfter is how long one queue item (a container, a full pass) may
	// take before Healthy reports the reconciler stuck; 0 is DefaultStall.
	StallAfter time.Duration
	Log        logr.Logger
}

// DefaultStall is how long one item of work may take before the reconciler
// counts as stuck. An item is one container's cgroup files or one listing
// of the runtime's containers: milliseconds, or seconds on a very busy node.
const DefaultStall = 2 * time.Minute

const (
	// fullKey is the queue key of a full reconcile; container IDs never
	// equal it.
	fullKey = "*full*"
	// diskKey is the queue key of resolving the data disk again after a
	// mount change: many changes in a row are one item.
	diskKey = "*disk*"
	// workers is the number of containers reconciled at once.
	workers = 2
)

// Reconciler applies limits to containers. Create it with New.
type Reconciler struct {
	Config
	queue workqueue.TypedRateLimitingInterface[string]

	mu         sync.Mutex
	containers map[string]*tracked        // by container ID
	byPod      map[string]map[string]bool // pod UID → container IDs
	since      map[string]time.Time       // container ID → when its start event arrived
	eventPID   map[string]int             // container ID → the PID its start event gave
	invalid    map[string]string          // pod UID → annotation value already reported invalid
	disk       device.DataDisk            // the data disk's devices now; none while waiting
	diskErr    error                      // why there is no data disk, while waiting
	diskKnown  bool                       // the disk was resolved at least once
	retired    map[device.Device]bool     // devices that were the data disk: their limits are cleared
	capErr     string                     // the node cap's last write error, reported once
	fullWhy    map[Trigger]bool           // what asked for the full reconcile queued now

	synced   atomic.Bool // a full reconcile has completed
	progress progress    // what the workers are doing, for Healthy
}

// tracked is a running Kubernetes container and where its cgroup is.
type tracked struct {
	c   runtime.Container
	dir string
}

// New returns a Reconciler; Run starts it.
func New(cfg Config) *Reconciler {
	return &Reconciler{
		Config: cfg,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "kubediskguard-applier"}),
		containers: map[string]*tracked{},
		byPod:      map[string]map[string]bool{},
		since:      map[string]time.Time{},
		eventPID:   map[string]int{},
		invalid:    map[string]string{},
		retired:    map[device.Device]bool{},
		progress:   progress{busy: map[int]busyItem{}},
		fullWhy:    map[Trigger]bool{},
	}
}

// Trigger is what asked for a full reconcile, as the metric
// kubediskguard_applier_full_reconciles_total counts them.
type Trigger string

const (
	// TriggerStart is the runtime's first event stream, at the start.
	TriggerStart Trigger = "start"
	// TriggerReconnect is the runtime's event stream opened again after it
	// broke.
	TriggerReconnect Trigger = "reconnect"
	// TriggerInterval is the periodic pass, every Interval.
	TriggerInterval Trigger = "interval"
	// TriggerDisk is the data disk changed (the mount watch).
	TriggerDisk Trigger = "disk"
)

// requestFull queues a full reconcile for trigger; the triggers that ask
// before it runs share it.
func (r *Reconciler) requestFull(trigger Trigger) {
	r.mu.Lock()
	r.fullWhy[trigger] = true
	r.mu.Unlock()
	r.queue.Add(fullKey)
}

// Synced reports whether a full reconcile has completed.
func (r *Reconciler) Synced() bool { return r.synced.Load() }

// Ready says, for /readyz, why the reconciler is not ready yet: no full
// reconcile has completed, or there is no data disk to limit (for example
// DATA_MOUNT is not mounted yet). nil when it limits containers.
func (r *Reconciler) Ready() error {
	if !r.synced.Load() {
		return errors.New("the first full reconcile has not completed")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.diskErr != nil {
		return fmt.Errorf("waiting for the data disk: %w", r.diskErr)
	}
	return nil
}

// DataDisk returns the data disk the reconciler limits now (no devices
// while it waits for one).
func (r *Reconciler) DataDisk() device.DataDisk {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.disk
}

// DiskChanged is called when the mount table changed: the data disk is
// resolved again, and if it is another one, everything is reconciled.
func (r *Reconciler) DiskChanged() { r.queue.Add(diskKey) }

// PodChanged is called when a pod appears, its resolved limits change, or it
// is deleted: its known containers are reconciled.
func (r *Reconciler) PodChanged(uid string) {
	r.mu.Lock()
	ids := make([]string, 0, len(r.byPod[uid]))
	for id := range r.byPod[uid] {
		ids = append(ids, id)
	}
	r.mu.Unlock()
	for _, id := range ids {
		r.queue.Add(id)
	}
}

// Run reconciles until ctx is done: it watches the runtime (reconciling
// everything once the event stream is open, and again after each
// reconnect), runs a full reconcile every Interval after the start, and
// works the queue.
func (r *Reconciler) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { r.watch(ctx) })
	wg.Go(func() {
		tick := time.NewTicker(r.Interval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				r.requestFull(TriggerInterval)
			}
		}
	})
	for w := range workers {
		wg.Go(func() {
			for r.next(ctx, w) {
			}
		})
	}
	<-ctx.Done()
	r.queue.ShutDown()
	wg.Wait()
}

// watch follows the runtime's events, reconnecting with exponential backoff
// (capped at 30 s) when the stream breaks; every (re)subscription queues a
// full reconcile, which catches whatever happened while it was down.
func (r *Reconciler) watch(ctx context.Context) {
	backoff := wait.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Jitter: 0.2, Steps: 1 << 30, Cap: 30 * time.Second}
	delay := backoff
	trigger := TriggerStart
	for ctx.Err() == nil {
		started := time.Now()
		err := r.Runtime.Watch(ctx, func() {
			r.Log.V(1).Info("runtime event stream open", "runtime", r.Runtime.Name())
			r.requestFull(trigger)
			trigger = TriggerReconnect
		}, r.handle)
		if ctx.Err() != nil {
			return
		}
		r.Metrics.runtimeDisconnect()
		if time.Since(started) > time.Minute {
			delay = backoff // it ran for a while: start backing off afresh
		}
		d := delay.Step()
		r.Log.Error(err, "runtime event stream broke; reconnecting", "runtime", r.Runtime.Name(), "in", d.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}

// handle takes one runtime event.
func (r *Reconciler) handle(ev runtime.Event) {
	switch ev.Kind {
	case runtime.Created:
		r.queue.Add(ev.ContainerID)
	case runtime.Started:
		r.mu.Lock()
		if _, ok := r.since[ev.ContainerID]; !ok {
			r.since[ev.ContainerID] = time.Now()
		}
		if ev.PID > 0 {
			r.eventPID[ev.ContainerID] = ev.PID
		}
		// Inspect again: a restarted process may live in a new cgroup. The
		// same process again (containerd's task start after its task
		// create) is in the same one.
		if t, ok := r.containers[ev.ContainerID]; !ok || ev.PID == 0 || t.c.PID != ev.PID {
			r.untrackLocked(ev.ContainerID)
		}
		r.mu.Unlock()
		r.queue.Add(ev.ContainerID)
	case runtime.Exited, runtime.Deleted:
		r.forget(ev.ContainerID)
	}
}

// next works one queue item as worker w; false when the queue has shut
// down.
func (r *Reconciler) next(ctx context.Context, w int) bool {
	key, shutdown := r.queue.Get()
	if shutdown {
		return false
	}
	defer r.queue.Done(key)
	r.progress.start(w, key)
	defer r.progress.done(w)
	var err error
	switch key {
	case fullKey:
		err = r.reconcileAll(ctx)
	case diskKey:
		if r.refreshDisk() {
			r.requestFull(TriggerDisk)
		}
	default:
		err = r.reconcileContainer(ctx, key)
	}
	if err != nil && ctx.Err() == nil {
		r.Log.Error(err, "reconcile failed; retrying", "key", key)
		r.queue.AddRateLimited(key)
		return true
	}
	r.queue.Forget(key)
	return true
}

// reconcileAll resolves the data disk, lists the runtime's running
// containers, forgets those that are gone, queues every one, and sets the
// node-wide cap. A cap that cannot be written is reported (log, Event on
// the Node, metric) and tried again at the next pass; it does not keep the
// applier from being ready, since the containers' own limits do not depend
// on it.
func (r *Reconciler) reconcileAll(ctx context.Context) error {
	started := time.Now()
	r.refreshDisk()
	r.mu.Lock()
	why := r.fullWhy
	r.fullWhy = map[Trigger]bool{}
	r.mu.Unlock()
	list, err := r.Runtime.List(ctx)
	if err != nil {
		r.mu.Lock()
		maps.Copy(r.fullWhy, why) // the retry serves them
		r.mu.Unlock()
		return fmt.Errorf("listing containers: %w", err)
	}
	running := make(map[string]bool, len(list))
	for _, c := range list {
		running[c.ID] = true
	}
	r.mu.Lock()
	for id := range r.containers {
		if !running[id] {
			r.forgetLocked(id)
		}
	}
	for _, c := range list {
		if t, ok := r.containers[c.ID]; !ok || t.c.PID != c.PID {
			r.trackLocked(c, r.cgroupDirOf(c))
		}
	}
	r.mu.Unlock()
	for _, c := range list {
		r.queue.Add(c.ID)
	}
	r.Metrics.fullReconciled(why)
	r.applyNodeCap()
	if !r.synced.Swap(true) {
		r.Log.Info("first full reconcile done", "containers", len(list), "took", time.Since(started).Round(time.Millisecond))
	}
	return nil
}

// applyNodeCap writes TotalIOPS for the data disk on the kubepods cgroup,
// and clears it from retired devices. A failure is reported, not returned.
func (r *Reconciler) applyNodeCap() {
	dir, err := r.kubepods()
	if err != nil {
		r.Log.V(1).Info("no kubepods cgroup yet; node-wide cap not set", "reason", err.Error())
		return
	}
	disk, retired := r.devices()
	l := limits.Limits{ReadIOPS: r.TotalIOPS, WriteIOPS: r.TotalIOPS}
	changed, err := r.apply(dir, disk.Devices, retired, l)
	if err != nil {
		r.Metrics.nodeCapFailed()
		r.mu.Lock()
		first := r.capErr != err.Error()
		r.capErr = err.Error()
		r.mu.Unlock()
		if first {
			r.Log.Error(err, "setting the node-wide IOPS cap (DATA_TOTAL_IOPS) failed; containers are still limited; retrying at every full pass", "cgroup", dir, "iops", r.TotalIOPS)
			r.nodeEvent(corev1.EventTypeWarning, "NodeIOCapFailed", "setting DATA_TOTAL_IOPS=%d on %s for %s: %v", r.TotalIOPS, dir, disk, err)
		}
		return
	}
	r.mu.Lock()
	recovered := r.capErr != ""
	r.capErr = ""
	r.mu.Unlock()
	switch {
	case recovered:
		r.Log.Info("node-wide IOPS cap written again", "cgroup", dir, "iops", r.TotalIOPS, "devices", disk.String())
	case changed && r.TotalIOPS == 0:
		r.Log.Info("node-wide IOPS cap cleared (DATA_TOTAL_IOPS=0)", "cgroup", dir)
	case changed:
		r.Log.Info("node-wide IOPS cap set", "cgroup", dir, "iops", r.TotalIOPS, "devices", disk.String())
	}
}

// apply sets l for devices on the cgroup dir and clears every limit of the
// retired devices there.
func (r *Reconciler) apply(dir string, devices, retired []device.Device, l limits.Limits) (bool, error) {
	changed, err := r.Cgroups.Apply(dir, devices, l)
	if err != nil || len(retired) == 0 {
		return changed, err
	}
	cleared, err := r.Cgroups.Clear(dir, retired)
	return changed || cleared, err
}

// devices returns the data disk now and the devices whose limits are
// cleared because they no longer are the data disk.
func (r *Reconciler) devices() (device.DataDisk, []device.Device) {
	r.mu.Lock()
	defer r.mu.Unlock()
	retired := make([]device.Device, 0, len(r.retired))
	for d := range r.retired {
		retired = append(retired, d)
	}
	return r.disk, retired
}

// refreshDisk resolves the data disk and reports whether it changed: a
// device that stops being the data disk is retired (its limits are cleared
// from every container and the kubepods cgroup from now on), one that
// becomes it again is not. While there is no data disk, nothing is limited
// and Ready says why.
func (r *Reconciler) refreshDisk() (changed bool) {
	d, err := r.Disk()
	if err != nil {
		d = device.DataDisk{}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	sameErr := (err == nil) == (r.diskErr == nil) && (err == nil || err.Error() == r.diskErr.Error())
	if r.diskKnown && sameErr && d.Equal(r.disk) {
		return false
	}
	now := map[device.Device]bool{}
	for _, dev := range d.Devices {
		now[dev] = true
		delete(r.retired, dev)
	}
	for _, dev := range r.disk.Devices {
		if !now[dev] {
			r.retired[dev] = true
		}
	}
	was := r.disk
	r.disk, r.diskErr, r.diskKnown = d, err, true
	r.Metrics.setDataDevices(len(d.Devices))
	switch {
	case err != nil && len(was.Devices) > 0:
		r.Log.Error(err, "the data disk is gone; clearing its limits and waiting for it", "was", was.String())
	case err != nil:
		r.Log.Info("waiting for the data disk; nothing is limited until it is there", "reason", err.Error())
	case len(was.Devices) > 0:
		r.Log.Info("the data disk changed; limiting the new devices and clearing the old ones", "devices", d.String(), "was", was.String())
	default:
		r.Log.Info("limiting the data disk", "devices", d.String())
	}
	return true
}

// kubepods finds the kubepods cgroup from a tracked container, or by probing.
func (r *Reconciler) kubepods() (string, error) {
	r.mu.Lock()
	var dir string
	for _, t := range r.containers { // any one will do
		dir = t.dir
		break
	}
	r.mu.Unlock()
	if dir != "" {
		if k, err := r.Cgroups.KubepodsOf(dir); err == nil {
			return k, nil
		}
	}
	return r.Cgroups.FindKubepods()
}

// reconcileContainer makes one container's limits what its pod asks for.
func (r *Reconciler) reconcileContainer(ctx context.Context, id string) error {
	r.mu.Lock()
	t := r.containers[id]
	pid := r.eventPID[id]
	delete(r.eventPID, id)
	r.mu.Unlock()
	if t == nil {
		var c runtime.Container
		var err error
		if pid > 0 {
			// The start event gave the PID: skip asking containerd's shim,
			// which is busy starting the task, and win the race with it.
			c, err = r.Runtime.Identify(ctx, id)
			c.PID = pid
		} else {
			c, err = r.Runtime.Container(ctx, id)
		}
		switch {
		case errors.Is(err, runtime.ErrNotFound), errors.Is(err, runtime.ErrNotKubernetes):
			r.forget(id)
			return nil
		case err != nil:
			return fmt.Errorf("inspecting container %s: %w", id, err)
		case c.PID == 0:
			return nil // created, not started: its start event comes next
		}
		dir := r.cgroupDirOf(c)
		r.mu.Lock()
		t = r.trackLocked(c, dir)
		r.mu.Unlock()
	}

	pod, ok := r.Pods.Pod(t.c.PodUID)
	if !ok {
		// Not seen yet: the pod's arrival in the informer reconciles it.
		r.Log.V(1).Info("pod not known yet", "pod", t.c.PodNamespace+"/"+t.c.PodName, "container", t.c.Name)
		return nil
	}
	want, err := r.desired(pod, t.c.Name)
	if err != nil {
		return nil // reported on the pod; keep what is there
	}
	disk, retired := r.devices()
	changed, err := r.apply(t.dir, disk.Devices, retired, want)
	if errors.Is(err, cgroup.ErrCgroupGone) {
		r.forget(id)
		return nil
	}
	if err != nil {
		r.Metrics.failedInc()
		r.event(pod, corev1.EventTypeWarning, "IOLimitsFailed", "container %s: setting disk IO limits %s on %s: %v", t.c.Name, want, disk, err)
		return fmt.Errorf("container %s of pod %s/%s: %w", t.c.Name, pod.Namespace, pod.Name, err)
	}
	r.Metrics.setLimit(t.c, want)
	r.mu.Lock()
	since, timed := r.since[id]
	delete(r.since, id)
	r.mu.Unlock()
	switch {
	case changed && len(disk.Devices) == 0:
		r.Log.Info("IO limits cleared from devices that are no longer the data disk", "pod", pod.Namespace+"/"+pod.Name, "container", t.c.Name, "devices", fmt.Sprint(retired), "cgroup", t.dir)
	case changed:
		kv := []any{"pod", pod.Namespace + "/" + pod.Name, "container", t.c.Name, "limits", want.String(), "devices", disk.String(), "cgroup", t.dir}
		if timed {
			// The reaction: from the container's first start event.
			d := time.Since(since)
			r.Metrics.observeLatency(d)
			kv = append(kv, "sinceStartEventMs", float64(d.Microseconds())/1000)
		}
		r.Metrics.appliedInc()
		r.Log.Info("IO limits applied", kv...)
		r.event(pod, corev1.EventTypeNormal, "IOLimitsApplied", "container %s: disk IO limits %s on %s", t.c.Name, want, disk)
	}
	return nil
}

// desired decodes the pod's resolved annotation and returns the container's
// entry; no annotation or no entry means no limits. An annotation that does
// not decode is reported on the pod (once per value) and returned as an error.
func (r *Reconciler) desired(pod *corev1.Pod, container string) (limits.Limits, error) {
	v, ok := pod.Annotations[limits.ResolvedAnnotation]
	if !ok {
		return limits.Limits{}, nil
	}
	res, err := limits.DecodeResolved(v)
	if err != nil {
		r.mu.Lock()
		first := r.invalid[string(pod.UID)] != v
		r.invalid[string(pod.UID)] = v
		r.mu.Unlock()
		if first {
			r.event(pod, corev1.EventTypeWarning, "IOLimitsInvalid", "%v; limits left as they are", err)
		}
		return limits.Limits{}, err
	}
	return res[container], nil
}

// cgroupDirOf finds a running container's cgroup: the cgroup of its init
// process when the host's /proc shows it, else the one its runtime
// configuration names.
func (r *Reconciler) cgroupDirOf(c runtime.Container) string {
	if c.PID <= 0 {
		return c.CgroupDir
	}
	dir, err := r.Cgroups.ProcessDir(r.ProcRoot, c.PID)
	if err == nil {
		// A PID from an event may already belong to an exited process (in
		// the root cgroup) or to another one: only a cgroup named after
		// the container is the container's.
		if cdir, ok := r.Cgroups.ContainerDirOf(dir, c.ID); ok {
			return cdir
		}
		err = fmt.Errorf("process %d is in %s, not in a cgroup of container %s", c.PID, dir, c.ID)
	}
	r.Log.V(1).Info("cgroup of the init process not usable; using the runtime's", "container", c.ID, "pid", c.PID, "reason", err.Error())
	return c.CgroupDir
}

// trackLocked records a running container whose cgroup is dir.
func (r *Reconciler) trackLocked(c runtime.Container, dir string) *tracked {
	t := &tracked{c: c, dir: dir}
	r.containers[c.ID] = t
	if r.byPod[c.PodUID] == nil {
		r.byPod[c.PodUID] = map[string]bool{}
	}
	r.byPod[c.PodUID][c.ID] = true
	return t
}

func (r *Reconciler) untrackLocked(id string) {
	t, ok := r.containers[id]
	if !ok {
		return
	}
	delete(r.containers, id)
	if ids := r.byPod[t.c.PodUID]; ids != nil {
		delete(ids, id)
		if len(ids) == 0 {
			delete(r.byPod, t.c.PodUID)
		}
	}
}

func (r *Reconciler) forget(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgetLocked(id)
}

// forgetLocked drops a container that is gone, with its metrics.
func (r *Reconciler) forgetLocked(id string) {
	if t, ok := r.containers[id]; ok {
		r.Metrics.deleteContainer(t.c)
		if len(r.byPod[t.c.PodUID]) == 1 {
			delete(r.invalid, t.c.PodUID)
		}
	}
	r.untrackLocked(id)
	delete(r.since, id)
	delete(r.eventPID, id)
}

func (r *Reconciler) event(pod *corev1.Pod, kind, reason, format string, args ...any) {
	if r.Recorder == nil {
		return
	}
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
	r.Recorder.Eventf(ref, kind, reason, format, args...)
}

// nodeEvent records an Event on this node, as the kubelet refers to it
// (the node's name as its UID).
func (r *Reconciler) nodeEvent(kind, reason, format string, args ...any) {
	if r.Recorder == nil || r.Node == "" {
		return
	}
	ref := &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: r.Node, UID: types.UID(r.Node)}
	r.Recorder.Eventf(ref, kind, reason, format, args...)
}
