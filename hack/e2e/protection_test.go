package e2e

import (
	"context"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/hack/protect"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// protectLimit is the aggressor's read and write IOPS once its namespace
// opts in (kubediskguard.io/iops).
const protectLimit = 200

// protection is the noisy-neighbour setup on the package's cluster, with
// the data disk's IO reaching the host's disk (direct IO on the host
// node's loop device; turned back off by t.Cleanup): through the page
// cache, the victim's reads of a recently written file would never reach
// a device.
func (e *env) protection(ctx context.Context, t testing.TB, s *protect.Setup) {
	if err := e.c.SetDataDiskDirectIO(ctx, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.Cleanup(ctx); err != nil {
			t.Errorf("cleaning up the noisy neighbour: %v", err)
		}
		if err := e.c.SetDataDiskDirectIO(ctx, false); err != nil {
			t.Errorf("data disk direct IO off: %v", err)
		}
	})
	s.C = e.c
	if s.Limit == 0 {
		s.Limit = protectLimit
	}
	s.Log = t.Logf
	if err := s.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
}

// testProtection: one short round of the noisy-neighbour phases (the
// victim alone, with the aggressor unlimited, with the aggressor's
// namespace opted in while it runs). It asserts what holds on a noisy
// machine: unlimited, the aggressor does far more than the limit; opted in,
// it is held to the limit (within the band of the other checks); and the
// victim's p99 is lower with the aggressor limited than unlimited. The
// ratios to the victim alone are logged, not asserted (make
// bench-protection measures them over several rounds).
func (e *env) testProtection(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	s := &protect.Setup{VictimNS: "e2e-victim", AggressorNS: "e2e-aggressor", Seconds: 5, VictimMiB: 128, AggressorMiB: 256}
	e.protection(ctx, t, s)
	var rs []protect.Result
	for try := 1; ; try++ {
		var err error
		if rs, err = s.Rounds(ctx, 1); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d:\n%s", try, protect.Table(rs))
		p := rs[2]
		if !(p.P99 < rs[1].P99) && try == 1 {
			// One more round on a noisy machine; a second miss fails.
			t.Logf("victim p99 protected %s not below unprotected %s (load %s): one more round", p.P99, rs[1].P99, realtest.LoadAverage())
			continue
		}
		if below := func(x float64) bool { return x < (1-tolerance)*protectLimit }; (below(p.AggressorReadIOPS) || below(p.AggressorWriteIOPS)) && try == 1 {
			t.Logf("protected aggressor below the limit's band (host contention, load %s): one more round", realtest.LoadAverage())
			continue
		}
		break
	}
	u, p := rs[1], rs[2]
	if u.AggressorReadIOPS < 1.5*protectLimit {
		t.Errorf("unprotected aggressor: %.0f read IOPS, want > %.0f (not limited)", u.AggressorReadIOPS, 1.5*protectLimit)
	}
	for _, m := range []struct {
		dir string
		got float64
	}{{"read", p.AggressorReadIOPS}, {"write", p.AggressorWriteIOPS}} {
		if math.Abs(m.got-protectLimit) > tolerance*protectLimit {
			t.Errorf("protected aggressor: %.0f %s IOPS, want %d ± %.0f%%", m.got, m.dir, protectLimit, tolerance*100)
		}
	}
	if !(p.P99 < u.P99) {
		t.Errorf("victim p99 with the aggressor limited %s, not below unlimited %s", p.P99, u.P99)
	}
}

// BenchmarkProtection is make bench-protection: the noisy-neighbour
// phases alternated over KDG_PROTECT_ROUNDS rounds (default 5) of 10 s
// each on a cluster of its own, the aggressor limited to KDG_PROTECT_LIMIT
// (default 200) read and write IOPS when protected, the table of every
// phase, the medians, and last the two ratio lines. Where the kernel's
// throttle is hierarchical (cgroup v2, KDG_NODE=v2), first the node cap
// (benchNodeCap).
func BenchmarkProtection(b *testing.B) {
	realtest.Root(b)
	realtest.HostLock(b)
	rounds := envInt(b, "KDG_PROTECT_ROUNDS", 5)
	e := setUp(b)
	nodeCap := e.c.Node.Layout().Cgroup != cgroup.V1
	perRound := 3 * time.Minute // the single aggressor's three phases
	if nodeCap {
		perRound += 4 * time.Minute // the node cap's four phases and two applier restarts
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(time.Duration(rounds)*perRound))
	defer cancel()
	s := &protect.Setup{VictimNS: "bench-victim", AggressorNS: "bench-aggressor", Seconds: envInt(b, "KDG_PROTECT_SECONDS", 10),
		AggressorJobs: envInt(b, "KDG_PROTECT_JOBS", 4), AggressorDepth: envInt(b, "KDG_PROTECT_IODEPTH", 32), Limit: envInt(b, "KDG_PROTECT_LIMIT", protectLimit),
		Settle: time.Duration(envInt(b, "KDG_PROTECT_SETTLE", 15)) * time.Second}
	var capTable string
	if !nodeCap {
		b.Logf("the node cap with several aggressors (DATA_TOTAL_IOPS) is not measured on cgroup v1: its blkio throttle is flat, the cap on kubepods holds no pod below it (TestE2E/DataTotalIOPS shows it); KDG_NODE=v2 measures it")
	} else {
		capTable = e.benchNodeCap(ctx, b, s, rounds)
	}
	e.protection(ctx, b, s)
	b.Logf("aggressor: %d fio jobs of 4 KiB randrw at iodepth %d, limit %d read + %d write IOPS when protected; victim: 4 KiB randread, iodepth 1, %d s per phase; %s pause after each unprotected phase; data disk %s (direct IO), load %s",
		s.AggressorJobs, s.AggressorDepth, s.Limit, s.Limit, s.Seconds, s.Settle, e.c.Node.DataDisk(), realtest.LoadAverage())
	b.ResetTimer()
	rs, err := s.Rounds(ctx, rounds)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	sum := protect.Summarize(rs)
	b.ReportMetric(sum.Ratio(protect.Protected), "p99-protected/alone")
	b.ReportMetric(sum.Ratio(protect.Unprotected), "p99-unprotected/alone")
	fmt.Print(capTable + "\n" + protect.Bars(sum, 40) + "\n" + protect.Table(rs))
}

// benchNodeCap: KDG_PROTECT_AGGRESSORS (3) aggressors in one namespace,
// each like the single one, and three victims at once, the BestEffort pod,
// fio on the node itself outside any pod and a Guaranteed pod (its cgroup
// beside kubepods' besteffort child, not in it), over rounds of four phases: alone; unprotected;
// protected (each aggressor at s.Limit: per-container limits); capped (the
// aggressors unlimited, all pods together held by DATA_TOTAL_IOPS at
// KDG_PROTECT_TOTAL_IOPS, by default as many as the aggressors' limits
// together, the applier restarted with it). It returns the table, which
// the benchmark prints before the single aggressor's.
func (e *env) benchNodeCap(ctx context.Context, b *testing.B, one *protect.Setup, rounds int) string {
	n := envInt(b, "KDG_PROTECT_AGGRESSORS", 3)
	s := &protect.Setup{VictimNS: "bench-cap-victim", AggressorNS: "bench-cap-aggressors", Aggressors: n,
		Besides: []protect.Beside{protect.OnNode, protect.Guaranteed},
		Seconds: one.Seconds, AggressorJobs: one.AggressorJobs, AggressorDepth: one.AggressorDepth, Limit: one.Limit, Settle: one.Settle,
		VictimMiB: 256, AggressorMiB: 256,
		Phases: []protect.Phase{protect.Alone, protect.Unprotected, protect.Protected, protect.Capped}}
	s.TotalIOPS = envInt(b, "KDG_PROTECT_TOTAL_IOPS", n*s.Limit)
	s.SetTotal = func(ctx context.Context, iops int) error {
		var settings []string // 0: the setting's default, off
		if iops > 0 {
			settings = append(settings, fmt.Sprintf("DATA_TOTAL_IOPS=%d", iops))
		}
		if err := e.restartApplier(ctx, settings...); err != nil {
			return err
		}
		e.waitNodeCap(ctx, b, uint64(iops))
		return nil
	}
	e.protection(ctx, b, s)
	b.Logf("node cap: %d aggressors of %d fio jobs of 4 KiB randrw at iodepth %d, each limited to %d read + %d write IOPS when protected, all pods capped at DATA_TOTAL_IOPS=%d when capped; victims at once: a BestEffort pod, fio on the node outside any pod, a Guaranteed pod, 4 KiB randread, iodepth 1, %d s per phase; load %s",
		n, s.AggressorJobs, s.AggressorDepth, s.Limit, s.Limit, s.TotalIOPS, s.Seconds, realtest.LoadAverage())
	rs, err := s.Rounds(ctx, rounds)
	if err != nil {
		b.Fatal(err)
	}
	sum := protect.Summarize(rs)
	b.ReportMetric(sum.Ratio(protect.Capped), "p99-capped/alone")
	b.ReportMetric(sum.BesideRatio(protect.OnNode, protect.Capped), "node-p99-capped/alone")
	b.ReportMetric(sum.BesideRatio(protect.Guaranteed, protect.Capped), "guaranteed-p99-capped/alone")
	return fmt.Sprintf("\n%d aggressors; protected: each at %d IOPS; capped: DATA_TOTAL_IOPS=%d\n%s\n%s", n, s.Limit, s.TotalIOPS, protect.Bars(sum, 40), protect.Table(rs))
}

// envInt is the integer in the environment variable name, def when unset.
func envInt(t testing.TB, name string, def int) int {
	v := strings.TrimSpace(os.Getenv(name))
	if v == "" {
		return def
	}
	var n int
	if _, err := fmt.Sscan(v, &n); err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}
