package app_test

// Benchmarks of the applier on a real containerd (each of
// runtimetest.Containerds, in the same run: Debian's 1.6 and 2.x), a real
// kube-apiserver and the blkio throttle. Run them once each (make
// bench-applier):
//
//	CI=true KUBEBUILDER_ASSETS=$PWD/.cache/bin/k8s-v1.36.3 \
//	  KDG_CONTAINERD2_DIR=$PWD/.cache/bin/containerd-v2.4.2 \
//	  go test -run '^$' -bench . -benchtime 1x -timeout 20m ./applier/app/

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/typeurl/v2"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// taskEvents records when containerd published each container's
// /tasks/create and /tasks/start, from the timestamps the events carry.
type taskEvents struct {
	mu            sync.Mutex
	create, start map[string]time.Time
}

func watchTasks(b *testing.B, d *runtimetest.Containerd) *taskEvents {
	ctx, cancel := context.WithCancel(k8sCtx())
	b.Cleanup(cancel)
	te := &taskEvents{create: map[string]time.Time{}, start: map[string]time.Time{}}
	envs, errs := d.Client.Subscribe(ctx, `topic=="/tasks/create"`, `topic=="/tasks/start"`)
	go func() {
		for {
			select {
			case <-errs:
				return
			case env := <-envs:
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				te.mu.Lock()
				switch e := v.(type) {
				case *eventstypes.TaskCreate:
					te.create[e.ContainerID] = env.Timestamp
				case *eventstypes.TaskStart:
					te.start[e.ContainerID] = env.Timestamp
				}
				te.mu.Unlock()
			}
		}
	}()
	time.Sleep(200 * time.Millisecond) // containerd registers the subscription
	return te
}

func (te *taskEvents) wait(id string) (created, started time.Time, err error) {
	for range 500 {
		te.mu.Lock()
		created, started = te.create[id], te.start[id]
		te.mu.Unlock()
		if !created.IsZero() && !started.IsZero() {
			return created, started, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return created, started, fmt.Errorf("no /tasks/create and /tasks/start events for %s", id)
}

// landing is when a limit appeared in a cgroup file, and the IOs the
// cgroup had completed at that moment.
type landing struct {
	at  time.Time
	ios uint64
	err error
}

// watchLimit polls, every 100µs, the cgroup's read IOPS file until it
// holds want, then reads the cgroup's completed IOs.
func watchLimit(dk *disk, dir string, want uint64, timeout time.Duration) <-chan landing {
	out := make(chan landing, 1)
	line := fmt.Sprintf("%s %d", dk.dev, want)
	path := filepath.Join(dir, cgroup.V1File(limits.ReadIOPS))
	go func() {
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			b, err := os.ReadFile(path)
			if err != nil || !strings.Contains(string(b), line) {
				// Not a busy loop: on 2 cores it would starve the applier.
				time.Sleep(100 * time.Microsecond)
				continue
			}
			at := time.Now()
			st, err := dk.h.Stats(dir, []device.Device{dk.dev})
			s := st[dk.dev]
			out <- landing{at: at, ios: s.ReadIOs + s.WriteIOs, err: err}
			return
		}
		out <- landing{err: fmt.Errorf("%s: no %q within %s", path, line, timeout)}
	}()
	return out
}

// reactionRig is what the reaction benchmarks start with: a data disk with
// a 32 MiB file the containers read, their root filesystem, an applier
// limiting that disk on d with the periodic pass off, containerd's task
// events watched, and n pods on the node stamped read-iops=100 for a
// container "app".
func reactionRig(b *testing.B, d *runtimetest.Containerd, n int) (*disk, string, *applier, *taskEvents, []kpod) {
	p := controlPlane(b)
	dk := newDisk(b)
	rootfs := runtimetest.Rootfs(b, d.Dir())
	ns := p.namespace(b)
	dk.file(b, "data", 32<<20)
	a := startApplier(b, p, append(containerdArgs(d, noInterval), "--data-devices", dk.dev.String())...)
	a.waitReady(b, 30*time.Second)
	te := watchTasks(b, d)
	var pods []kpod
	for i := range n {
		pods = append(pods, onNode(b, d, p.createPod(b, ns, fmt.Sprintf("p%d", i), limits.Resolved{"app": {ReadIOPS: 100}}, "app")))
	}
	return dk, rootfs, a, te, pods
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkReaction starts 100 containers that read with 4 KiB direct IO
// from their first instant, each in a pod stamped read-iops=100, and
// measures the time from containerd's /tasks/create and /tasks/start events
// (their timestamps) to the limit appearing in the container's cgroup, and
// the IOs the container completed before it did. The periodic full pass is
// off (noInterval) and checked not to have run: every limit came from an
// event.
func BenchmarkReaction(b *testing.B) {
	runtimetest.EachContainerd(b, benchmarkReaction)
}

func benchmarkReaction(b *testing.B, d *runtimetest.Containerd) {
	const n = 100
	dk, rootfs, a, te, pods := reactionRig(b, d, n)
	time.Sleep(time.Second) // the applier's informer has the pods

	ctx := k8sCtx()
	b.ResetTimer()
	for range b.N {
		var fromCreate, fromStart []time.Duration
		zero, maxIOs := 0, uint64(0)
		for i := range n {
			c := run(b, d, dk, rootfs, pods[i], "app", readLoop("data"), false)
			landed := watchLimit(dk, c.dir, 100, 5*time.Second)
			task, err := c.NewTask(ctx, cio.NullIO)
			if err != nil {
				b.Fatal(err)
			}
			if err := task.Start(ctx); err != nil {
				b.Fatal(err)
			}
			l := <-landed
			if l.err != nil {
				b.Fatal(l.err)
			}
			created, started, err := te.wait(c.ID())
			if err != nil {
				b.Fatal(err)
			}
			fromCreate = append(fromCreate, l.at.Sub(created))
			fromStart = append(fromStart, l.at.Sub(started))
			if l.ios == 0 {
				zero++
			}
			maxIOs = max(maxIOs, l.ios)
			if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
				b.Fatal(err)
			}
		}
		slices.Sort(fromCreate)
		slices.Sort(fromStart)
		b.ReportMetric(ms(percentile(fromCreate, .5)), "p50-from-task-create-ms")
		b.ReportMetric(ms(percentile(fromCreate, .99)), "p99-from-task-create-ms")
		b.ReportMetric(ms(percentile(fromStart, .5)), "p50-from-task-start-ms")
		b.ReportMetric(ms(percentile(fromStart, .99)), "p99-from-task-start-ms")
		b.ReportMetric(100*float64(zero)/n, "%-starts-with-0-IOs-before-limit")
		b.ReportMetric(float64(maxIOs), "max-IOs-before-limit")
		b.Logf("from /tasks/create: min %s p50 %s p99 %s max %s", fromCreate[0], percentile(fromCreate, .5), percentile(fromCreate, .99), fromCreate[n-1])
		b.Logf("from /tasks/start: min %s p50 %s p99 %s max %s", fromStart[0], percentile(fromStart, .5), percentile(fromStart, .99), fromStart[n-1])
	}
	b.StopTimer()
	m := a.scrape(b)
	count, sum := sample(m, "kubediskguard_applier_apply_latency_seconds_count"), sample(m, "kubediskguard_applier_apply_latency_seconds_sum")
	le := func(bound string) float64 {
		return sample(m, "kubediskguard_applier_apply_latency_seconds_bucket", "le", bound)
	}
	b.Logf("applier's own histogram (start event handled → written): count %v, mean %.3f ms, ≤1ms %v, ≤2ms %v, ≤5ms %v, ≤10ms %v",
		count, 1000*sum/max(count, 1), le("0.001"), le("0.002"), le("0.005"), le("0.01"))
	a.noPeriodicPass(b)
}

// BenchmarkStartupReconcile runs 200 containers (busybox sleep) of stamped
// pods, then starts the applier and measures the time until every one of
// their cgroups holds its limits: in the test process (app.Run), then, with
// the limits cleared, as the built binary, whose resident memory and idle
// CPU time (CHECK_INTERVAL=30) it then measures.
func BenchmarkStartupReconcile(b *testing.B) {
	runtimetest.EachContainerd(b, benchmarkStartupReconcile)
}

func benchmarkStartupReconcile(b *testing.B, d *runtimetest.Containerd) {
	const n = 200
	p := controlPlane(b)
	dk := newDisk(b)
	rootfs := runtimetest.Rootfs(b, d.Dir())
	ns := p.namespace(b)
	bin := buildApplier(b)

	want := func(i int) uint64 { return uint64(100 + i) }
	dirs := make([]string, n)
	var pods []kpod
	for i := range n {
		pods = append(pods, onNode(b, d, p.createPod(b, ns, fmt.Sprintf("p%d", i), limits.Resolved{"app": {ReadIOPS: want(i)}}, "app")))
	}
	made := time.Now()
	var wg sync.WaitGroup
	work := make(chan int)
	for range 4 {
		wg.Go(func() {
			for i := range work {
				dirs[i] = run(b, d, dk, rootfs, pods[i], "app", nil, true).dir
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	b.Logf("%d containers running in %s", n, time.Since(made).Round(time.Millisecond))

	allLimited := func(timeout time.Duration) error {
		deadline := time.Now().Add(timeout)
		next := 0
		for next < n {
			line, err := dk.throttle(dirs[next], limits.ReadIOPS)
			if err == nil && line == fmt.Sprintf("%s %d", dk.dev, want(next)) {
				next++
				continue
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("container %d not limited within %s: %q %v", next, timeout, line, err)
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	args := append(containerdArgs(d, "30"), "--data-devices", dk.dev.String())

	b.ResetTimer()
	for range b.N {
		a := startApplier(b, p, args...)
		if err := allLimited(30 * time.Second); err != nil {
			b.Fatal(err)
		}
		took := time.Since(a.started)
		b.ReportMetric(ms(took), "in-process-all-limited-ms")
		b.Logf("app.Run: all %d containers limited %s after it started", n, took.Round(time.Millisecond))
		a.stop(b)
	}
	b.StopTimer()

	for _, dir := range dirs {
		if _, err := dk.h.Clear(dir, []device.Device{dk.dev}); err != nil {
			b.Fatal(err)
		}
	}
	metrics, probe := freeAddr(b), freeAddr(b)
	cmd := exec.Command(bin, append(args, "--kubeconfig", p.kubeconfig, "--node-name", nodeName,
		"--metrics-bind-address", metrics, "--health-probe-bind-address", probe)...)
	logf, err := os.Create(filepath.Join(b.TempDir(), "applier.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			b.Error("the applier binary did not exit within 20s of SIGTERM; killing it")
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	if err := allLimited(30 * time.Second); err != nil {
		b.Fatal(err)
	}
	took := time.Since(started)
	b.ReportMetric(ms(took), "binary-all-limited-ms")
	b.Logf("binary: all %d containers limited %s after exec", n, took.Round(time.Millisecond))
	bin0 := &applier{probe: probe, started: started, done: make(chan error, 1), stopped: true}
	bin0.waitReady(b, 10*time.Second)

	time.Sleep(5 * time.Second) // settle
	pid := cmd.Process.Pid
	rss := vmRSS(b, pid)
	cpu0 := cpuTime(b, pid)
	time.Sleep(10 * time.Second)
	idle := cpuTime(b, pid) - cpu0
	b.ReportMetric(float64(rss)/1024, "binary-VmRSS-MiB")
	b.ReportMetric(ms(idle), "binary-idle-cpu-ms-per-10s")
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "Rss") {
			b.Logf("binary: %s", strings.Join(strings.Fields(line), " "))
		}
	}
	b.Logf("binary with %d containers: VmRSS %.1f MiB; CPU time over an idle 10s (CHECK_INTERVAL=30): %s", n, float64(rss)/1024, idle)
	select {
	case <-exited:
		b.Fatalf("the applier binary exited: %v", cmd.ProcessState)
	default:
	}
}

// buildApplier builds the kubediskguard-applier binary into a temp dir.
func buildApplier(b *testing.B) string {
	b.Helper()
	out := filepath.Join(b.TempDir(), "kubediskguard-applier")
	start := time.Now()
	// Built as the Makefile and the image build it.
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "github.com/kubediskguard/kubediskguard/applier")
	if msg, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, msg)
	}
	b.Logf("built %s in %s", out, time.Since(start).Round(time.Millisecond))
	return out
}

// vmRSS returns the process's resident set size in KiB.
func vmRSS(b *testing.B, pid int) uint64 {
	b.Helper()
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatal(errors.New("no VmRSS in /proc/<pid>/status"))
	return 0
}

// cpuTime returns the user and system CPU time of the process.
func cpuTime(b *testing.B, pid int) time.Duration {
	b.Helper()
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(s), ") ")
	f := strings.Fields(rest)
	// state is field 3 of stat, utime 14 and stime 15: f[11] and f[12].
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ is 100
}
