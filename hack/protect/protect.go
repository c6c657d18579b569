// Package protect measures what KubeDiskGuard is for: a latency-sensitive
// victim pod's disk IO next to an aggressor pod hammering the same data
// disk, alone, with the aggressor unlimited (its namespace not opted in)
// and with the aggressor held to a limit (its namespace opted in while it
// runs: the policy controller stamps the running pod, the applier limits
// its container, no restart). fio runs inside the two long-running pods
// (kubectl exec per phase), so the IO is timed where it happens.
// `make bench-protection`, its e2e check and the demo's noisy-neighbour
// act drive it.
package protect

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Phase is one of the three situations the victim is measured in.
type Phase string

const (
	Alone       Phase = "alone"       // the victim on its own
	Unprotected Phase = "unprotected" // with the aggressor unlimited
	Protected   Phase = "protected"   // with the aggressor at Setup.Limit
)

// Phases in the order a round runs them.
var Phases = []Phase{Alone, Unprotected, Protected}

// Setup is the two pods and how hard the aggressor pushes.
type Setup struct {
	C *cluster.Cluster
	// VictimNS (never opted in: the victim is not limited) and AggressorNS
	// (opted in for the protected phase only, with kubediskguard.io/iops=Limit).
	VictimNS, AggressorNS string
	Limit                 int // the aggressor's read and write IOPS limit when protected
	Seconds               int // the victim's fio run per phase; the aggressor runs 2 s longer around it
	AggressorJobs         int // fio jobs of the aggressor (default 4)
	AggressorDepth        int // their iodepth (default 32)
	VictimMiB             int // the victim's file (default 256)
	AggressorMiB          int // the aggressor's file (default 512)
	// Settle is a pause after each unprotected phase: the unlimited
	// aggressor's gigabytes of writes keep the host's disk busy for a while
	// after it stopped (measured: the next phase's victim p99 several
	// times its p99 alone, whatever that phase is), which would be charged
	// to the phase that happens to follow.
	Settle time.Duration
	Log    func(format string, args ...any)

	victim, aggressor *corev1.Pod
}

// Result is one phase's measurement.
type Result struct {
	Phase Phase
	// The victim: 4 KiB random reads, O_DIRECT, iodepth 1.
	VictimIOPS          float64
	P50, P99, P999      time.Duration // completion latency
	AggressorReadIOPS   float64       // 0 when alone
	AggressorWriteIOPS  float64
	AggressorLimitRead  uint64 // the aggressor's cgroup limits during the phase (0: none)
	AggressorLimitWrite uint64
}

func (s *Setup) logf(format string, args ...any) {
	if s.Log != nil {
		s.Log(format, args...)
	}
}

func (s *Setup) defaults() {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&s.Limit, 200)
	def(&s.Seconds, 10)
	def(&s.AggressorJobs, 4)
	def(&s.AggressorDepth, 32)
	def(&s.VictimMiB, 256)
	def(&s.AggressorMiB, 512)
}

const (
	victimFile    = "protect-victim.dat"
	aggressorFile = "protect-aggressor.dat"
	container     = "main"
)

// Prepare makes the namespaces (the aggressor's with its default limit,
// not opted in), writes the fio files on the data disk from outside any
// throttled cgroup, and starts the two pods (sleeping; fio runs by exec).
func (s *Setup) Prepare(ctx context.Context) error {
	s.defaults()
	n := s.C.Node
	for _, f := range []struct {
		name string
		mib  int
	}{{victimFile, s.VictimMiB}, {aggressorFile, s.AggressorMiB}} {
		if err := cluster.WriteDataFile(ctx, n, n.DataDir()+"/"+f.name, f.mib); err != nil {
			return err
		}
	}
	for _, args := range [][]string{
		{"create", "namespace", s.VictimNS},
		{"create", "namespace", s.AggressorNS},
		{"annotate", "--overwrite", "namespace", s.AggressorNS, fmt.Sprintf("kubediskguard.io/iops=%d", s.Limit)},
	} {
		if _, err := s.C.Kubectl(ctx, args...); err != nil {
			return err
		}
	}
	var err error
	if s.victim, err = s.startPod(ctx, s.VictimNS, "victim"); err != nil {
		return err
	}
	s.aggressor, err = s.startPod(ctx, s.AggressorNS, "aggressor")
	return err
}

func (s *Setup) startPod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	p := s.C.Pod(ns, name, "sleep", "inf")
	hp := func(n, path string) corev1.Volume {
		return corev1.Volume{Name: n, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path}}}
	}
	p.Spec.Volumes = []corev1.Volume{hp("data", s.C.Node.DataDir()), hp("usr", "/usr"), hp("lib", "/lib"), hp("lib64", "/lib64")}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "data", MountPath: "/data"},
		{Name: "usr", MountPath: "/usr", ReadOnly: true},
		{Name: "lib", MountPath: "/lib", ReadOnly: true},
		{Name: "lib64", MountPath: "/lib64", ReadOnly: true},
	}
	if err := s.C.WaitServiceAccount(ctx, ns); err != nil {
		return nil, err
	}
	if _, err := s.C.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	return s.C.WaitRunning(ctx, ns, name, s.C.PodTimeout())
}

// Cleanup deletes the two namespaces (and so the pods) and the fio files.
func (s *Setup) Cleanup(ctx context.Context) error {
	var errs []error
	for _, ns := range []string{s.VictimNS, s.AggressorNS} {
		if _, err := s.C.Kubectl(ctx, "delete", "namespace", ns, "--ignore-not-found", "--wait=false"); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ns := range []string{s.VictimNS, s.AggressorNS} {
		zero := int64(0)
		for _, name := range []string{"victim", "aggressor"} {
			s.C.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		}
	}
	n := s.C.Node
	if _, err := n.Run(ctx, "rm", "-f", n.DataDir()+"/"+victimFile, n.DataDir()+"/"+aggressorFile); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// protect opts the aggressor's namespace in (on) or out and waits until
// the running aggressor container's cgroup holds Limit (or no limit).
func (s *Setup) protect(ctx context.Context, on bool) error {
	label := limits.EnabledLabel + "-"
	want := uint64(0)
	if on {
		label, want = limits.EnabledLabel+"=true", uint64(s.Limit)
	}
	start := time.Now()
	if _, err := s.C.Kubectl(ctx, "label", "--overwrite", "namespace", s.AggressorNS, label); err != nil {
		return err
	}
	dir, err := s.C.ContainerCgroup(s.aggressor, container)
	if err != nil {
		return err
	}
	disk := s.C.Node.DataDisk()
	var got string
	if err := cluster.Poll(ctx, "the aggressor's cgroup limits", 100*time.Millisecond, 30*time.Second, func() error {
		l, err := cluster.IOLimits(ctx, s.C.Node, dir)
		if err != nil {
			return err
		}
		got = cluster.FormatIOLimits(l)
		if d := l[disk]; d.ReadIOPS != want || d.WriteIOPS != want {
			return fmt.Errorf("limits %s, want read and write IOPS %d on %s", got, want, disk)
		}
		return nil
	}); err != nil {
		return err
	}
	s.logf("aggressor's namespace %s: %s → its running container's cgroup %s in %s", s.AggressorNS, label, got, time.Since(start).Round(time.Millisecond))
	return nil
}

// Run measures one phase: the aggressor's namespace opted in (Protected)
// or out, the aggressor's fio started (not when Alone), after a second the
// victim's fio for Seconds, then the aggressor's result.
func (s *Setup) Run(ctx context.Context, ph Phase) (Result, error) {
	r := Result{Phase: ph}
	if ph != Alone {
		if err := s.protect(ctx, ph == Protected); err != nil {
			return r, err
		}
		if ph == Protected {
			r.AggressorLimitRead, r.AggressorLimitWrite = uint64(s.Limit), uint64(s.Limit)
		}
	}
	type out struct {
		j   kdg.FioResult
		err error
	}
	agg := make(chan out, 1)
	if ph != Alone {
		go func() {
			j, err := s.fio(ctx, s.aggressor, fmt.Sprintf(
				"--name=aggressor --filename=/data/%s --size=%dM --rw=randrw --bs=4k --direct=1 --ioengine=libaio --iodepth=%d --numjobs=%d --group_reporting --runtime=%d --time_based",
				aggressorFile, s.AggressorMiB, s.AggressorDepth, s.AggressorJobs, s.Seconds+2))
			agg <- out{j, err}
		}()
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return r, ctx.Err()
		}
	}
	v, err := s.fio(ctx, s.victim, fmt.Sprintf(
		"--name=victim --filename=/data/%s --size=%dM --rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 --runtime=%d --time_based",
		victimFile, s.VictimMiB, s.Seconds))
	if ph != Alone {
		a := <-agg
		if err == nil {
			err = a.err
		}
		if err == nil {
			r.AggressorReadIOPS, r.AggressorWriteIOPS = a.j.Jobs[0].Read.IOPS, a.j.Jobs[0].Write.IOPS
		}
	}
	if err != nil {
		return r, err
	}
	rd := v.Jobs[0].Read
	r.VictimIOPS = rd.IOPS
	pct := func(p string) time.Duration { return time.Duration(rd.Clat.Percentile[p]) }
	r.P50, r.P99, r.P999 = pct("50.000000"), pct("99.000000"), pct("99.900000")
	if r.P99 == 0 {
		return r, fmt.Errorf("victim's fio reported no p99 completion latency (%d reads)", rd.TotalIOs)
	}
	s.logf("%-11s victim %6.0f IOPS  p50 %8s  p99 %8s  p99.9 %8s   aggressor read %7.0f write %7.0f IOPS",
		ph, r.VictimIOPS, us(r.P50), us(r.P99), us(r.P999), r.AggressorReadIOPS, r.AggressorWriteIOPS)
	return r, nil
}

// fio runs fio in the pod's container with args, its JSON result written
// inside the pod and printed once it is done (its warnings go elsewhere).
func (s *Setup) fio(ctx context.Context, pod *corev1.Pod, args string) (kdg.FioResult, error) {
	script := "/usr/bin/fio " + args + " --output-format=json --output=/tmp/fio.json >/tmp/fio.log 2>&1 || { cat /tmp/fio.log; exit 1; }; cat /tmp/fio.json"
	out, err := s.C.Kubectl(ctx, "exec", "-n", pod.Namespace, pod.Name, "-c", container, "--", "sh", "-c", script)
	if err != nil {
		return kdg.FioResult{}, fmt.Errorf("fio in %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	j, err := kdg.ParseFioJSON(out) // past a kubectl warning before the JSON
	if err != nil {
		return j, fmt.Errorf("fio in %s/%s: %w: %.300s", pod.Namespace, pod.Name, err, out)
	}
	return j, nil
}

// Rounds runs the three phases n times, alternating (A B C A B C …), so
// that the machine's drift shows in every phase's spread, and leaves the
// aggressor's namespace opted out.
func (s *Setup) Rounds(ctx context.Context, n int) ([]Result, error) {
	var rs []Result
	for i := range n {
		for _, ph := range Phases {
			r, err := s.Run(ctx, ph)
			if err != nil {
				return rs, fmt.Errorf("round %d, %s: %w", i+1, ph, err)
			}
			rs = append(rs, r)
			if ph == Unprotected && s.Settle > 0 {
				s.logf("settling %s after the unlimited aggressor", s.Settle)
				select {
				case <-time.After(s.Settle):
				case <-ctx.Done():
					return rs, ctx.Err()
				}
			}
		}
	}
	return rs, s.protect(ctx, false)
}

// Summary is each phase's medians over the rounds.
type Summary map[Phase]Result

// Summarize takes each phase's median of every figure.
func Summarize(rs []Result) Summary {
	sum := Summary{}
	for _, ph := range Phases {
		var iops, p50, p99, p999, ar, aw []float64
		for _, r := range rs {
			if r.Phase != ph {
				continue
			}
			iops, ar, aw = append(iops, r.VictimIOPS), append(ar, r.AggressorReadIOPS), append(aw, r.AggressorWriteIOPS)
			p50, p99, p999 = append(p50, float64(r.P50)), append(p99, float64(r.P99)), append(p999, float64(r.P999))
		}
		if len(iops) == 0 {
			continue
		}
		sum[ph] = Result{Phase: ph, VictimIOPS: Median(iops), P50: time.Duration(Median(p50)), P99: time.Duration(Median(p99)),
			P999: time.Duration(Median(p999)), AggressorReadIOPS: Median(ar), AggressorWriteIOPS: Median(aw)}
	}
	return sum
}

// Ratio is the victim's median p99 in phase ph over its median p99 alone.
func (s Summary) Ratio(ph Phase) float64 {
	return float64(s[ph].P99) / float64(s[Alone].P99)
}

// Median of xs (NaN for none).
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Table is every phase's figures, one line each, then the medians and the
// two lines a script reads last: `victim p99 protected/alone X.XX` and
// `victim p99 unprotected/alone X.XX`.
func Table(rs []Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-5s %-11s %9s %9s %9s %9s %12s %12s\n", "round", "phase", "victim", "p50", "p99", "p99.9", "aggr read", "aggr write")
	for i, r := range rs {
		fmt.Fprintf(&b, "%-5d %-11s %9.0f %9s %9s %9s %12.0f %12.0f\n", i/len(Phases)+1, r.Phase, r.VictimIOPS, us(r.P50), us(r.P99), us(r.P999), r.AggressorReadIOPS, r.AggressorWriteIOPS)
	}
	sum := Summarize(rs)
	for _, ph := range Phases {
		r := sum[ph]
		fmt.Fprintf(&b, "%-5s %-11s %9.0f %9s %9s %9s %12.0f %12.0f\n", "med", ph, r.VictimIOPS, us(r.P50), us(r.P99), us(r.P999), r.AggressorReadIOPS, r.AggressorWriteIOPS)
	}
	fmt.Fprintf(&b, "victim p99 protected/alone %.2f\n", sum.Ratio(Protected))
	fmt.Fprintf(&b, "victim p99 unprotected/alone %.2f\n", sum.Ratio(Unprotected))
	return b.String()
}

// us formats a latency in microseconds.
func us(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Microsecond), 'f', 0, 64) + "µs"
}

// Bars is the victim's median p99 per phase as a bar chart of width
// columns at most, for a terminal.
func Bars(sum Summary, width int) string {
	var longest time.Duration
	for _, ph := range Phases {
		longest = max(longest, sum[ph].P99)
	}
	if longest == 0 {
		return ""
	}
	var b strings.Builder
	for _, ph := range Phases {
		r := sum[ph]
		n := int(math.Round(float64(width) * float64(r.P99) / float64(longest)))
		fmt.Fprintf(&b, "  %-11s %s %s p99 (%.1fx alone)\n", ph, strings.Repeat("█", max(n, 1)), us(r.P99), sum.Ratio(ph))
	}
	return b.String()
}
