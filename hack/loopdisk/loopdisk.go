// Package loopdisk makes real disks for tests on a host whose kernel has
// loop devices: an ext4 filesystem in an image file, attached to a loop
// device, mounted where the test says; everything is unmounted, detached
// and removed when the test ends.
package loopdisk

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// Disk is a loop device holding an ext4 filesystem.
type Disk struct {
	Image  string        // the backing file
	Loop   string        // /dev/loopN
	Dev    device.Device // its device number, 7:N
	mounts []string
}

// New makes a disk of mib MiB, or stops the test when loop devices or
// mkfs.ext4 are missing (failing it under CI).
func New(t testing.TB, mib int) *Disk {
	t.Helper()
	realtest.Root(t)
	for _, tool := range []string{"losetup", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			realtest.Missing(t, tool, "apt-get install mount e2fsprogs")
		}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		realtest.Missing(t, "loop devices (/dev/loop-control)", "modprobe loop")
	}
	d := &Disk{Image: filepath.Join(t.TempDir(), "disk.img")}
	if err := os.WriteFile(d.Image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(d.Image, int64(mib)<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", d.Image).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %s: %v: %s", d.Image, err, out)
	}
	out, err := exec.Command("losetup", "--find", "--show", d.Image).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s", d.Image, err, out)
	}
	d.Loop = strings.TrimSpace(string(out))
	t.Cleanup(func() { d.close(t) })
	var st syscall.Stat_t
	if err := syscall.Stat(d.Loop, &st); err != nil {
		t.Fatal(err)
	}
	d.Dev = device.FromRdev(st.Rdev)
	return d
}

// Mount mounts the disk's filesystem at dir (which must exist).
func (d *Disk) Mount(t testing.TB, dir string) {
	t.Helper()
	if err := syscall.Mount(d.Loop, dir, "ext4", 0, ""); err != nil {
		t.Fatalf("mounting %s at %s: %v", d.Loop, dir, err)
	}
	d.mounts = append(d.mounts, dir)
}

// Unmount unmounts the disk from dir.
func (d *Disk) Unmount(t testing.TB, dir string) {
	t.Helper()
	if err := unmount(dir); err != nil {
		t.Fatal(err)
	}
	if i := slices.Index(d.mounts, dir); i >= 0 {
		d.mounts = slices.Delete(d.mounts, i, i+1)
	}
}

func unmount(dir string) error {
	var err error
	for range 50 { // a process that just left it may still hold it
		if err = syscall.Unmount(dir, 0); !errors.Is(err, syscall.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("unmounting %s: %w", dir, err)
	}
	return nil
}

// close unmounts what is still mounted and detaches the loop device.
func (d *Disk) close(t testing.TB) {
	for i := len(d.mounts) - 1; i >= 0; i-- {
		if err := unmount(d.mounts[i]); err != nil {
			t.Errorf("cleaning up: %v", err)
		}
	}
	if out, err := exec.Command("losetup", "--detach", d.Loop).CombinedOutput(); err != nil {
		t.Errorf("cleaning up: losetup --detach %s: %v: %s", d.Loop, err, out)
	}
	backing := filepath.Join("/sys/block", filepath.Base(d.Loop), "loop", "backing_file")
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(backing); err != nil {
			return
		}
	}
	t.Errorf("cleaning up: %s still attached", d.Loop)
}
