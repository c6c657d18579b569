package cgroup

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

const ioCount = 200 // 4 KiB direct IOs per measurement; 4 s at 50 IOPS

// realBlkio returns the host's cgroup v1 blkio hierarchy, the device of a
// fresh directory on a block device, and that directory; or stops the test.
func realBlkio(t *testing.T) (*Hierarchy, device.Device, string) {
	t.Helper()
	realtest.Root(t)
	h, err := Open(DefaultRoot, Auto)
	if err != nil || h.Version() != V1 {
		realtest.Missing(t, "the host's cgroup v1 blkio controller at /sys/fs/cgroup/blkio (this test drives the host's block throttle)",
			"run on a cgroup v1 or hybrid host; cgroup v2 io.max is tested in a VM")
	}
	if _, err := exec.LookPath("dd"); err != nil {
		realtest.Missing(t, "dd", "apt-get install coreutils")
	}
	dir := t.TempDir()
	var r device.Resolver
	dev, err := r.ForMount(dir)
	if err != nil {
		realtest.Missing(t, "a temporary directory on a block device ("+err.Error()+")", "set TMPDIR to a directory on a disk")
	}
	return h, dev, dir
}

// newRealCgroup creates a private blkio cgroup below parent, removed when
// the test ends however it ends.
func newRealCgroup(t *testing.T, parent string) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(parent, "kubediskguard-test-"+hex.EncodeToString(b))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Move any process left behind to the parent, then remove.
		if procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
			for _, pid := range strings.Fields(string(procs)) {
				_ = os.WriteFile(filepath.Join(parent, "cgroup.procs"), []byte(pid), 0)
			}
		}
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("removing test cgroup %s: %v", dir, err)
		}
	})
	return dir
}

// ddInCgroup runs dd with args as a process of the cgroup dir from its
// first instruction on, and returns the IO rate it got.
func ddInCgroup(t *testing.T, dir string, args ...string) float64 {
	t.Helper()
	return ioCount / runInCgroup(t, dir, `exec dd status=none bs=4k "$@"`, args...).Seconds()
}

// runInCgroup runs sh -c script with args ($1...) in the cgroup dir from
// its first instruction on, and returns how long it took.
func runInCgroup(t *testing.T, dir, script string, args ...string) time.Duration {
	t.Helper()
	// $0 is the cgroup's procs file.
	cmd := exec.Command("sh", append([]string{"-c", `echo $$ > "$0" && ` + script, filepath.Join(dir, "cgroup.procs")}, args...)...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return elapsed
}

// TestRealBlkioThrottle sets IOPS limits through Apply on a private cgroup of
// the host and measures that the kernel enforces them on a process inside it.
func TestRealBlkioThrottle(t *testing.T) {
	h, dev, tmp := realBlkio(t)
	const limit = 50
	file := filepath.Join(tmp, "data")
	// Written here, outside the throttled cgroup.
	if err := os.WriteFile(file, make([]byte, ioCount*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if f, err := os.Open(file); err == nil {
		_ = f.Sync()
		f.Close()
	}
	count := "count=" + strconv.Itoa(ioCount)
	tests := map[string]struct {
		limits limits.Limits
		dd     []string
	}{
		"a read IOPS limit throttles direct reads": {
			limits: limits.Limits{ReadIOPS: limit},
			dd:     []string{"if=" + file, "of=/dev/null", "iflag=direct", count},
		},
		"a write IOPS limit throttles direct writes": {
			limits: limits.Limits{WriteIOPS: limit},
			dd:     []string{"if=/dev/zero", "of=" + file, "oflag=direct", "conv=notrunc", count},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			dir := newRealCgroup(t, h.Dir())
			devs := []device.Device{dev}

			changed, err := h.Apply(dir, devs, tc.limits)
			if err != nil || !changed {
				t.Fatalf("Apply = %v, %v", changed, err)
			}
			if got, err := h.Read(dir); err != nil || got[dev] != tc.limits {
				t.Fatalf("Read = %v, %v; want %v on %v", got, err, tc.limits, dev)
			}
			// The kernel's own rendering reads back as already set.
			if changed, err := h.Apply(dir, devs, tc.limits); err != nil || changed {
				t.Fatalf("second Apply = %v, %v; want no write", changed, err)
			}

			throttled := ddInCgroup(t, dir, tc.dd...)
			t.Logf("limit %d IOPS on %v: measured %.1f IOPS", limit, dev, throttled)
			if throttled > 1.05*limit {
				t.Errorf("measured %.1f IOPS, more than 5%% over the limit of %d", throttled, limit)
			}
			stats, err := h.Stats(dir, devs)
			if err != nil {
				t.Fatal(err)
			}
			if s := stats[dev]; s.ReadIOs+s.WriteIOs < ioCount || s.ReadBytes+s.WriteBytes < ioCount*4096 {
				t.Errorf("Stats = %+v, want at least %d IOs of 4 KiB", s, ioCount)
			}

			if changed, err := h.Clear(dir, devs); err != nil || !changed {
				t.Fatalf("Clear = %v, %v", changed, err)
			}
			if got, err := h.Read(dir); err != nil || len(got) != 0 {
				t.Fatalf("Read after Clear = %v, %v; want no limits", got, err)
			}
			free := ddInCgroup(t, dir, tc.dd...)
			t.Logf("unthrottled: measured %.1f IOPS", free)
			if free < 10*limit {
				t.Errorf("unthrottled %.1f IOPS, want far more than the limit %d", free, limit)
			}
		})
	}
}

// TestRealBlkioErrors checks the errors of the real kernel: a device it does
// not know, and a cgroup that was removed.
func TestRealBlkioErrors(t *testing.T) {
	h, dev, _ := realBlkio(t)
	dir := newRealCgroup(t, h.Dir())

	bogus := device.Device{Major: dev.Major, Minor: dev.Minor + 1000}
	_, err := h.Apply(dir, []device.Device{bogus}, limits.Limits{ReadIOPS: 5})
	want := `writing "` + bogus.String() + ` 5" to ` + filepath.Join(dir, V1File(limits.ReadIOPS)) + ": "
	if err == nil || !strings.HasPrefix(err.Error(), want) || errors.Is(err, ErrCgroupGone) {
		t.Errorf("Apply on an unknown device = %v, want an error starting %q that is not ErrCgroupGone", err, want)
	} else {
		t.Logf("the kernel refuses an unknown device with: %v", err)
	}

	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	_, err = h.Apply(dir, []device.Device{dev}, limits.Limits{ReadIOPS: 5})
	if !errors.Is(err, ErrCgroupGone) {
		t.Errorf("Apply on a removed cgroup = %v, want ErrCgroupGone", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Apply re-created the removed cgroup %s", dir)
	}
}

// TestRealV1ThrottleIsFlat records a kernel fact the applier must design
// around: on cgroup v1 the block throttle is not hierarchical, so a limit on
// a parent (such as kubepods) does not limit processes in its children (the
// pods' containers). Only cgroup v2's io.max applies to a whole subtree.
func TestRealV1ThrottleIsFlat(t *testing.T) {
	h, dev, tmp := realBlkio(t)
	file := filepath.Join(tmp, "data")
	if err := os.WriteFile(file, make([]byte, ioCount*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	parent := newRealCgroup(t, h.Dir())
	child := newRealCgroup(t, parent)
	if _, err := h.Apply(parent, []device.Device{dev}, limits.Limits{ReadIOPS: 50}); err != nil {
		t.Fatal(err)
	}
	rate := ddInCgroup(t, child, "if="+file, "of=/dev/null", "iflag=direct", "count="+strconv.Itoa(ioCount))
	t.Logf("parent limited to 50 read IOPS; a process in its child measured %.1f IOPS", rate)
	if rate < 500 {
		t.Errorf("the child got %.1f IOPS: the v1 throttle looks hierarchical on this kernel, so a kubepods limit would work", rate)
	}
}

// TestRealDetect opens the host's cgroup hierarchy with auto detection.
func TestRealDetect(t *testing.T) {
	h, err := Open("", Auto)
	if err != nil {
		realtest.Missing(t, "a cgroup hierarchy with a block IO controller at /sys/fs/cgroup ("+err.Error()+")", "mount cgroup v1 blkio or cgroup2 with the io controller")
	}
	t.Logf("detected %v at %s", h.Version(), h.Dir())
	// On a hybrid host (v1 controllers and cgroup2 at unified), IO is v1.
	if _, err := os.Stat("/sys/fs/cgroup/unified/cgroup.controllers"); err == nil && h.Version() != V1 {
		t.Errorf("hybrid host detected as %v, want v1", h.Version())
	}
	// Our own process's cgroup is found and exists.
	dir, err := h.ProcessDir("", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Errorf("ProcessDir(self) = %s: %v", dir, err)
	}
}
