package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
)

// testDataTotalIOPS: DATA_TOTAL_IOPS on this node, whose block IO is cgroup
// v1. The applier, restarted with DATA_TOTAL_IOPS=N, writes N for the data
// disk on the kubepods cgroup the kubelet made, and logs at start that on
// cgroup v1 this does not cap the pods below kubepods. That is measured here
// too: the v1 blkio throttle is flat, so a pod below kubepods (free, not
// limited itself) does far more than N. It logs at start what the cap
// covers (all pods, kube-system included). Restarted with DATA_TOTAL_IOPS=0,
// it clears the cap and leaves the containers' own limits alone; restarted
// with the setting gone after a cap was set, the default (0: off) clears it
// again.
//
// That the cap holds the pods together on cgroup v2 is proven on a v2
// kernel in a VM: applier/cgroup's TestCgroupV2InVM.
func (e *env) testDataTotalIOPS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t.Cleanup(func() { e.restoreApplier(t) })
	restart := func(extra ...string) {
		t.Helper()
		if err := e.g.StopApplier(ctx, false); err != nil {
			t.Fatalf("stopping the applier: %v", err)
		}
		if err := e.g.StartApplier(ctx, extra...); err != nil {
			t.Fatalf("restarting the applier with %v: %v", extra, err)
		}
	}
	waitCap := func(iops uint64) time.Time { t.Helper(); return e.waitNodeCap(ctx, t, iops) }

	restart(fmt.Sprintf("DATA_TOTAL_IOPS=%d", totalIOPS))
	since := waitCap(totalIOPS)
	log := e.applierLog(ctx, t)
	if n, ok := v1Notice(log); !ok {
		t.Errorf("the applier did not log that on cgroup v1 DATA_TOTAL_IOPS does not cap the pods below kubepods; its log:\n%s", tail(log, 20))
	} else if n.DataTotalIOPS != totalIOPS {
		t.Errorf("the applier's cgroup v1 notice names dataTotalIOPS %d, want %d: %s", n.DataTotalIOPS, totalIOPS, n.Msg)
	} else {
		t.Logf("the applier logged: %s (dataTotalIOPS %d)", n.Msg, n.DataTotalIOPS)
	}
	if n, ok := findLog(log, "DATA_TOTAL_IOPS is set", "kube-system"); !ok || n.DataTotalIOPS != totalIOPS {
		t.Errorf("the applier did not log at start that DATA_TOTAL_IOPS=%d caps all pods, kube-system included (found %v: %+v); its log:\n%s", totalIOPS, ok, n, tail(log, 20))
	}
	// What that notice says: a pod below kubepods alone does far more.
	free := e.pod(ctx, t, notOptedIn, "free")
	r, err := e.nextRun(ctx, free, "app", since)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s/free app with kubepods capped at %d: read %.1f write %.1f IOPS", notOptedIn, totalIOPS, r.ReadIOPS, r.WriteIOPS)
	if r.ReadIOPS < 2*totalIOPS || r.WriteIOPS < 2*totalIOPS {
		t.Errorf("%s/free app: read %.1f write %.1f IOPS with kubepods capped at %d, want both above %d: the cap held a pod below kubepods on cgroup v1, contrary to what the applier logs and the README says",
			notOptedIn, r.ReadIOPS, r.WriteIOPS, totalIOPS, 2*totalIOPS)
	}

	restart("DATA_TOTAL_IOPS=0")
	waitCap(0)
	if n, ok := v1Notice(e.applierLog(ctx, t)); ok {
		t.Errorf("with DATA_TOTAL_IOPS=0 (no cap) the applier still logs the cgroup v1 notice: %s", n.Msg)
	}
	// Clearing the cap leaves the containers' own limits.
	limited := e.pod(ctx, t, optedIn, "limited")
	e.waitCgroupBy(ctx, t, time.Now(), limited, "db", dbRead, dbWrite)

	// The default is off: a cap set before and the setting removed is cleared.
	restart(fmt.Sprintf("DATA_TOTAL_IOPS=%d", totalIOPS))
	waitCap(totalIOPS)
	restart()
	waitCap(0)
	if _, ok := findLog(e.applierLog(ctx, t), "DATA_TOTAL_IOPS is set"); ok {
		t.Error("with DATA_TOTAL_IOPS at its default the applier logs that a cap is set")
	}
}

// dataDevices are the devices the applier limits as the data disk.
func (e *env) dataDevices(t *testing.T) []device.Device {
	t.Helper()
	devs, err := (&device.Resolver{}).DataDevices(e.data(), "")
	if err != nil {
		t.Fatal(err)
	}
	return devs
}

// waitNodeCap waits until kubepods's IOPS limits on every data device are
// iops (0: none), 5 s at most, and returns when it saw them.
func (e *env) waitNodeCap(ctx context.Context, t *testing.T, iops uint64) time.Time {
	t.Helper()
	devs := e.dataDevices(t)
	var r, w string
	if err := cluster.Poll(ctx, "kubepods cap", 100*time.Millisecond, 5*time.Second, func() error {
		if r, w = iopsFiles(kubepodsBlkio); !capIs(r, devs, iops) || !capIs(w, devs, iops) {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("DATA_TOTAL_IOPS=%d: %s read_iops_device %q write_iops_device %q, want %d for %v (0: none) within 5s",
			iops, kubepodsBlkio, r, w, iops, devs)
	}
	t.Logf("DATA_TOTAL_IOPS=%d: %s read_iops_device %q write_iops_device %q", iops, kubepodsBlkio, r, w)
	return time.Now()
}

// capIs reports whether a blkio throttle file's contents limit every one of
// devs to iops, or, for iops 0, none of them.
func capIs(content string, devs []device.Device, iops uint64) bool {
	got, err := cgroup.ParseV1File(content)
	if err != nil {
		return false
	}
	for _, d := range devs {
		if v, ok := got[d]; (iops == 0 && ok) || (iops != 0 && v != iops) {
			return false
		}
	}
	return true
}

// notice is a line of the applier's JSON log.
type notice struct {
	Msg           string `json:"msg"`
	DataTotalIOPS uint64 `json:"dataTotalIOPS"`
}

// v1Notice finds, in the applier's log, its start-up notice that on cgroup
// v1 DATA_TOTAL_IOPS does not cap the pods below kubepods.
func v1Notice(log string) (notice, bool) {
	return findLog(log, "cgroup v1", "DATA_TOTAL_IOPS", "not hierarchical")
}

// findLog finds the first line of the applier's JSON log whose message
// holds all of words.
func findLog(log string, words ...string) (notice, bool) {
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var n notice
		if json.Unmarshal(sc.Bytes(), &n) != nil {
			continue
		}
		if !slices.ContainsFunc(words, func(w string) bool { return !strings.Contains(n.Msg, w) }) {
			return n, true
		}
	}
	return notice{}, false
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
