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
	"k8s.io/apimachinery/pkg/api/resource"
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
	// Capped: with the aggressors unlimited (their namespace not opted in)
	// and the node's cap on all pods together, DATA_TOTAL_IOPS, at
	// Setup.TotalIOPS (Setup.SetTotal).
	Capped Phase = "capped"
)

// Phases in the order a round runs them unless Setup.Phases says otherwise.
var Phases = []Phase{Alone, Unprotected, Protected}

// allPhases is every phase, in the order tables and charts show them.
var allPhases = []Phase{Alone, Unprotected, Protected, Capped}

// Beside is a second victim: the pod victim's reads, run at the same
// time by another reader.
type Beside string

const (
	// OnNode: fio on the node itself, outside any pod, as the node's own
	// IO (the kubelet's, the runtime's, the system's) would be.
	OnNode Beside = "node"
	// Guaranteed: a Guaranteed pod in VictimNS. Its cgroup sits directly in
	// the kubepods cgroup, where the BestEffort pods' (the pod victim's,
	// the aggressors') sit in kubepods' besteffort child: under the node
	// cap it shows whether a pod's queue in the kernel's throttle is its
	// own or shared with its QoS class.
	Guaranteed Beside = "guaranteed"
)

// allBesides is every second victim, in the order tables show them.
var allBesides = []Beside{OnNode, Guaranteed}

// header is a second victim's column in Table.
func (b Beside) header() string { return string(b)[:4] }

// file is a second victim's fio file on the data disk.
func (b Beside) file() string { return "protect-" + string(b) + "-victim.dat" }

// Latency is a second victim's read IOPS and p99 completion latency.
type Latency struct {
	IOPS float64
	P99  time.Duration
}

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
	AggressorMiB          int // each aggressor's file (default 512)
	// Aggressors is how many aggressor pods (default 1), all in
	// AggressorNS; their fio figures are summed.
	Aggressors int
	// Phases a round runs (default Phases). Capped needs TotalIOPS and
	// SetTotal: SetTotal(ctx, n) sets the node's DATA_TOTAL_IOPS to n (0:
	// off) and returns once the kubepods cgroup holds it; it is set for the
	// Capped phase only.
	Phases    []Phase
	TotalIOPS int
	SetTotal  func(ctx context.Context, iops int) error
	// Besides are second victims measured beside the pod's in every
	// phase, each on a file of its own.
	Besides []Beside
	// Settle is a pause after each unprotected phase: the unlimited
	// aggressor's gigabytes of writes keep the host's disk busy for a while
	// after it stopped (measured: the next phase's victim p99 several
	// times its p99 alone, whatever that phase is), which would be charged
	// to the phase that happens to follow.
	Settle time.Duration
	Log    func(format string, args ...any)

	victim     *corev1.Pod
	guaranteed *corev1.Pod // Besides has Guaranteed
	aggressors []*corev1.Pod
	totalOn    bool // SetTotal(TotalIOPS) is in force
}

// Result is one phase's measurement.
type Result struct {
	Phase Phase
	Round int // from 1
	// The victim: 4 KiB random reads, O_DIRECT, iodepth 1.
	VictimIOPS          float64
	P50, P99, P999      time.Duration // completion latency
	AggressorReadIOPS   float64       // 0 when alone; the sum over Setup.Aggressors
	AggressorWriteIOPS  float64
	AggressorLimitRead  uint64 // each aggressor's cgroup limits during the phase (0: none)
	AggressorLimitWrite uint64
	// All pods together on the data disk as the kernel counted them: the
	// kubepods cgroup's counters, sampled on the node every half second,
	// as rates over windows of a second or more (cluster.Rates) while every
	// aggressor's fio ran (the victim's when alone); their median, and
	// their peak: under the node's cap (Capped) no window should be far
	// above it.
	PodsReadIOPS, PodsWriteIOPS float64
	PodsReadPeak, PodsWritePeak float64
	// Each second victim's (Setup.Besides).
	Besides map[Beside]Latency
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
	def(&s.Aggressors, 1)
	if len(s.Phases) == 0 {
		s.Phases = Phases
	}
}

// aggressorName is the ith aggressor's pod name (from 0): aggressor,
// aggressor-2, …; its fio file is named after it.
func aggressorName(i int) string {
	if i == 0 {
		return "aggressor"
	}
	return fmt.Sprintf("aggressor-%d", i+1)
}

func aggressorFile(i int) string { return "protect-" + aggressorName(i) + ".dat" }

const (
	victimFile = "protect-victim.dat"
	container  = "main"
	// guaranteedVictim is the Guaranteed second victim's pod, in VictimNS.
	guaranteedVictim = "victim-guaranteed"
)

// files is every fio file on the data disk and its size in MiB.
func (s *Setup) files() map[string]int {
	fs := map[string]int{victimFile: s.VictimMiB}
	for _, b := range s.Besides {
		fs[b.file()] = s.VictimMiB
	}
	for i := range s.Aggressors {
		fs[aggressorFile(i)] = s.AggressorMiB
	}
	return fs
}

// Prepare makes the namespaces (the aggressors' with its default limit,
// not opted in), writes the fio files on the data disk from outside any
// throttled cgroup, and starts the pods (sleeping; fio runs by exec).
func (s *Setup) Prepare(ctx context.Context) error {
	s.defaults()
	if slices.Contains(s.Phases, Capped) && (s.TotalIOPS <= 0 || s.SetTotal == nil) {
		return errors.New("the capped phase needs TotalIOPS and SetTotal")
	}
	n := s.C.Node
	for name, mib := range s.files() {
		if err := cluster.WriteDataFile(ctx, n, n.DataDir()+"/"+name, mib); err != nil {
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
	if s.victim, err = s.startPod(ctx, s.VictimNS, "victim", corev1.ResourceRequirements{}); err != nil {
		return err
	}
	if slices.Contains(s.Besides, Guaranteed) {
		// A whole core and requests = limits: Guaranteed, and fio at
		// iodepth 1 is one thread, so the CPU quota is no limit to it.
		rl := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("128Mi")}
		if s.guaranteed, err = s.startPod(ctx, s.VictimNS, guaranteedVictim, corev1.ResourceRequirements{Requests: rl, Limits: rl}); err != nil {
			return err
		}
		if q := s.guaranteed.Status.QOSClass; q != corev1.PodQOSGuaranteed {
			return fmt.Errorf("pod %s/%s: QoS class %q, want Guaranteed", s.VictimNS, guaranteedVictim, q)
		}
	}
	for i := range s.Aggressors {
		p, err := s.startPod(ctx, s.AggressorNS, aggressorName(i), corev1.ResourceRequirements{})
		if err != nil {
			return err
		}
		s.aggressors = append(s.aggressors, p)
	}
	return nil
}

func (s *Setup) startPod(ctx context.Context, ns, name string, res corev1.ResourceRequirements) (*corev1.Pod, error) {
	p := s.C.Pod(ns, name, "sleep", "inf")
	p.Spec.Containers[0].Resources = res
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

// Cleanup deletes the two namespaces (and so the pods) and the fio files,
// and turns the node's cap off if the capped phase left it on.
func (s *Setup) Cleanup(ctx context.Context) error {
	var errs []error
	if s.totalOn {
		if err := s.setTotal(ctx, false); err != nil {
			errs = append(errs, fmt.Errorf("turning DATA_TOTAL_IOPS off: %w", err))
		}
	}
	for _, ns := range []string{s.VictimNS, s.AggressorNS} {
		if _, err := s.C.Kubectl(ctx, "delete", "namespace", ns, "--ignore-not-found", "--wait=false"); err != nil {
			errs = append(errs, err)
		}
	}
	zero := int64(0)
	for _, name := range []string{"victim", guaranteedVictim} {
		s.C.Client.CoreV1().Pods(s.VictimNS).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	for i := range max(s.Aggressors, 1) {
		s.C.Client.CoreV1().Pods(s.AggressorNS).Delete(ctx, aggressorName(i), metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	n := s.C.Node
	rm := []string{"-f"}
	for name := range s.files() {
		rm = append(rm, n.DataDir()+"/"+name)
	}
	if _, err := n.Run(ctx, "rm", rm...); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// setTotal turns the node's cap on (TotalIOPS) or off, if it is not so.
func (s *Setup) setTotal(ctx context.Context, on bool) error {
	if s.SetTotal == nil || on == s.totalOn {
		return nil
	}
	n := 0
	if on {
		n = s.TotalIOPS
	}
	start := time.Now()
	if err := s.SetTotal(ctx, n); err != nil {
		return err
	}
	s.totalOn = on
	s.logf("DATA_TOTAL_IOPS=%d on the node in %s", n, time.Since(start).Round(time.Millisecond))
	return nil
}

// protect opts the aggressors' namespace in (on) or out and waits until
// every running aggressor container's cgroup holds Limit (or no limit).
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
	disk := s.C.Node.DataDisk()
	var got string
	for _, p := range s.aggressors {
		dir, err := s.C.ContainerCgroup(p, container)
		if err != nil {
			return err
		}
		if err := cluster.Poll(ctx, "the cgroup limits of "+p.Name, 100*time.Millisecond, 30*time.Second, func() error {
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
	}
	s.logf("aggressors' namespace %s: %s → their running containers' cgroups %s in %s", s.AggressorNS, label, got, time.Since(start).Round(time.Millisecond))
	return nil
}

// Run measures one phase: the node's cap on for Capped only, the
// aggressors' namespace opted in (Protected) or out, the aggressors' fio
// started (not when Alone), after a second the victim's fio (and the
// second victims' beside it) for Seconds, then the aggressors' results.
func (s *Setup) Run(ctx context.Context, ph Phase) (Result, error) {
	r := Result{Phase: ph, Besides: map[Beside]Latency{}}
	if err := s.setTotal(ctx, ph == Capped); err != nil {
		return r, err
	}
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
	var aggressors []*corev1.Pod // those running fio in this phase
	if ph != Alone {
		aggressors = s.aggressors
	}
	kubepods := s.C.Node.Layout().KubepodsCgroup()
	type sampled struct {
		samples []cluster.IOStatSample
		err     error
	}
	pods := make(chan sampled, 1)
	stop := fmt.Sprintf("%s/protect-sampling-%d", s.C.Node.Dir(), time.Now().UnixNano())
	go func() {
		// Until every fio is done (stop), at most a few minutes.
		ss, err := cluster.SampleDataDiskIOStat(ctx, s.C.Node, kubepods, stop, time.Duration(s.Seconds)*time.Second+3*time.Minute, 500*time.Millisecond)
		pods <- sampled{ss, err}
	}()
	aggs := make(chan out, len(aggressors))
	if len(aggressors) > 0 {
		for i, p := range aggressors {
			go func() {
				j, err := s.fio(ctx, p, fmt.Sprintf(
					"--name=aggressor --filename=/data/%s --size=%dM --rw=randrw --bs=4k --direct=1 --ioengine=libaio --iodepth=%d --numjobs=%d --group_reporting --runtime=%d --time_based",
					aggressorFile(i), s.AggressorMiB, s.AggressorDepth, s.AggressorJobs, s.Seconds+2))
				aggs <- out{j, err}
			}()
		}
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return r, ctx.Err()
		}
	}
	victim := func(file string) string {
		return fmt.Sprintf("--name=victim --filename=%s --size=%dM --rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 --runtime=%d --time_based",
			file, s.VictimMiB, s.Seconds)
	}
	besides := make(map[Beside]chan out, len(s.Besides))
	for _, b := range s.Besides {
		besides[b] = make(chan out, 1)
		go func() {
			var o out
			switch b {
			case OnNode:
				o.j, o.err = s.nodeFio(ctx, victim(s.C.Node.DataDir()+"/"+b.file()))
			case Guaranteed:
				o.j, o.err = s.fio(ctx, s.guaranteed, victim("/data/"+b.file()))
			default:
				o.err = fmt.Errorf("no second victim %q", b)
			}
			besides[b] <- o
		}()
	}
	v, err := s.fio(ctx, s.victim, victim("/data/"+victimFile))
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	// The kernel's count of all pods over the time every aggressor's fio
	// ran (the victim's when alone), by fio's end times on the node's clock
	// (the pods' too) less their time-based runtimes.
	var from, to time.Time
	window := func(j kdg.FioResult, secs int) {
		end := time.UnixMilli(j.TimestampMS)
		if start := end.Add(-time.Duration(secs) * time.Second); from.IsZero() || start.After(from) {
			from = start
		}
		if to.IsZero() || end.Before(to) {
			to = end
		}
	}
	if len(aggressors) == 0 && err == nil {
		window(v, s.Seconds)
	}
	for range aggressors {
		a := <-aggs
		if a.err != nil {
			errs = append(errs, a.err)
			continue
		}
		r.AggressorReadIOPS += a.j.Jobs[0].Read.IOPS
		r.AggressorWriteIOPS += a.j.Jobs[0].Write.IOPS
		window(a.j, s.Seconds+2)
	}
	if _, err := s.C.Node.Run(ctx, "touch", stop); err != nil {
		errs = append(errs, fmt.Errorf("stopping the sampling of %s: %w", kubepods, err))
	}
	if p := <-pods; p.err != nil {
		errs = append(errs, p.err)
	} else if rd, wr := cluster.Rates(p.samples, from, to, time.Second); len(rd) == 0 && !from.IsZero() {
		errs = append(errs, fmt.Errorf("%s's io counters: %d samples, none a second apart from %s to %s (the fio runs)", kubepods, len(p.samples), from.Format(time.RFC3339Nano), to.Format(time.RFC3339Nano)))
	} else if len(rd) > 0 {
		r.PodsReadIOPS, r.PodsWriteIOPS = Median(rd), Median(wr)
		r.PodsReadPeak, r.PodsWritePeak = slices.Max(rd), slices.Max(wr)
	}
	besideLog := ""
	for _, b := range s.Besides {
		o := <-besides[b]
		if o.err != nil {
			errs = append(errs, o.err)
			continue
		}
		var l Latency
		if l.IOPS, _, l.P99, _, err = latency(o.j, string(b)+" victim"); err != nil {
			errs = append(errs, err)
			continue
		}
		r.Besides[b] = l
		besideLog += fmt.Sprintf("   %s victim %6.0f IOPS  p99 %8s", b, l.IOPS, us(l.P99))
	}
	if err := errors.Join(errs...); err != nil {
		return r, err
	}
	if r.VictimIOPS, r.P50, r.P99, r.P999, err = latency(v, "victim"); err != nil {
		return r, err
	}
	s.logf("%-11s victim %6.0f IOPS  p50 %8s  p99 %8s  p99.9 %8s   aggressors read %7.0f write %7.0f IOPS   all pods (%s) read %7.0f write %7.0f IOPS (peak %.0f, %.0f)%s",
		ph, r.VictimIOPS, us(r.P50), us(r.P99), us(r.P999), r.AggressorReadIOPS, r.AggressorWriteIOPS, kubepods, r.PodsReadIOPS, r.PodsWriteIOPS, r.PodsReadPeak, r.PodsWritePeak, besideLog)
	return r, nil
}

// latency is a victim's read IOPS and completion-latency percentiles.
func latency(j kdg.FioResult, who string) (iops float64, p50, p99, p999 time.Duration, err error) {
	rd := j.Jobs[0].Read
	pct := func(p string) time.Duration { return time.Duration(rd.Clat.Percentile[p]) }
	p50, p99, p999 = pct("50.000000"), pct("99.000000"), pct("99.900000")
	if p99 == 0 {
		return 0, 0, 0, 0, fmt.Errorf("%s's fio reported no p99 completion latency (%d reads)", who, rd.TotalIOs)
	}
	return rd.IOPS, p50, p99, p999, nil
}

// fio runs fio in the pod's container with args, its JSON result written
// inside the pod and printed once it is done (its warnings go elsewhere).
func (s *Setup) fio(ctx context.Context, pod *corev1.Pod, args string) (kdg.FioResult, error) {
	out, err := s.C.Kubectl(ctx, "exec", "-n", pod.Namespace, pod.Name, "-c", container, "--", "sh", "-c", fioScript("/usr/bin/fio", args))
	return parseFio(out, err, pod.Namespace+"/"+pod.Name)
}

// nodeFio runs fio with args on the node itself, outside any pod.
func (s *Setup) nodeFio(ctx context.Context, args string) (kdg.FioResult, error) {
	out, err := s.C.Node.Run(ctx, "sh", "-c", fioScript("fio", args))
	return parseFio(out, err, "the node")
}

// fioScript runs fio with its JSON result in a directory of its own,
// printed once fio is done (its warnings go elsewhere).
func fioScript(fio, args string) string {
	return `d=$(mktemp -d) && ` + fio + " " + args + ` --output-format=json --output=$d/fio.json >$d/fio.log 2>&1 || { cat $d/fio.log; rm -rf $d; exit 1; }; cat $d/fio.json; rm -rf $d`
}

func parseFio(out []byte, err error, where string) (kdg.FioResult, error) {
	if err != nil {
		return kdg.FioResult{}, fmt.Errorf("fio in %s: %w", where, err)
	}
	j, err := kdg.ParseFioJSON(out) // past a kubectl warning before the JSON
	if err != nil {
		return j, fmt.Errorf("fio in %s: %w: %.300s", where, err, out)
	}
	return j, nil
}

// Rounds runs the phases (Setup.Phases) n times, alternating (A B C A B C
// …), so that the machine's drift shows in every phase's spread, and
// leaves the aggressors' namespace opted out and the node's cap off.
func (s *Setup) Rounds(ctx context.Context, n int) ([]Result, error) {
	var rs []Result
	for i := range n {
		for _, ph := range s.Phases {
			r, err := s.Run(ctx, ph)
			if err != nil {
				return rs, fmt.Errorf("round %d, %s: %w", i+1, ph, err)
			}
			r.Round = i + 1
			rs = append(rs, r)
			if ph == Unprotected && s.Settle > 0 {
				s.logf("settling %s after the unlimited aggressors", s.Settle)
				select {
				case <-time.After(s.Settle):
				case <-ctx.Done():
					return rs, ctx.Err()
				}
			}
		}
	}
	if err := s.setTotal(ctx, false); err != nil {
		return rs, err
	}
	return rs, s.protect(ctx, false)
}

// Summary is each phase's medians over the rounds.
type Summary map[Phase]Result

// Summarize takes each phase's median of every figure.
func Summarize(rs []Result) Summary {
	sum := Summary{}
	for _, ph := range allPhases {
		var of []Result
		for _, r := range rs {
			if r.Phase == ph {
				of = append(of, r)
			}
		}
		if len(of) == 0 {
			continue
		}
		med := func(f func(Result) float64) float64 {
			xs := make([]float64, len(of))
			for i, r := range of {
				xs[i] = f(r)
			}
			return Median(xs)
		}
		dur := func(f func(Result) time.Duration) time.Duration {
			return time.Duration(med(func(r Result) float64 { return float64(f(r)) }))
		}
		r := Result{Phase: ph, Besides: map[Beside]Latency{},
			VictimIOPS: med(func(r Result) float64 { return r.VictimIOPS }),
			P50:        dur(func(r Result) time.Duration { return r.P50 }),
			P99:        dur(func(r Result) time.Duration { return r.P99 }),
			P999:       dur(func(r Result) time.Duration { return r.P999 }),

			AggressorReadIOPS:  med(func(r Result) float64 { return r.AggressorReadIOPS }),
			AggressorWriteIOPS: med(func(r Result) float64 { return r.AggressorWriteIOPS }),
			PodsReadIOPS:       med(func(r Result) float64 { return r.PodsReadIOPS }),
			PodsWriteIOPS:      med(func(r Result) float64 { return r.PodsWriteIOPS }),
			PodsReadPeak:       med(func(r Result) float64 { return r.PodsReadPeak }),
			PodsWritePeak:      med(func(r Result) float64 { return r.PodsWritePeak }),
		}
		for _, b := range besidesOf(of) {
			r.Besides[b] = Latency{
				IOPS: med(func(r Result) float64 { return r.Besides[b].IOPS }),
				P99:  dur(func(r Result) time.Duration { return r.Besides[b].P99 }),
			}
		}
		sum[ph] = r
	}
	return sum
}

// besidesOf is the second victims measured in rs, in allBesides' order.
func besidesOf(rs []Result) []Beside {
	return slices.DeleteFunc(slices.Clone(allBesides), func(b Beside) bool {
		return !slices.ContainsFunc(rs, func(r Result) bool { _, ok := r.Besides[b]; return ok })
	})
}

// phases is the phases the summary holds, in allPhases' order.
func (s Summary) phases() []Phase {
	var out []Phase
	for _, ph := range allPhases {
		if _, ok := s[ph]; ok {
			out = append(out, ph)
		}
	}
	return out
}

// BesideRatio is the second victim b's median p99 in phase ph over its
// median p99 alone.
func (s Summary) BesideRatio(b Beside, ph Phase) float64 {
	return float64(s[ph].Besides[b].P99) / float64(s[Alone].Besides[b].P99)
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
// ratios of the median p99s to alone, the lines a script reads: the second
// victims' first if they were measured (`node victim p99 capped/alone
// X.XX`, `guaranteed victim p99 …`), then the pod victim's, `victim p99 protected/alone X.XX` (and capped)
// before, last, `victim p99 unprotected/alone X.XX`.
func Table(rs []Result) string {
	besides := besidesOf(rs)
	var b strings.Builder
	fmt.Fprintf(&b, "%-5s %-11s %9s %9s %9s %9s %12s %12s %10s %10s %10s %10s", "round", "phase", "victim", "p50", "p99", "p99.9", "aggr read", "aggr write", "pods read", "pods write", "peak read", "peak write")
	for _, v := range besides {
		fmt.Fprintf(&b, " %9s %9s", v.header(), v.header()+" p99")
	}
	b.WriteString("\n")
	line := func(round string, r Result) {
		fmt.Fprintf(&b, "%-5s %-11s %9.0f %9s %9s %9s %12.0f %12.0f %10.0f %10.0f %10.0f %10.0f", round, r.Phase, r.VictimIOPS, us(r.P50), us(r.P99), us(r.P999), r.AggressorReadIOPS, r.AggressorWriteIOPS, r.PodsReadIOPS, r.PodsWriteIOPS, r.PodsReadPeak, r.PodsWritePeak)
		for _, v := range besides {
			fmt.Fprintf(&b, " %9.0f %9s", r.Besides[v].IOPS, us(r.Besides[v].P99))
		}
		b.WriteString("\n")
	}
	for _, r := range rs {
		line(strconv.Itoa(r.Round), r)
	}
	sum := Summarize(rs)
	phases := sum.phases()
	for _, ph := range phases {
		line("med", sum[ph])
	}
	// Unprotected last, as the scripts of the single aggressor read it.
	ratios := slices.DeleteFunc(slices.Clone(phases), func(ph Phase) bool { return ph == Alone || ph == Unprotected })
	if slices.Contains(phases, Unprotected) {
		ratios = append(ratios, Unprotected)
	}
	for _, v := range besides {
		for _, ph := range ratios {
			fmt.Fprintf(&b, "%s victim p99 %s/alone %.2f\n", v, ph, sum.BesideRatio(v, ph))
		}
	}
	for _, ph := range ratios {
		fmt.Fprintf(&b, "victim p99 %s/alone %.2f\n", ph, sum.Ratio(ph))
	}
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
	for _, ph := range sum.phases() {
		longest = max(longest, sum[ph].P99)
	}
	if longest == 0 {
		return ""
	}
	var b strings.Builder
	for _, ph := range sum.phases() {
		r := sum[ph]
		n := int(math.Round(float64(width) * float64(r.P99) / float64(longest)))
		fmt.Fprintf(&b, "  %-11s %s %s p99 (%.1fx alone)\n", ph, strings.Repeat("█", max(n, 1)), us(r.P99), sum.Ratio(ph))
	}
	return b.String()
}
