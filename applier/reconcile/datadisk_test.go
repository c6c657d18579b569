package reconcile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/client-go/tools/record"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

var vdb = device.Device{Major: 254, Minor: 16}

// mountable is a data disk the test mounts and unmounts.
type mountable struct {
	mu   sync.Mutex
	disk device.DataDisk
	err  error
}

func (m *mountable) resolve() (device.DataDisk, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.disk, m.err
}

func (m *mountable) mount(devs ...device.Device) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.disk, m.err = device.DataDisk{Devices: devs, Source: "/data"}, nil
}

func (m *mountable) unmount() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.disk, m.err = device.DataDisk{}, fmt.Errorf("%w: /data is not a mount point", device.ErrNoDataDisk)
}

// eventuallyOn waits for the io.max of dir to hold want for dev.
func (f *fixture) eventuallyOn(dir string, dev device.Device, want limits.Limits) {
	f.t.Helper()
	var got map[device.Device]limits.Limits
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if got, err = f.h.Read(dir); err == nil && got[dev] == want {
			return
		}
	}
	f.t.Fatalf("%s holds %v for %s (%v), want %v", dir, got[dev], dev, err, want)
}

// waitSynced waits for the first full reconcile to be done and its worker
// off it: Synced is set inside the pass, the worker leaves the item just
// after it returns.
func (f *fixture) waitSynced() {
	f.t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !f.r.Synced() || f.onFullPass(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			f.t.Fatal("no full reconcile within 5s")
		}
	}
}

// onFullPass reports whether a worker is on a full reconcile.
func (f *fixture) onFullPass() bool {
	f.r.progress.mu.Lock()
	defer f.r.progress.mu.Unlock()
	for _, it := range f.r.progress.busy {
		if it.key == fullKey {
			return true
		}
	}
	return false
}

func TestDataDiskChanges(t *testing.T) {
	l500 := limits.Limits{ReadIOPS: 500, WriteIOPS: 500}
	cap3000 := limits.Limits{ReadIOPS: 3000, WriteIOPS: 3000}
	newWithDisk := func(t *testing.T, m *mountable) *fixture {
		return newFixtureWith(t, 3000, "", func(c *Config) { c.Disk = m.resolve })
	}
	// limitedOnVda: a running container limited to l500 and the node cap
	// on the data disk vda.
	limitedOnVda := func(t *testing.T) (*mountable, *fixture, runtime.Container) {
		m := &mountable{}
		m.mount(vda)
		f := newWithDisk(t, m)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.eventually(c.CgroupDir, l500)
		f.eventually(f.h.Join("/kubepods"), cap3000)
		return m, f, c
	}

	t.Run("limits nothing while there is no data disk, and says why it is not ready", func(t *testing.T) {
		m := &mountable{}
		m.unmount()
		f := newWithDisk(t, m)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.waitSynced()
		time.Sleep(50 * time.Millisecond)
		for _, dir := range []string{c.CgroupDir, f.h.Join("/kubepods")} {
			if b, _ := os.ReadFile(filepath.Join(dir, "io.max")); len(b) != 0 {
				t.Errorf("%s/io.max = %q with no data disk, want nothing written", dir, b)
			}
		}
		err := f.r.Ready()
		if err == nil || !strings.Contains(err.Error(), "waiting for the data disk") || !strings.Contains(err.Error(), "/data is not a mount point") {
			t.Errorf("Ready() = %v, want it to say it waits for the data disk and why", err)
		}
		select {
		case e := <-f.rec.Events:
			t.Errorf("event %q with no data disk", e)
		default:
		}
	})

	t.Run("limits running containers and the node cap once the disk is mounted", func(t *testing.T) {
		m := &mountable{}
		m.unmount()
		f := newWithDisk(t, m)
		f.pods.set(pod("u1", limits.Resolved{"app": l500}))
		c := f.start("c1", "u1", "app", 10)
		f.waitSynced()
		m.mount(vda)
		f.r.DiskChanged() // what the mount watch does
		f.eventually(c.CgroupDir, l500)
		f.eventually(f.h.Join("/kubepods"), cap3000)
		if err := f.r.Ready(); err != nil {
			t.Errorf("Ready() = %v once the disk is there", err)
		}
		if e := <-f.rec.Events; !strings.Contains(e, "IOLimitsApplied") || !strings.Contains(e, "on 254:0 (/data)") {
			t.Errorf("event %q, want IOLimitsApplied naming the device and the mount", e)
		}
	})

	t.Run("moves every limit to the new disk when another disk is mounted", func(t *testing.T) {
		m, f, c := limitedOnVda(t)
		m.mount(vdb)
		f.r.DiskChanged()
		for _, w := range []struct {
			dir  string
			want limits.Limits
		}{{c.CgroupDir, l500}, {f.h.Join("/kubepods"), cap3000}} {
			f.eventuallyOn(w.dir, vdb, w.want)
			f.eventuallyOn(w.dir, vda, limits.Limits{})
		}
		if got := f.r.DataDisk().String(); got != "254:16 (/data)" {
			t.Errorf("DataDisk() = %s, want 254:16 (/data)", got)
		}
	})

	t.Run("clears every limit when the disk is unmounted, and is not ready", func(t *testing.T) {
		m, f, c := limitedOnVda(t)
		m.unmount()
		f.r.DiskChanged()
		f.eventually(c.CgroupDir, limits.Limits{})
		f.eventually(f.h.Join("/kubepods"), limits.Limits{})
		if err := f.r.Ready(); err == nil {
			t.Error("Ready() = nil with the data disk gone")
		}
		// Mounted again: limited again.
		m.mount(vda)
		f.r.DiskChanged()
		f.eventually(c.CgroupDir, l500)
	})

	t.Run("finds a disk change at the periodic full pass without a mount notification", func(t *testing.T) {
		m, f, c := limitedOnVda(t)
		m.mount(vdb)
		f.r.queue.Add(fullKey) // what CHECK_INTERVAL does
		f.eventuallyOn(c.CgroupDir, vdb, l500)
		f.eventuallyOn(c.CgroupDir, vda, limits.Limits{})
	})

	t.Run("does nothing on a mount change that leaves the data disk as it is", func(t *testing.T) {
		m := &mountable{}
		m.mount(vda)
		f := newWithDisk(t, m)
		f.waitSynced()
		f.rt.mu.Lock()
		f.rt.containers = nil // a full reconcile would fail to list: none must run
		f.rt.mu.Unlock()
		if f.r.refreshDisk() {
			t.Error("refreshDisk reported a change for the same disk")
		}
	})
}

func TestNodeCapFailure(t *testing.T) {
	l500 := limits.Limits{ReadIOPS: 500, WriteIOPS: 500}
	reg := prometheus.NewRegistry()
	metrics, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixtureWith(t, 3000, "", func(c *Config) {
		c.Metrics, c.Node = metrics, "node-1"
		c.Recorder.(*record.FakeRecorder).IncludeObject = true
		// A kubepods io.max that cannot be written (a directory in its place).
		file := c.Cgroups.Join("/kubepods/io.max")
		if err := os.Remove(file); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(file, 0o755); err != nil {
			t.Fatal(err)
		}
	})
	f.pods.set(pod("u1", limits.Resolved{"app": l500}))
	c := f.start("c1", "u1", "app", 10)
	f.eventually(c.CgroupDir, l500)
	f.waitSynced()
	if err := f.r.Ready(); err != nil {
		t.Errorf("Ready() = %v: a node cap that cannot be written must not block readiness", err)
	}
	f.r.queue.Add(fullKey) // a second pass fails the same way
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(metrics.capFailed) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := testutil.ToFloat64(metrics.capFailed); got < 2 {
		t.Fatalf("kubediskguard_applier_node_cap_failures_total = %v after two failing passes, want 2", got)
	}
	var capEvents []string
	for len(f.rec.Events) > 0 {
		if e := <-f.rec.Events; strings.Contains(e, "NodeIOCapFailed") {
			capEvents = append(capEvents, e)
		}
	}
	if len(capEvents) != 1 || !strings.Contains(capEvents[0], "DATA_TOTAL_IOPS=3000") || !strings.Contains(capEvents[0], "254:0 (/data)") ||
		!strings.Contains(capEvents[0], "kind=Node") {
		t.Errorf("NodeIOCapFailed events %q, want exactly one, on the Node, naming the cap and the device", capEvents)
	}
}
