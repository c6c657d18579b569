package app_test

// The data disk on a real mount: a filesystem on a loop device mounted at
// DATA_MOUNT after the applier started, unmounted, and another disk mounted
// there, with a running container on real containerd, the kernel's blkio
// throttle and CHECK_INTERVAL far longer than the test's waits, so the
// mount watch, not the periodic pass, is what reacts.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/hack/loopdisk"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

func TestDataDiskMountedLater(t *testing.T) {
	p := controlPlane(t)
	d := runtimetest.StartContainerd(t)
	root := newDisk(t) // the root disk: never to be limited here
	rootfs := runtimetest.Rootfs(t, d.Dir())
	ns := p.namespace(t)
	first, second := loopdisk.New(t, 64), loopdisk.New(t, 64)
	mount, err := os.MkdirTemp("/var/tmp", "kubediskguard-datamount-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(mount) })

	pod := onNode(t, d, p.createPod(t, ns, "app", limits.Resolved{"app": {ReadIOPS: 100}}, "app"))
	c := run(t, d, root, rootfs, pod, "app", nil, true)
	const interval = "1h" // the periodic pass never runs during the test
	a := startApplier(t, p, append(containerdArgs(d, interval), "--data-mount", mount)...)

	// Not ready, saying why, and nothing limited: not the root disk either.
	eventually(t, 10*time.Second, func() error {
		code, body := httpGet("http://" + a.probe + "/readyz")
		if code != 503 || !strings.Contains(body, "waiting for the data disk") || !strings.Contains(body, "is not a mount point") {
			return fmt.Errorf("/readyz: %d %s", code, body)
		}
		return nil
	})
	_, body := httpGet("http://" + a.probe + "/readyz")
	t.Logf("before the mount, /readyz: %s", strings.TrimSpace(body))
	if code, body := httpGet("http://" + a.probe + "/healthz"); code != 200 {
		t.Errorf("/healthz while waiting for the data disk: %d %s; waiting is not being stuck", code, body)
	}
	time.Sleep(300 * time.Millisecond)
	if got, err := root.h.Read(c.dir); err != nil || len(got) != 0 {
		t.Fatalf("with no data disk mounted the container's cgroup holds %v (%v), want no limits at all", got, err)
	}
	if v := sample(a.scrape(t), "kubediskguard_applier_data_devices"); v != 0 {
		t.Errorf("kubediskguard_applier_data_devices = %v before the mount, want 0", v)
	}

	limitedOn := func(dk *loopdisk.Disk, want uint64, what string) {
		t.Helper()
		start := time.Now()
		eventually(t, 3*time.Second, func() error {
			got, err := root.h.Read(c.dir)
			if err != nil {
				return err
			}
			if got[dk.Dev].ReadIOPS != want || got[root.dev] != (limits.Limits{}) || len(got) > 1 || (want == 0 && len(got) != 0) {
				return fmt.Errorf("the container's cgroup holds %v, want read-iops=%d on %s only", got, want, dk.Dev)
			}
			return nil
		})
		t.Logf("%s: %s read-iops=%d in the container's cgroup %s later", what, dk.Dev, want, time.Since(start).Round(time.Millisecond))
	}

	first.Mount(t, mount)
	limitedOn(first, 100, "first disk mounted")
	a.waitReady(t, 3*time.Second)
	if v := sample(a.scrape(t), "kubediskguard_applier_data_devices"); v != 1 {
		t.Errorf("kubediskguard_applier_data_devices = %v with the disk mounted, want 1", v)
	}
	eventually(t, 10*time.Second, func() error {
		for _, ev := range p.events(t, pod.Pod) {
			if ev.Reason == "IOLimitsApplied" && strings.Contains(ev.Message, fmt.Sprintf("on %s (%s)", first.Dev, mount)) {
				t.Logf("event: %s", ev.Message)
				return nil
			}
		}
		return fmt.Errorf("no IOLimitsApplied event naming %s (%s)", first.Dev, mount)
	})

	// The kernel enforces it: direct reads of a file on the loop disk by a
	// process in the container's cgroup.
	file := filepath.Join(mount, "read.dat")
	if err := os.WriteFile(file, make([]byte, 200*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	// 20 reads first, untimed: the throttle lets a new slice's allowance
	// through at once (measured: 200 reads at 107.7/s against 100 in a
	// cold CI run), and the reads after it go at the limit's pace; then
	// 200 reads timed inside the cgroup, without the shell's start.
	ddRate := func() float64 {
		dd := exec.Command("sh", "-c", `echo $$ > "$1" && dd if="$2" of=/dev/null bs=4k count=20 iflag=direct status=none && s=$(date +%s%N) && dd if="$2" of=/dev/null bs=4k count=200 iflag=direct status=none && echo "$s $(date +%s%N)"`, "sh",
			filepath.Join(c.dir, "cgroup.procs"), file)
		out, err := dd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", dd, err, out)
		}
		var from, to int64
		if _, err := fmt.Sscan(string(out), &from, &to); err != nil || to <= from {
			t.Fatalf("%s: want two times in ns, have %q (%v)", dd, out, err)
		}
		rate := 200 / time.Duration(to-from).Seconds()
		t.Logf("200 direct 4 KiB reads on %s from the container's cgroup, after 20 untimed: %.1f IO/s (limit 100)", first.Dev, rate)
		return rate
	}
	rate := onceMoreIfBelow(t, "the loop disk's reads", ddRate(), 70, ddRate)
	if rate > 100*tolerance || rate < 70 {
		t.Errorf("%.1f read IO/s on the loop disk, want about 100", rate)
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}

	first.Unmount(t, mount)
	limitedOn(first, 0, "unmounted")
	eventually(t, 3*time.Second, func() error {
		if code, body := httpGet("http://" + a.probe + "/readyz"); code != 503 {
			return fmt.Errorf("/readyz: %d %s", code, body)
		}
		return nil
	})

	second.Mount(t, mount)
	limitedOn(second, 100, "another disk mounted")
	first.Mount(t, mount) // mounted over it: the disk on top is the data disk
	limitedOn(first, 100, "the first disk mounted over it")

	// Stopped as on SIGTERM (a rolling update): the limits stay.
	a.stop(t)
	time.Sleep(200 * time.Millisecond)
	if got, err := root.h.Read(c.dir); err != nil || got[first.Dev].ReadIOPS != 100 {
		t.Errorf("after the applier stopped the container's cgroup holds %v (%v), want read-iops=100 on %s kept", got, err, first.Dev)
	}
	first.Unmount(t, mount) // the top one first
	second.Unmount(t, mount)
}
