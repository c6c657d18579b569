package app_test

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"

	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// BenchmarkReactionUnderLoad is BenchmarkReaction on a busy node: every
// core saturated by a CPU hog outside any container (at the applier's own
// priority), KDG_REACTION_STARTS (default 500) container starts one after
// the other, then the same number in bursts of 20 started at once (the
// kubelet's pod start rate). It reports, for each, the fraction of starts
// whose container completed no IO before its limit landed, the most IOs
// one did, and the reaction time's percentiles from /tasks/start.
func BenchmarkReactionUnderLoad(b *testing.B) {
	runtimetest.EachContainerd(b, benchmarkReactionUnderLoad)
}

// startBurst is how many containers the kubelet starts at once in the startBurst
// half of BenchmarkReactionUnderLoad.
const startBurst = 20

func benchmarkReactionUnderLoad(b *testing.B, d *runtimetest.Containerd) {
	n := 500
	if v := os.Getenv("KDG_REACTION_STARTS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < startBurst {
			b.Fatalf("KDG_REACTION_STARTS=%q: want a number ≥ %d", v, startBurst)
		}
	}
	n -= n % startBurst
	dk, rootfs, a, te, pods := reactionRig(b, d, 2*n)
	time.Sleep(time.Second) // the applier's informer has the pods
	hogs(b, runtime.NumCPU())
	time.Sleep(time.Second)
	b.Logf("load average with %d CPU hogs: %s", runtime.NumCPU(), realtest.LoadAverage())

	ctx := k8sCtx()
	// starts starts the containers of pods[from:to] at once (each made
	// first, its task created and started in a goroutine of its own) and
	// returns, for each, the time from /tasks/start to its limit and the
	// IOs it completed before.
	starts := func(from, to int) ([]time.Duration, []uint64) {
		cs := make([]ctrContainer, to-from)
		landed := make([]<-chan landing, to-from)
		for i := range cs {
			cs[i] = run(b, d, dk, rootfs, pods[from+i], "app", readLoop("data"), false)
			landed[i] = watchLimit(dk, cs[i].dir, 100, 30*time.Second)
		}
		tasks := make([]client.Task, len(cs))
		errs := make([]error, len(cs))
		var wg sync.WaitGroup
		for i, c := range cs {
			wg.Go(func() {
				if tasks[i], errs[i] = c.NewTask(ctx, cio.NullIO); errs[i] == nil {
					errs[i] = tasks[i].Start(ctx)
				}
			})
		}
		wg.Wait()
		took, ios := make([]time.Duration, len(cs)), make([]uint64, len(cs))
		for i, c := range cs {
			if errs[i] != nil {
				b.Fatal(errs[i])
			}
			l := <-landed[i]
			if l.err != nil {
				b.Fatal(l.err)
			}
			_, started, err := te.wait(c.ID())
			if err != nil {
				b.Fatal(err)
			}
			took[i], ios[i] = l.at.Sub(started), l.ios
		}
		for _, t := range tasks {
			if _, err := t.Delete(ctx, client.WithProcessKill); err != nil {
				b.Fatal(err)
			}
		}
		return took, ios
	}
	report := func(what string, took []time.Duration, ios []uint64) {
		slices.Sort(took)
		zero := 0
		for _, x := range ios {
			if x == 0 {
				zero++
			}
		}
		pct := 100 * float64(zero) / float64(len(ios))
		b.ReportMetric(pct, what+"-%-starts-with-0-IOs-before-limit")
		b.ReportMetric(float64(slices.Max(ios)), what+"-max-IOs-before-limit")
		b.ReportMetric(ms(percentile(took, .5)), what+"-p50-from-task-start-ms")
		b.ReportMetric(ms(percentile(took, .99)), what+"-p99-from-task-start-ms")
		// At once, not with b.Log (printed when the benchmark ends): a half
		// takes many minutes, and a run stopped early keeps what it measured.
		fmt.Fprintf(os.Stderr, "%s: %s, %d starts: %.1f%% with 0 IOs before the limit (max %d IOs); from /tasks/start: min %s p50 %s p90 %s p99 %s max %s (load %s)\n",
			b.Name(), what, len(took), pct, slices.Max(ios), took[0], percentile(took, .5), percentile(took, .9), percentile(took, .99), took[len(took)-1], realtest.LoadAverage())
	}

	b.ResetTimer()
	for range b.N {
		var took []time.Duration
		var ios []uint64
		for i := range n {
			t, x := starts(i, i+1)
			took, ios = append(took, t...), append(ios, x...)
		}
		report("sequential", took, ios)

		took, ios = nil, nil
		for first := n; first < 2*n; first += startBurst {
			t, x := starts(first, first+startBurst)
			took, ios = append(took, t...), append(ios, x...)
		}
		report(fmt.Sprintf("bursts-of-%d", startBurst), took, ios)
	}
	b.StopTimer()
	b.Logf("load average at the end: %s", realtest.LoadAverage())
	a.noPeriodicPass(b)
}

// hogs starts n busy loops outside any container (the test's own cgroups,
// nice 0), stopped when the benchmark ends.
func hogs(b *testing.B, n int) {
	for range n {
		cmd := exec.Command("sh", "-c", "while :; do :; done")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
	}
}
