package device

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// TestRealRootFilesystem resolves the machine's own root filesystem through
// the real /proc/self/mountinfo and /sys, and checks the answer against
// stat(2).
func TestRealRootFilesystem(t *testing.T) {
	var st syscall.Stat_t
	if err := syscall.Stat("/", &st); err != nil {
		t.Fatal(err)
	}
	if FromRdev(uint64(st.Dev)).Major == 0 {
		realtest.Missing(t, "the root filesystem is not on a block device (a container's overlay?)", "run the tests on a VM or host whose / is a disk")
	}
	if _, err := os.Stat("/sys/dev/block"); err != nil {
		realtest.Missing(t, "sysfs is not mounted at /sys", "mount -t sysfs sysfs /sys")
	}
	var r Resolver

	m, err := r.Mount("/")
	if err != nil {
		t.Fatal(err)
	}
	if m.MountPoint != "/" || m.Device != FromRdev(uint64(st.Dev)) {
		t.Errorf("Mount(/) = %+v; stat says device %v", m, FromRdev(uint64(st.Dev)))
	}
	d, err := r.ForMount("/")
	if err != nil {
		t.Fatal(err)
	}
	if d.Major == 0 {
		t.Fatalf("ForMount(/) = %v, want a block device", d)
	}
	want, err := r.Disk(FromRdev(uint64(st.Dev)))
	if err != nil || d != want {
		t.Errorf("ForMount(/) = %v, but the disk of stat's device is %v, %v", d, want, err)
	}
	t.Logf("/ is on %s (%s, %s), limited as %v", m.Source, m.FSType, m.Device, d)

	// A directory below / that is not a mount point resolves to the same
	// disk, and a test's temporary directory is on some block device or
	// tmpfs; resolve it when it is a block device.
	tmp := t.TempDir()
	var tst syscall.Stat_t
	if err := syscall.Stat(tmp, &tst); err != nil {
		t.Fatal(err)
	}
	if FromRdev(uint64(tst.Dev)).Major != 0 {
		got, err := r.ForMount(tmp)
		if err != nil {
			t.Fatal(err)
		}
		if want, _ := r.Disk(FromRdev(uint64(tst.Dev))); got != want {
			t.Errorf("ForMount(%s) = %v, want %v", tmp, got, want)
		}
	}

	// The disk's own node in /dev, when there is one, resolves to the same
	// device through stat's st_rdev.
	dir, err := filepath.EvalSymlinks(filepath.Join("/sys/dev/block", d.String()))
	if err != nil {
		t.Fatal(err)
	}
	node := filepath.Join("/dev", filepath.Base(dir))
	if _, err := os.Stat(node); err == nil {
		got, err := r.ForList(node)
		if err != nil || len(got) != 1 || got[0] != d {
			t.Errorf("ForList(%s) = %v, %v; want [%v]", node, got, err, d)
		}
	}
}
