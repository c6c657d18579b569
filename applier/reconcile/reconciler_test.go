package reconcile

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

var vda = device.Device{Major: 254, Minor: 0}

// fakeRuntime is an in-memory runtime whose event stream the test drives.
type fakeRuntime struct {
	mu         sync.Mutex
	containers map[string]runtime.Container
	events     chan runtime.Event
	breaks     chan error    // a value breaks the current Watch with that error
	broken     chan struct{} // signalled when a Watch returned because of breaks
	watches    int
	inspected  int // calls of Container and Identify
}

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{containers: map[string]runtime.Container{}, events: make(chan runtime.Event, 64), breaks: make(chan error, 1), broken: make(chan struct{}, 1)}
}

func (f *fakeRuntime) Name() string { return "fake" }
func (f *fakeRuntime) Close() error { return nil }

func (f *fakeRuntime) List(context.Context) ([]runtime.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []runtime.Container
	for _, c := range f.containers {
		if c.PID > 0 && c.PodUID != "" { // as the real runtimes: Kubernetes containers only
			out = append(out, c)
		}
	}
	return out, nil
}

func (f *fakeRuntime) Container(_ context.Context, id string) (runtime.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inspected++
	c, ok := f.containers[id]
	if !ok {
		return c, runtime.ErrNotFound
	}
	if c.PodUID == "" {
		return c, runtime.ErrNotKubernetes
	}
	return c, nil
}

func (f *fakeRuntime) Identify(ctx context.Context, id string) (runtime.Container, error) {
	c, err := f.Container(ctx, id)
	c.PID = 0
	return c, err
}

func (f *fakeRuntime) Watch(ctx context.Context, subscribed func(), handle func(runtime.Event)) error {
	f.mu.Lock()
	f.watches++
	f.mu.Unlock()
	subscribed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-f.breaks:
			f.broken <- struct{}{}
			return err
		case ev := <-f.events:
			handle(ev)
		}
	}
}

func (f *fakeRuntime) set(c runtime.Container) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.containers[c.ID] = c
}

// fakePods is a Pods over a map the test changes.
type fakePods struct {
	mu   sync.Mutex
	pods map[string]*corev1.Pod
}

func (p *fakePods) Pod(uid string) (*corev1.Pod, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pod, ok := p.pods[uid]
	return pod, ok
}

func (p *fakePods) set(pod *corev1.Pod) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[string(pod.UID)] = pod
}

type fixture struct {
	t    *testing.T
	h    *cgroup.Hierarchy
	rt   *fakeRuntime
	pods *fakePods
	rec  *record.FakeRecorder
	r    *Reconciler
}

// newFixture makes a cgroup v2 root in a temporary directory with a kubepods
// cgroup, and a reconciler over a fake runtime and fake pods, with a node
// cap (DATA_TOTAL_IOPS) of 3000.
func newFixture(t *testing.T) *fixture { return newFixtureCap(t, 3000, "") }

// newFixtureCap is newFixture with a node cap of totalIOPS and kubepods's
// io.max holding kubepodsIOMax before the reconciler starts.
func newFixtureCap(t *testing.T, totalIOPS uint64, kubepodsIOMax string) *fixture {
	return newFixtureWith(t, totalIOPS, kubepodsIOMax, nil)
}

// newFixtureWith is newFixtureCap with the reconciler's Config changed by
// configure (nil: as it is) before it starts.
func newFixtureWith(t *testing.T, totalIOPS uint64, kubepodsIOMax string, configure func(*Config)) *fixture {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "cgroup.controllers"), "cpu io memory\n")
	mkCgroup(t, filepath.Join(root, "kubepods"))
	writeFile(t, filepath.Join(root, "kubepods", "io.max"), kubepodsIOMax)
	h, err := cgroup.Open(root, cgroup.V2)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, h: h, rt: newFakeRuntime(), pods: &fakePods{pods: map[string]*corev1.Pod{}}, rec: record.NewFakeRecorder(100)}
	cfg := Config{
		Runtime: f.rt, Cgroups: h, Disk: fixedDisk(vda), ProcRoot: t.TempDir(), Pods: f.pods,
		Recorder: f.rec, TotalIOPS: totalIOPS, Interval: time.Hour, Log: testr.New(t),
	}
	if configure != nil {
		configure(&cfg)
	}
	f.r = New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return f
}

// fixedDisk is a data disk of devs that never changes.
func fixedDisk(devs ...device.Device) func() (device.DataDisk, error) {
	return func() (device.DataDisk, error) { return device.DataDisk{Devices: devs, Source: "/data"}, nil }
}

func mkCgroup(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "io.max"), "")
	writeFile(t, filepath.Join(dir, "io.stat"), "")
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// container makes a running container of pod uid with its cgroup.
func (f *fixture) container(id, uid, name string, pid int) runtime.Container {
	dir := f.h.Join(fmt.Sprintf("/kubepods/besteffort/pod%s/%s", uid, id))
	mkCgroup(f.t, dir)
	c := runtime.Container{ID: id, PodUID: uid, PodNamespace: "team-a", PodName: "pod-" + uid, Name: name, PID: pid, CgroupDir: dir}
	f.rt.set(c)
	return c
}

// start makes a running container of pod uid, as container does, and sends
// its start event.
func (f *fixture) start(id, uid, name string, pid int) runtime.Container {
	c := f.container(id, uid, name, pid)
	f.rt.events <- runtime.Event{Kind: runtime.Started, ContainerID: id, PID: pid}
	return c
}

func pod(uid string, resolved limits.Resolved) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "pod-" + uid, Namespace: "team-a", UID: types.UID(uid)}}
	if resolved != nil {
		p.Annotations = map[string]string{limits.ResolvedAnnotation: resolved.Encode()}
	}
	return p
}

// eventually waits for the io.max of dir to hold want.
func (f *fixture) eventually(dir string, want limits.Limits) {
	f.t.Helper()
	var got map[device.Device]limits.Limits
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if got, err = f.h.Read(dir); err == nil && got[vda] == want {
			return
		}
	}
	f.t.Fatalf("%s holds %v (%v), want %v", dir, got[vda], err, want)
}

func TestReconciler(t *testing.T) {
	l500 := limits.Limits{ReadIOPS: 500, WriteIOPS: 500}
	l100 := limits.Limits{ReadIOPS: 100, WriteIOPS: 50, WriteBPS: 1 << 20}

	t.Run("applies a started container's limits from its pod's annotation", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.eventually(c.CgroupDir, l500)
		if e := <-f.rec.Events; !strings.Contains(e, "IOLimitsApplied") || !strings.Contains(e, "container app") {
			t.Fatalf("event = %q", e)
		}
	})

	t.Run("inspects a container at most once for its task create and task start", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10) // containerd's /tasks/create
		f.eventually(c.CgroupDir, l500)
		f.rt.events <- runtime.Event{Kind: runtime.Started, ContainerID: "c1", PID: 10} // its /tasks/start
		time.Sleep(50 * time.Millisecond)
		f.rt.mu.Lock()
		defer f.rt.mu.Unlock()
		if f.rt.inspected > 1 {
			t.Fatalf("the runtime was asked about the container %d times, want at most once", f.rt.inspected)
		}
	})

	t.Run("changes running containers live when the pod's annotation changes", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500, "side": l500}))
		app := f.start("c1", "u1", "app", 10)
		side := f.start("c2", "u1", "side", 11)
		f.eventually(app.CgroupDir, l500)
		f.eventually(side.CgroupDir, l500)

		f.pods.set(pod("u1", limits.Resolved{"app": l100}))
		f.r.PodChanged("u1")
		f.eventually(app.CgroupDir, l100)
		f.eventually(side.CgroupDir, limits.Limits{}) // its entry disappeared: cleared
	})

	t.Run("applies once a pod it did not know yet appears", func(t *testing.T) {
		f := newFixture(t)
		c := f.start("c1", "u1", "app", 10)
		time.Sleep(50 * time.Millisecond)
		if got, _ := f.h.Read(c.CgroupDir); got[vda] != (limits.Limits{}) {
			t.Fatalf("limits %v written before the pod was known", got[vda])
		}
		f.pods.set(pod("u1", limits.Resolved{"app": l100}))
		f.r.PodChanged("u1")
		f.eventually(c.CgroupDir, l100)
	})

	t.Run("keeps limits and warns once when the annotation does not decode", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.eventually(c.CgroupDir, l500)
		<-f.rec.Events
		bad := pod("u1", nil)
		bad.Annotations = map[string]string{limits.ResolvedAnnotation: "{not json"}
		f.pods.set(bad)
		f.r.PodChanged("u1")
		f.r.PodChanged("u1")
		if e := <-f.rec.Events; !strings.Contains(e, "IOLimitsInvalid") {
			t.Fatalf("event = %q", e)
		}
		time.Sleep(50 * time.Millisecond)
		select {
		case e := <-f.rec.Events:
			t.Fatalf("second event %q for the same bad value", e)
		default:
		}
		f.eventually(c.CgroupDir, l500)
	})

	t.Run("limits a restarted container's new process again", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.eventually(c.CgroupDir, l500)
		// The kernel removed the old cgroup; the restart made a fresh one.
		f.rt.events <- runtime.Event{Kind: runtime.Exited, ContainerID: "c1"}
		writeFile(t, filepath.Join(c.CgroupDir, "io.max"), "")
		c.PID = 20
		f.rt.set(c)
		f.rt.events <- runtime.Event{Kind: runtime.Started, ContainerID: "c1", PID: 20}
		f.eventually(c.CgroupDir, l500)
	})

	t.Run("finds containers whose events were missed on the next full reconcile", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l100}))
		c := f.container("c1", "u1", "app", 10) // no event
		f.r.requestFull(TriggerInterval)        // what CHECK_INTERVAL does
		f.eventually(c.CgroupDir, l100)
	})

	t.Run("reconnects after the event stream breaks and reconciles everything", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l100}))
		f.waitSynced()
		f.rt.breaks <- errors.New("connection reset")
		<-f.rt.broken
		// Started while disconnected (the reconnect waits at least 160 ms):
		// no event will tell; only the reconnect's full reconcile can.
		c := f.container("c1", "u1", "app", 10)
		f.eventually(c.CgroupDir, l100)
		f.rt.mu.Lock()
		watches := f.rt.watches
		f.rt.mu.Unlock()
		if watches < 2 {
			t.Fatalf("Watch called %d times, want a reconnect", watches)
		}
	})

	t.Run("ignores sandboxes and containers that are not Kubernetes'", func(t *testing.T) {
		f := newFixture(t)
		f.rt.set(runtime.Container{ID: "x", PID: 5}) // no pod labels
		f.rt.events <- runtime.Event{Kind: runtime.Started, ContainerID: "x", PID: 5}
		f.rt.events <- runtime.Event{Kind: runtime.Started, ContainerID: "missing", PID: 6}
		time.Sleep(50 * time.Millisecond)
		f.r.mu.Lock()
		defer f.r.mu.Unlock()
		if len(f.r.containers) != 0 {
			t.Fatalf("tracked %v", f.r.containers)
		}
	})

	t.Run("caps all pods together on the kubepods cgroup", func(t *testing.T) {
		f := newFixture(t)
		f.eventually(f.h.Join("/kubepods"), limits.Limits{ReadIOPS: 3000, WriteIOPS: 3000})
		f.waitSynced() // the cap is written just before the pass completes
	})

	t.Run("clears a node cap written before when DATA_TOTAL_IOPS is 0", func(t *testing.T) {
		f := newFixtureCap(t, 0, fmt.Sprintf("%d:%d rbps=max wbps=max riops=3000 wiops=3000\n", vda.Major, vda.Minor))
		f.eventually(f.h.Join("/kubepods"), limits.Limits{})
	})

	t.Run("uses the cgroup of the init process over the runtime's", func(t *testing.T) {
		f := newFixture(t)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		real := f.h.Join("/kubepods/elsewhere/c1")
		mkCgroup(t, real)
		procDir := filepath.Join(f.r.ProcRoot, "42")
		if err := os.MkdirAll(procDir, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(procDir, "cgroup"), "0::/kubepods/elsewhere/c1\n")
		c := f.start("c1", "u1", "app", 42)
		f.eventually(real, l500)
		if got, _ := f.h.Read(c.CgroupDir); got[vda] != (limits.Limits{}) {
			t.Fatalf("the runtime's cgroup got %v", got[vda])
		}
	})
}
