package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
)

// testDataTotalIOPS: DATA_TOTAL_IOPS on the node. The applier, restarted
// with DATA_TOTAL_IOPS=N, writes N for the data disk on the kubepods cgroup
// the kubelet made (the node's layout says where), and logs at start what the
// cap covers (all pods, kube-system included). What that cap does depends on
// the cgroup version, and is measured with the free pod below kubepods (not
// limited itself), while Throttle's other pods run too:
//   - cgroup v1: the applier logs at start that the cap does not hold the
//     pods below kubepods, and it does not: the v1 blkio throttle is flat, so
//     the free pod does far more than N;
//   - cgroup v2: the throttle is hierarchical, the applier logs no such
//     notice, and the free pod stays within N.
//
// Restarted with DATA_TOTAL_IOPS=0, it clears the cap and leaves the
// containers' own limits alone; restarted with the setting gone after a cap
// was set, the default (0: off) clears it again.
func (e *env) testDataTotalIOPS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(4*time.Minute))
	defer cancel()
	t.Cleanup(func() { e.restoreApplier(t) })
	layout := e.c.Node.Layout()
	restart := func(extra ...string) {
		t.Helper()
		if err := e.restartApplier(ctx, extra...); err != nil {
			t.Fatal(err)
		}
	}
	waitCap := func(iops uint64) time.Time { t.Helper(); return e.waitNodeCap(ctx, t, iops) }

	restart(fmt.Sprintf("DATA_TOTAL_IOPS=%d", e.f.totalIOPS))
	since := waitCap(uint64(e.f.totalIOPS))
	log := e.applierLog(ctx, t)
	n, noticed := v1Notice(log)
	switch {
	case layout.Cgroup == cgroup.V1 && !noticed:
		t.Errorf("the applier did not log that on cgroup v1 DATA_TOTAL_IOPS does not cap the pods below kubepods; its log:\n%s", tail(log, 20))
	case layout.Cgroup == cgroup.V1 && n.DataTotalIOPS != uint64(e.f.totalIOPS):
		t.Errorf("the applier's cgroup v1 notice names dataTotalIOPS %d, want %d: %s", n.DataTotalIOPS, e.f.totalIOPS, n.Msg)
	case layout.Cgroup == cgroup.V1:
		t.Logf("the applier logged: %s (dataTotalIOPS %d)", n.Msg, n.DataTotalIOPS)
	case noticed:
		t.Errorf("on cgroup %s the applier logs the cgroup v1 notice: %s", layout.Cgroup, n.Msg)
	}
	if n, ok := findLog(log, "DATA_TOTAL_IOPS is set", "kube-system"); !ok || n.DataTotalIOPS != uint64(e.f.totalIOPS) {
		t.Errorf("the applier did not log at start that DATA_TOTAL_IOPS=%d caps all pods, kube-system included (found %v: %+v); its log:\n%s", e.f.totalIOPS, ok, n, tail(log, 20))
	}
	// What the notice says (or, on v2, that the cap holds): a pod below
	// kubepods, not limited itself.
	free := e.pod(ctx, t, notOptedIn, "free")
	r, err := e.nextRun(ctx, free, "app", since)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s/free app with kubepods capped at %d: read %.1f write %.1f IOPS", notOptedIn, e.f.totalIOPS, r.ReadIOPS, r.WriteIOPS)
	if layout.Cgroup == cgroup.V1 {
		if r.ReadIOPS < float64(2*e.f.totalIOPS) || r.WriteIOPS < float64(2*e.f.totalIOPS) {
			t.Errorf("%s/free app: read %.1f write %.1f IOPS with kubepods capped at %d, want both above %d: the cap held a pod below kubepods on cgroup v1, contrary to what the applier logs and the README says",
				notOptedIn, r.ReadIOPS, r.WriteIOPS, e.f.totalIOPS, 2*e.f.totalIOPS)
		}
	} else if limit := float64(e.f.totalIOPS) * (1 + v2Overshoot); r.ReadIOPS > limit || r.WriteIOPS > limit {
		t.Errorf("%s/free app: read %.1f write %.1f IOPS with kubepods capped at %d on cgroup %s, want both at most %.0f: the cap does not hold the pods below kubepods",
			notOptedIn, r.ReadIOPS, r.WriteIOPS, e.f.totalIOPS, layout.Cgroup, limit)
	}

	e.checkPodsTogether(ctx, t, free, e.pod(ctx, t, optedIn, "limited"))

	restart("DATA_TOTAL_IOPS=0")
	waitCap(0)
	if n, ok := v1Notice(e.applierLog(ctx, t)); ok {
		t.Errorf("with DATA_TOTAL_IOPS=0 (no cap) the applier still logs the cgroup v1 notice: %s", n.Msg)
	}
	// Clearing the cap leaves the containers' own limits.
	limited := e.pod(ctx, t, optedIn, "limited")
	e.waitCgroupBy(ctx, t, time.Now(), limited, "db", e.f.dbRead, e.f.dbWrite)

	// The default is off: a cap set before and the setting removed is cleared.
	restart(fmt.Sprintf("DATA_TOTAL_IOPS=%d", e.f.totalIOPS))
	waitCap(uint64(e.f.totalIOPS))
	restart()
	waitCap(0)
	if _, ok := findLog(e.applierLog(ctx, t), "DATA_TOTAL_IOPS is set"); ok {
		t.Error("with DATA_TOTAL_IOPS at its default the applier logs that a cap is set")
	}
}

// checkPodsTogether: with kubepods capped, what the kernel counted on the
// data disk over a window, in all of kubepods and in two pods of two
// namespaces doing direct IO at once: a and b, both with an unlimited
// container (free's app; limited's excluded istio-proxy beside its limited
// app and db), so that together they ask for far more than the cap.
//   - cgroup v2: the sum (kubepods) is at the cap (at most 5 % over, at
//     least 80 %: the loops pause between runs), and neither pod is starved
//     (each has at least a tenth of it);
//   - cgroup v1: the cap holds nothing below kubepods, so the sum is far above
//     it (more than twice).
func (e *env) checkPodsTogether(ctx context.Context, t *testing.T, a, b *corev1.Pod) {
	t.Helper()
	layout := e.c.Node.Layout()
	dirs := []string{layout.KubepodsCgroup()}
	for _, p := range []*corev1.Pod{a, b} {
		dir, err := layout.PodCgroup(p)
		if err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, dir)
	}
	window := time.Duration(3*e.f.fioSeconds) * time.Second
	if layout.Cgroup != cgroup.V1 {
		// The cap is to be reached for the whole window: the pods' fio
		// loops pause between runs, so a's container asks for more with one
		// long fio run beside its loop.
		defer e.holdDemand(ctx, t, a, "app", window)()
	}
	r := e.ioRates(ctx, t, window, dirs...)
	capIOPS := float64(e.f.totalIOPS)
	t.Logf("kubepods capped at %d, over %s: all pods read %.1f write %.1f IOPS; %s/%s read %.1f write %.1f; %s/%s read %.1f write %.1f",
		e.f.totalIOPS, window, r[0].read, r[0].write, a.Namespace, a.Name, r[1].read, r[1].write, b.Namespace, b.Name, r[2].read, r[2].write)
	if layout.Cgroup == cgroup.V1 {
		if r[0].read < 2*capIOPS || r[0].write < 2*capIOPS {
			t.Errorf("all pods read %.1f write %.1f IOPS with kubepods capped at %d on cgroup v1, want both above %.0f: the cap held the pods together, contrary to what the applier logs",
				r[0].read, r[0].write, e.f.totalIOPS, 2*capIOPS)
		}
		return
	}
	// The cap holds and is reached: within 10 % below it (the pods ask for
	// more all through the window: holdDemand) and never more than the
	// kernel's overshoot above it. Without holdDemand, when the loops of
	// both unlimited containers paused at once, 138.3 / 130.8 were measured
	// at 150.
	for _, got := range []struct {
		what string
		v    float64
	}{{"read", r[0].read}, {"write", r[0].write}} {
		if lo, hi := 0.9*capIOPS, (1+v2Overshoot)*capIOPS; got.v < lo || got.v > hi {
			t.Errorf("all pods together %s %.1f IOPS with kubepods capped at %d, want %.0f-%.0f (within 10 %% below it, at most the kernel's overshoot above)", got.what, got.v, e.f.totalIOPS, lo, hi)
		}
	}
	for i, p := range []*corev1.Pod{a, b} {
		if got := r[i+1]; got.read < capIOPS/10 || got.write < capIOPS/10 {
			t.Errorf("%s/%s read %.1f write %.1f IOPS beside the other pod under the cap of %d, want both at least %.0f: starved", p.Namespace, p.Name, got.read, got.write, e.f.totalIOPS, capIOPS/10)
		}
	}
}

// holdDemand starts, in container of fio pod p (kubectl exec, beside its
// loop), one fio run of random direct reads and writes long enough for
// window, and returns once its IO has begun; the returned func waits for it
// to end. So the container asks for IO all through the window, where its
// loop pauses between runs.
func (e *env) holdDemand(ctx context.Context, t *testing.T, p *corev1.Pod, container string, window time.Duration) (wait func()) {
	t.Helper()
	marker := fmt.Sprintf("hold-%s-%s-%s", p.Namespace, p.Name, container)
	e.c.Node.Run(ctx, "rm", "-f", e.data(marker))
	runtime := int((window + e.f.slowed(5*time.Second)).Seconds())
	script := fmt.Sprintf(`touch /data/%s; exec %s --output=/dev/null`, marker, e.f.fioCommand(runtime, fioWriteFile(p.Namespace, p.Name, container)))
	done := make(chan error, 1)
	go func() {
		_, err := e.c.Kubectl(ctx, "exec", "-n", p.Namespace, p.Name, "-c", container, "--", "sh", "-c", script)
		done <- err
	}()
	if err := cluster.Poll(ctx, "fio started in "+p.Namespace+"/"+p.Name+" "+container, 200*time.Millisecond, e.f.slowed(30*time.Second), func() error {
		select {
		case err := <-done:
			return cluster.Final(fmt.Errorf("kubectl exec ended: %v", err))
		default:
		}
		_, err := e.c.Node.ReadFile(ctx, e.data(marker))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // fio's start: its files opened, its queue full
	return func() {
		t.Helper()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("the extra fio run in %s/%s %s: %v", p.Namespace, p.Name, container, err)
			}
		case <-ctx.Done():
			t.Errorf("the extra fio run in %s/%s %s: %v", p.Namespace, p.Name, container, ctx.Err())
		}
		e.c.Node.Run(context.Background(), "rm", "-f", e.data(marker))
	}
}

// ioRate is a cgroup's read and write IOPS on the data disk.
type ioRate struct{ read, write float64 }

// ioRates is the IOPS on the data disk of each of dirs (cgroup directories
// on the node, their descendants included), from the kernel's counters at
// the start and the end of window.
func (e *env) ioRates(ctx context.Context, t *testing.T, window time.Duration, dirs ...string) []ioRate {
	t.Helper()
	read := func() ([]cgroup.IOStat, time.Time) {
		t.Helper()
		at := time.Now()
		out := make([]cgroup.IOStat, len(dirs))
		for i, dir := range dirs {
			out[i] = e.ioStat(ctx, t, dir)
		}
		return out, at
	}
	before, from := read()
	select {
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	case <-time.After(window):
	}
	after, to := read()
	secs := to.Sub(from).Seconds()
	out := make([]ioRate, len(dirs))
	for i := range dirs {
		out[i] = ioRate{read: float64(after[i].ReadIOs-before[i].ReadIOs) / secs, write: float64(after[i].WriteIOs-before[i].WriteIOs) / secs}
	}
	return out
}

// ioStat is the kernel's IO counters of the data disk in the cgroup at dir
// on the node, its descendants included.
func (e *env) ioStat(ctx context.Context, t *testing.T, dir string) cgroup.IOStat {
	t.Helper()
	s, err := cluster.DataDiskIOStat(ctx, e.c.Node, dir)
	if err != nil {
		t.Fatalf("IO counters of %s: %v", dir, err)
	}
	return s
}

// waitNodeCap waits until the kubepods cgroup's IOPS limits of the data disk
// are iops for read and write (0: no IOPS limit on it), 5 s at most, and
// returns when it saw them.
func (e *env) waitNodeCap(ctx context.Context, t testing.TB, iops uint64) time.Time {
	t.Helper()
	disk := e.c.Node.DataDisk()
	kubepods := e.c.Node.Layout().KubepodsCgroup()
	var got string
	if err := cluster.Poll(ctx, "kubepods cap", 100*time.Millisecond, e.f.slowed(5*time.Second), func() error {
		l, err := cluster.IOLimits(ctx, e.c.Node, kubepods)
		if err != nil {
			got = err.Error()
			return err
		}
		got = cluster.FormatIOLimits(l)
		if l[disk].ReadIOPS != iops || l[disk].WriteIOPS != iops {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("DATA_TOTAL_IOPS=%d: %s limits %s, want read and write IOPS %d on %s (0: none) within 5s",
			iops, kubepods, got, iops, disk)
	}
	t.Logf("DATA_TOTAL_IOPS=%d: %s limits %s", iops, kubepods, got)
	return time.Now()
}

// v2Overshoot is how far over a cgroup v2 limit the kernel admits IO (~3 %
// measured in the VM; issue 9 allows 5 %).
const v2Overshoot = 0.05

// notice is a line of the applier's JSON log.
type notice struct {
	Msg               string   `json:"msg"`
	DataTotalIOPS     uint64   `json:"dataTotalIOPS"`
	Pod               string   `json:"pod"` // namespace/name
	Container         string   `json:"container"`
	SinceStartEventMs *float64 `json:"sinceStartEventMs"` // IO limits applied after a start event
}

// v1Notice finds, in the applier's log, its start-up notice that on cgroup
// v1 DATA_TOTAL_IOPS does not cap the pods below kubepods.
func v1Notice(log string) (notice, bool) {
	return findLog(log, "cgroup v1", "DATA_TOTAL_IOPS", "not hierarchical")
}

// findLog finds the first line of the applier's JSON log whose message
// holds all of words.
func findLog(log string, words ...string) (notice, bool) {
	for _, n := range logLines(log) {
		if !slices.ContainsFunc(words, func(w string) bool { return !strings.Contains(n.Msg, w) }) {
			return n, true
		}
	}
	return notice{}, false
}

// logLines is the lines of the applier's JSON log, in order (lines that
// are not JSON left out).
func logLines(log string) []notice {
	var out []notice
	for _, l := range strings.Split(log, "\n") {
		var n notice
		if json.Unmarshal([]byte(l), &n) == nil {
			out = append(out, n)
		}
	}
	return out
}

// appliedLines is the "IO limits applied" lines of the applier's JSON log.
func appliedLines(log string) []notice {
	return slices.DeleteFunc(logLines(log), func(n notice) bool { return n.Msg != "IO limits applied" })
}

// applierLog is the running applier's log so far.
func (e *env) applierLog(ctx context.Context, t *testing.T) string {
	t.Helper()
	log, err := e.g.ApplierLog(ctx)
	if err != nil {
		t.Fatalf("the applier's log: %v", err)
	}
	return log
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
