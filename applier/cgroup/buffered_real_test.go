package cgroup

import (
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// TestRealV1BufferedWrites records what the cgroup v1 block throttle does
// to writes through the page cache, which README's limits section tells
// users: it limits only the IO that the cgroup's own processes submit. A
// process in a cgroup limited to 1 MiB/s of writes writes 4 MiB five ways;
// each case says whether the kernel held it to the limit, measured by time
// and by the bytes charged to the cgroup (blkio.throttle.io_service_bytes).
// Held: O_DIRECT, O_DSYNC, and a buffered write followed by the process's
// own fsync (the fsync submits the dirty pages in its context). Not held:
// the same buffered write when the kernel's writeback writes it (a sync(2),
// the flusher threads) — the IO is not even charged to the cgroup, as
// writeback is not attributed to the cgroup that dirtied the pages on v1
// (cgroup v2 attributes it; measured in the v2 node). Under a write IOPS
// limit, a buffered write of 4 KiB blocks then fsync is a few large merged
// IOs, so the limit barely slows it.
func TestRealV1BufferedWrites(t *testing.T) {
	h, dev, tmp := realBlkio(t)
	const (
		limit = 1 << 20 // write bytes/s
		size  = 4 << 20 // bytes written per case
		held  = time.Duration(size / limit * int64(time.Second))
	)
	file := func(name string) string { return filepath.Join(tmp, name) }
	mib := fmt.Sprintf("count=%d", size>>20)
	i := 0
	for _, tc := range []struct {
		name string
		// script is run by sh in the cgroup, with $1 the file to write.
		script string
		held   bool
	}{
		{"O_DIRECT writes are held to the limit", "dd if=/dev/zero of=$1 bs=1M oflag=direct status=none " + mib, true},
		{"O_DSYNC writes are held to the limit", "dd if=/dev/zero of=$1 bs=1M oflag=dsync status=none " + mib, true},
		{"a buffered write and the process's own fsync are held to the limit", "dd if=/dev/zero of=$1 bs=1M conv=fsync status=none " + mib, true},
		{"a buffered write that sync(2) writes back is not held, nor charged", "dd if=/dev/zero of=$1 bs=1M status=none " + mib + " && sync", false},
		{"a buffered write left to the kernel's writeback is not held, nor charged", "dd if=/dev/zero of=$1 bs=1M status=none " + mib, false},
	} {
		i++
		t.Run(tc.name, func(t *testing.T) {
			dir := newRealCgroup(t, h.Dir())
			if _, err := h.Apply(dir, []device.Device{dev}, limits.Limits{WriteBPS: limit}); err != nil {
				t.Fatal(err)
			}
			took := runInCgroup(t, dir, tc.script, file(fmt.Sprintf("data-%d", i)))
			// What the process left dirty is written back now, from
			// outside the cgroup, before the charged bytes are read.
			syscall.Sync()
			charged := ioStat(t, h, dir, dev).WriteBytes
			t.Logf("4 MiB at write-bps=1Mi: %s, %d KiB charged to the cgroup", took.Round(time.Millisecond), charged>>10)
			if tc.held {
				if took < held*8/10 {
					t.Errorf("took %s, want at least %s (80%% of 4 MiB at 1 MiB/s): not held to the limit", took, held*8/10)
				}
				if charged < size {
					t.Errorf("%d bytes charged to the cgroup, want at least the %d written", charged, size)
				}
				return
			}
			if took > held/4 {
				t.Errorf("took %s, want less than %s: the kernel held a buffered write on cgroup v1", took, held/4)
			}
			if charged > size/4 {
				t.Errorf("%d bytes charged to the cgroup, want less than a quarter of the %d written: writeback attributed to it", charged, size)
			}
		})
	}

	t.Run("under a write IOPS limit, a buffered write of 4 KiB blocks and its fsync are a few merged IOs", func(t *testing.T) {
		const iops, n = 50, 200 // 200 direct 4 KiB writes take 4 s
		dir := newRealCgroup(t, h.Dir())
		if _, err := h.Apply(dir, []device.Device{dev}, limits.Limits{WriteIOPS: iops}); err != nil {
			t.Fatal(err)
		}
		count := fmt.Sprintf("count=%d", n)
		direct := runInCgroup(t, dir, "dd if=/dev/zero of=$1 bs=4k oflag=direct status=none "+count, file("iops-direct"))
		ios0 := ioStat(t, h, dir, dev).WriteIOs
		buffered := runInCgroup(t, dir, "dd if=/dev/zero of=$1 bs=4k conv=fsync status=none "+count, file("iops-buffered"))
		ios := ioStat(t, h, dir, dev).WriteIOs - ios0
		t.Logf("%d × 4 KiB at write-iops=%d: O_DIRECT %s; buffered + fsync %s, %d write IOs charged", n, iops, direct.Round(time.Millisecond), buffered.Round(time.Millisecond), ios)
		if direct < 3*time.Second {
			t.Errorf("O_DIRECT took %s, want about 4 s", direct)
		}
		if buffered > direct/4 || ios > n/4 {
			t.Errorf("buffered + fsync took %s with %d IOs, want under a quarter of O_DIRECT's %s and of its %d IOs", buffered, ios, direct, n)
		}
	})
}

// ioStat returns the cgroup's IO counters on dev.
func ioStat(t *testing.T, h *Hierarchy, dir string, dev device.Device) IOStat {
	t.Helper()
	st, err := h.Stats(dir, []device.Device{dev})
	if err != nil {
		t.Fatal(err)
	}
	return st[dev]
}
