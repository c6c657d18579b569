package app_test

// Integration tests: the applier, run by app.Run exactly as the binary runs
// it, against a real kube-apiserver and etcd (envtest), a private containerd
// (each of runtimetest.Containerds: Debian's 1.6 and 2.x, as subtests named
// by version) or dockerd, and the kernel's blkio throttle on the disk
// holding /var/tmp. Pods are made through the API with the resolved
// annotation already stamped (the webhook is proven in webhook/app);
// containers are made as the kubelet would make them, and start doing 4 KiB
// direct IO at once. Rates are measured from the containers' own cgroup
// counters. The applier's periodic full pass is set far beyond every wait
// (noInterval), and each test checks that it never ran: what a test proves
// came from events, the start or a reconnect.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/docker/docker/api/types/container"
	"k8s.io/client-go/rest"

	"github.com/kubediskguard/kubediskguard/applier/app"
	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

const (
	// measureFor is how long a rate is measured.
	measureFor = 3 * time.Second
	// burst is what the kernel may admit before a new limit bites; rates
	// are measured after it.
	burst = 500 * time.Millisecond
	// tolerance is how far above its limit a measured rate may be.
	tolerance = 1.05
	// noInterval is CHECK_INTERVAL in the tests of events, the start and
	// reconnects: an hour, far beyond their waits, so that the periodic
	// full pass can mask none of them (noPeriodicPass checks it did not run).
	noInterval = "3600"
)

// containerdArgs are the applier's settings for a private containerd.
func containerdArgs(d *runtimetest.Containerd, interval string) []string {
	return []string{
		"--container-runtime", "containerd",
		"--container-socket-path", d.Socket,
		"--containerd-namespace", "k8s.io",
		"--cgroup-root", "/sys/fs/cgroup",
		"--proc-root", "/proc",
		"--check-interval", interval,
	}
}

// TestContainerdThrottle runs, on a real containerd, a reader limited to
// 100 read IOPS, a writer limited to 100 write IOPS and a reader with no
// entry, all doing direct IO from their first instant; the applier learns
// of them from containerd's events. Then it changes the reader's limit
// live, restarts its task and replaces its container as the kubelet would,
// and removes the entries.
func TestContainerdThrottle(t *testing.T) {
	runtimetest.EachContainerd(t, testContainerdThrottle)
}

func testContainerdThrottle(t *testing.T, d *runtimetest.Containerd) {
	p := controlPlane(t)
	dk := newDisk(t)
	rootfs := runtimetest.Rootfs(t, d.Dir())
	ns := p.namespace(t)
	for _, f := range []string{"reader", "free"} {
		dk.file(t, f, 32<<20)
	}
	dk.file(t, "writer", 16<<20)

	a := startApplier(t, p, append(containerdArgs(d, noInterval), "--data-devices", dk.dev.String())...)
	t.Logf("applier ready in %s", a.waitReady(t, 30*time.Second).Round(time.Millisecond))

	reader := onNode(t, d, p.createPod(t, ns, "reader", limits.Resolved{"app": {ReadIOPS: 100}}, "app"))
	writer := onNode(t, d, p.createPod(t, ns, "writer", limits.Resolved{"app": {WriteIOPS: 100}}, "app"))
	free := onNode(t, d, p.createPod(t, ns, "free", limits.Resolved{}, "app"))

	// Started only now: the applier can only learn of them from events.
	rc := run(t, d, dk, rootfs, reader, "app", readLoop("reader"), true)
	t.Logf("reader limited %s after its task's Start returned", dk.waitThrottle(t, rc.dir, limits.ReadIOPS, 100, 5*time.Second))
	wc := run(t, d, dk, rootfs, writer, "app", writeLoop("writer"), true)
	t.Logf("writer limited %s after its task's Start returned", dk.waitThrottle(t, wc.dir, limits.WriteIOPS, 100, 5*time.Second))
	fc := run(t, d, dk, rootfs, free, "app", readLoop("free"), true)

	for _, c := range []struct {
		dir string
		dim limits.Dimension
	}{{rc.dir, limits.WriteIOPS}, {rc.dir, limits.ReadBPS}, {wc.dir, limits.ReadIOPS}, {fc.dir, limits.ReadIOPS}} {
		if line, err := dk.throttle(c.dir, c.dim); err != nil || line != "" {
			t.Errorf("%s of %s: want no limit on %s, have %q (%v)", cgroup.V1File(c.dim), c.dir, dk.dev, line, err)
		}
	}

	t.Run("throttle measured", func(t *testing.T) {
		time.Sleep(burst)
		mr, mw, mf := dk.startMeasure(t, rc.dir, true), dk.startMeasure(t, wc.dir, false), dk.startMeasure(t, fc.dir, true)
		time.Sleep(measureFor)
		r, w, f := dk.rate(t, mr), dk.rate(t, mw), dk.rate(t, mf)
		t.Logf("over %s: reader (read-iops=100) %.1f read IO/s, writer (write-iops=100) %.1f write IO/s, unlimited reader %.0f read IO/s", measureFor, r, w, f)
		dk.checkLimited(t, "reader", mr, r, 100)
		dk.checkLimited(t, "writer", mw, w, 100)
		if f < 5*100 {
			t.Errorf("unlimited reader: %.0f read IO/s, want at least 5× the limit (500)", f)
		}
	})

	t.Run("visible to users", func(t *testing.T) {
		eventually(t, 10*time.Second, func() error {
			for _, pod := range []kpod{reader, writer} {
				if !hasEvent(p.events(t, pod.Pod), "IOLimitsApplied") {
					return fmt.Errorf("no IOLimitsApplied event on pod %s/%s yet", pod.Namespace, pod.Name)
				}
			}
			return nil
		})
		for _, ev := range p.events(t, reader.Pod) {
			t.Logf("event on %s: %s %s: %s", reader.Name, ev.Type, ev.Reason, ev.Message)
		}
		if evs := p.events(t, free.Pod); hasEvent(evs, "IOLimitsApplied") {
			t.Errorf("the pod with no entry has an IOLimitsApplied event: %v", evs)
		}
		m := a.scrape(t)
		if v := sample(m, "kubediskguard_applier_limits_applied_total"); v < 2 {
			t.Errorf("kubediskguard_applier_limits_applied_total = %v, want ≥ 2", v)
		}
		if v := sample(m, "kubediskguard_applier_container_limit", "namespace", ns, "pod", "reader", "container", "app", "dimension", "read-iops"); v != 100 {
			t.Errorf("kubediskguard_applier_container_limit of reader/app read-iops = %v, want 100", v)
		}
		if v := sample(m, "kubediskguard_applier_container_limit", "namespace", ns, "pod", "writer", "container", "app", "dimension", "write-iops"); v != 100 {
			t.Errorf("kubediskguard_applier_container_limit of writer/app write-iops = %v, want 100", v)
		}
		// Observed only for containers whose start event was seen.
		if v := sample(m, "kubediskguard_applier_apply_latency_seconds_count"); v < 2 {
			t.Errorf("kubediskguard_applier_apply_latency_seconds_count = %v, want ≥ 2: the limits were not applied from start events", v)
		}
		ops := func(m map[string]float64) float64 {
			return sample(m, "kubediskguard_applier_container_io_operations_total", "namespace", ns, "pod", "reader", "container", "app", "direction", "read")
		}
		before := ops(m)
		time.Sleep(time.Second)
		after := ops(a.scrape(t))
		t.Logf("kubediskguard_applier_container_io_operations_total of reader/app read: %v → %v in 1s", before, after)
		if before <= 0 || after <= before {
			t.Errorf("kubediskguard_applier_container_io_operations_total of reader/app read: %v then %v, want it to grow", before, after)
		}
		if code, body := httpGet("http://" + a.probe + "/readyz"); code != 200 {
			t.Errorf("/readyz: %d %s", code, body)
		}
	})

	t.Run("live update", func(t *testing.T) {
		p.setLimits(t, reader.Pod, limits.Resolved{"app": {ReadIOPS: 200}})
		took := dk.waitThrottle(t, rc.dir, limits.ReadIOPS, 200, 2*time.Second)
		t.Logf("new limit in the cgroup %s after the patch", took.Round(time.Millisecond))
		time.Sleep(burst)
		m := dk.startMeasure(t, rc.dir, true)
		time.Sleep(measureFor)
		r := dk.rate(t, m)
		t.Logf("reader at read-iops=200: %.1f read IO/s", r)
		dk.checkLimited(t, "reader", m, r, 200)
	})

	t.Run("restart", func(t *testing.T) {
		ctx := k8sCtx()
		old := rc.Task.Pid()
		if _, err := rc.Task.Delete(ctx, client.WithProcessKill); err != nil {
			t.Fatal(err)
		}
		task, err := rc.NewTask(ctx, cio.NullIO)
		if err != nil {
			t.Fatal(err)
		}
		if err := task.Start(ctx); err != nil {
			t.Fatal(err)
		}
		rc.Task = task
		took := dk.waitThrottle(t, rc.dir, limits.ReadIOPS, 200, 5*time.Second)
		t.Logf("new task (pid %d, was %d) limited %s after it started", task.Pid(), old, took.Round(time.Millisecond))

		// The kubelet replaces a dead container with a new one of the same name.
		nc := run(t, d, dk, rootfs, reader, "app", readLoop("reader"), true)
		took = dk.waitThrottle(t, nc.dir, limits.ReadIOPS, 200, 5*time.Second)
		t.Logf("replacement container limited %s after it started", took.Round(time.Millisecond))
		if _, err := nc.Task.Delete(ctx, client.WithProcessKill); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("entry removed", func(t *testing.T) {
		p.setLimits(t, reader.Pod, limits.Resolved{"other": {ReadIOPS: 10}})
		p.setLimits(t, writer.Pod, nil)
		t.Logf("reader cleared %s after the patch", dk.waitThrottle(t, rc.dir, limits.ReadIOPS, 0, 2*time.Second).Round(time.Millisecond))
		t.Logf("writer cleared %s after the patch", dk.waitThrottle(t, wc.dir, limits.WriteIOPS, 0, 2*time.Second).Round(time.Millisecond))
		time.Sleep(200 * time.Millisecond)
		m := dk.startMeasure(t, rc.dir, true)
		time.Sleep(time.Second)
		if r := dk.rate(t, m); r < 500 {
			t.Errorf("reader with its entry removed: %.0f read IO/s, want ≥ 500", r)
		} else {
			t.Logf("reader with its entry removed: %.0f read IO/s", r)
		}
		if v := sample(a.scrape(t), "kubediskguard_applier_container_limit", "namespace", ns, "pod", "reader", "container", "app", "dimension", "read-iops"); v != 0 {
			t.Errorf("kubediskguard_applier_container_limit of reader/app read-iops = %v, want 0", v)
		}
	})
	a.noPeriodicPass(t)
	a.alive(t)
}

// TestContainerdReconnect limits the data disk found from --data-mount, and
// shows that containers the applier cannot have seen the events of get
// their limits: one started before the applier (the start's full pass),
// and ones started after containerd was killed and restarted, while the
// applier's event stream was still down (the reconnect's full pass). The
// containers start inside a window that the applier's backoff leaves
// (after its sixth failed attempt the next is 6.4 s away), and none of
// them may be limited through a start event or the periodic pass.
func TestContainerdReconnect(t *testing.T) {
	runtimetest.EachContainerd(t, testContainerdReconnect)
}

func testContainerdReconnect(t *testing.T, d *runtimetest.Containerd) {
	p := controlPlane(t)
	dk := newDisk(t)
	rootfs := runtimetest.Rootfs(t, d.Dir())
	ns := p.namespace(t)

	want := func(i int) limits.Limits { return limits.Limits{ReadIOPS: uint64(300 + i), WriteIOPS: uint64(400 + i)} }
	var pods []kpod
	for i := range 4 {
		pods = append(pods, onNode(t, d, p.createPod(t, ns, fmt.Sprintf("p%d", i), limits.Resolved{"app": want(i)}, "app")))
	}
	wait := func(c ctrContainer, i int, timeout time.Duration) time.Duration {
		t.Helper()
		took := dk.waitThrottle(t, c.dir, limits.ReadIOPS, want(i).ReadIOPS, timeout)
		dk.waitThrottle(t, c.dir, limits.WriteIOPS, want(i).WriteIOPS, timeout)
		return took
	}

	before := run(t, d, dk, rootfs, pods[0], "app", nil, true)
	a := startApplier(t, p, append(containerdArgs(d, noInterval), "--data-mount", dk.dir, "--data-allow-root-disk")...) // a directory on the root disk
	t.Logf("container started before the applier limited %s after the applier started", wait(before, 0, 10*time.Second).Round(time.Millisecond))
	a.waitReady(t, 10*time.Second)
	m := a.scrape(t)
	if v := sample(m, fullReconciles, "trigger", "start"); v < 1 {
		t.Errorf("%s{trigger=start} = %v, want ≥ 1", fullReconciles, v)
	}
	disconnects0 := sample(m, "kubediskguard_applier_runtime_disconnects_total")

	d.Kill(t)
	killed := time.Now()
	// The stream breaks, then reconnects fail after 0.2, 0.6, 1.4, 3 and
	// 6.2 s; the next attempt is 6.4 s after the sixth failure.
	eventually(t, 20*time.Second, func() error {
		a.alive(t)
		if n := sample(a.scrape(t), "kubediskguard_applier_runtime_disconnects_total") - disconnects0; n < 6 {
			return fmt.Errorf("%v failures of the runtime's event stream, want 6", n)
		}
		return nil
	})
	sixth := time.Now()
	t.Logf("sixth failure of the event stream %s after containerd was killed", sixth.Sub(killed).Round(time.Millisecond))
	latency0 := sample(a.scrape(t), "kubediskguard_applier_apply_latency_seconds_count")
	d.Start(t)
	restarted := time.Now()
	var after []ctrContainer
	for i := 1; i < 4; i++ {
		after = append(after, run(t, d, dk, rootfs, pods[i], "app", nil, true))
	}
	made := time.Since(sixth)
	t.Logf("containerd restarted and 3 containers started %s after the sixth failure", made.Round(time.Millisecond))
	if made > 6*time.Second {
		t.Fatalf("containerd restarted and 3 containers started %s after the sixth failure: the applier may have reconnected before, the test proves nothing", made)
	}
	for i, c := range after {
		wait(c, i+1, 20*time.Second)
		t.Logf("container %d started after the restart limited %s after containerd came back", i+1, time.Since(restarted).Round(time.Millisecond))
	}
	wait(before, 0, time.Second)
	a.alive(t)
	m = a.scrape(t)
	if v := sample(m, fullReconciles, "trigger", "reconnect"); v < 1 {
		t.Errorf("%s{trigger=reconnect} = %v, want ≥ 1", fullReconciles, v)
	}
	if v := sample(m, "kubediskguard_applier_apply_latency_seconds_count"); v != latency0 {
		t.Errorf("kubediskguard_applier_apply_latency_seconds_count went from %v to %v: containers started while the stream was down were limited from start events", latency0, v)
	}
	a.noPeriodicPass(t)
	if code, body := httpGet("http://" + a.probe + "/readyz"); code != 200 {
		t.Errorf("/readyz after the reconnect: %d %s", code, body)
	}
}

// TestDockerThrottle is the throttle measurement through a private dockerd,
// with containers labelled as cri-dockerd labels them.
func TestDockerThrottle(t *testing.T) {
	p := controlPlane(t)
	d := runtimetest.StartDockerd(t)
	dk := newDisk(t)
	ns := p.namespace(t)
	dk.file(t, "reader", 32<<20)
	dk.file(t, "free", 32<<20)

	a := startApplier(t, p,
		"--container-runtime", "docker", "--container-socket-path", d.Host,
		"--cgroup-root", "/sys/fs/cgroup", "--proc-root", "/proc", "--check-interval", noInterval,
		"--data-devices", dk.dev.String())
	a.waitReady(t, 30*time.Second)

	reader := onNode(t, d, p.createPod(t, ns, "reader", limits.Resolved{"app": {ReadIOPS: 100}}, "app"))
	free := onNode(t, d, p.createPod(t, ns, "free", limits.Resolved{}, "app"))
	start := func(pod kpod, args []string) string {
		t.Helper()
		ctx := context.Background()
		resp, err := d.Client.ContainerCreate(ctx,
			&container.Config{Image: runtimetest.Image, Cmd: args, Labels: pod.node.DockerLabels("app")},
			&container.HostConfig{NetworkMode: "none", Binds: []string{dk.dir + ":/data"},
				Resources: container.Resources{CgroupParent: pod.node.Cgroup}}, nil, nil, "")
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Client.ContainerStart(ctx, resp.ID, container.StartOptions{}); err != nil {
			t.Fatal(err)
		}
		return dk.h.Join(pod.node.Cgroup + "/" + resp.ID)
	}
	rdir := start(reader, readLoop("reader"))
	t.Logf("reader limited %s after ContainerStart returned", dk.waitThrottle(t, rdir, limits.ReadIOPS, 100, 5*time.Second))
	fdir := start(free, readLoop("free"))

	time.Sleep(burst)
	mr, mf := dk.startMeasure(t, rdir, true), dk.startMeasure(t, fdir, true)
	time.Sleep(measureFor)
	r, f := dk.rate(t, mr), dk.rate(t, mf)
	t.Logf("over %s: reader (read-iops=100) %.1f read IO/s, unlimited reader %.0f read IO/s", measureFor, r, f)
	dk.checkLimited(t, "reader", mr, r, 100)
	if f < 5*100 {
		t.Errorf("unlimited reader: %.0f read IO/s, want ≥ 500", f)
	}
	eventually(t, 10*time.Second, func() error {
		if !hasEvent(p.events(t, reader.Pod), "IOLimitsApplied") {
			return errNotYet
		}
		return nil
	})
	a.noPeriodicPass(t)
}

// TestBadSettings: a setting that cannot work stops app.Run at once, with
// an error naming it.
func TestBadSettings(t *testing.T) {
	if testing.Short() {
		t.Skip("reads the host's /proc and cgroups")
	}
	other := "v2"
	if h, err := cgroup.Open(cgroup.DefaultRoot, cgroup.Auto); err == nil && h.Version() == cgroup.V2 {
		other = "v1"
	}
	for name, tc := range map[string]struct {
		args []string
		want []string
	}{
		"a data mount that does not exist": {
			args: []string{"--data-mount", "/does/not/exist"},
			want: []string{"--data-mount", "/does/not/exist"},
		},
		"a data device that does not exist": {
			args: []string{"--data-devices", "/dev/kubediskguard-nope"},
			want: []string{"--data-devices", "/dev/kubediskguard-nope"},
		},
		"the cgroup version the host does not have": {
			args: []string{"--data-mount", "/", "--cgroup-version", other},
			want: []string{"--cgroup-version", other},
		},
		"a cgroup root without cgroups": {
			args: []string{"--data-mount", "/", "--cgroup-root", "/tmp"},
			want: []string{"--cgroup-root", "/tmp"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			all := append([]string{"--node-name", nodeName, "--metrics-bind-address", "0", "--health-probe-bind-address", "0"}, tc.args...)
			o, err := app.ParseOptions(all, noEnv)
			if err != nil {
				t.Fatalf("app.ParseOptions(%q): %v", all, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			err = app.Run(ctx, o, &rest.Config{Host: "https://127.0.0.1:1"})
			took := time.Since(start)
			if err == nil {
				t.Fatalf("app.Run returned nil after %s, want an error naming %q", took, tc.want)
			}
			t.Logf("after %s: %v", took.Round(time.Microsecond), err)
			if took > time.Second {
				t.Errorf("app.Run took %s to fail, want < 1s", took)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
	t.Run("a check interval under a second", func(t *testing.T) {
		_, err := app.ParseOptions([]string{"--node-name", nodeName, "--check-interval", "0"}, noEnv)
		if err == nil || !strings.Contains(err.Error(), "--check-interval") {
			t.Fatalf("app.ParseOptions: %v, want an error naming --check-interval", err)
		}
	})
}
