package device_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/loopdisk"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// watch runs WatchMounts of the real /proc/self until the test ends and
// returns a channel that receives a value per notification.
func watch(t *testing.T) <-chan struct{} {
	t.Helper()
	ch := make(chan struct{}, 64)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- (&device.Resolver{}).WatchMounts(ctx, func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("WatchMounts returned %v after its context ended, want nil", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("WatchMounts did not return within 5s of its context's end")
		}
	})
	time.Sleep(50 * time.Millisecond) // let it open the file before anything changes
	return ch
}

// notified waits for a notification, draining any others that came with it.
func notified(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("no mount table change notified within 5s of %s", what)
	}
	time.Sleep(20 * time.Millisecond)
	for len(ch) > 0 {
		<-ch
	}
}

// TestRealWatchMounts: the kernel's mountinfo poll notifies a mount and an
// unmount in this mount namespace, and nothing while the table is still.
func TestRealWatchMounts(t *testing.T) {
	realtest.Root(t)
	dir := t.TempDir()
	ch := watch(t)
	select {
	case <-ch:
		t.Fatal("notified with no mount change")
	case <-time.After(200 * time.Millisecond):
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mounting a tmpfs at %s: %v", dir, err)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			syscall.Unmount(dir, 0)
		}
	})
	notified(t, ch, "a mount")
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	notified(t, ch, "an unmount")
}

// TestRealDataDiskOnLoop resolves a data mount on this host's kernel: a
// directory of the root filesystem, then a loop disk mounted on it (the
// disk mounted after boot), a bind mount of a root-filesystem directory
// (what a DaemonSet's hostPath shows before the disk is mounted), and the
// directory again after the unmount.
func TestRealDataDiskOnLoop(t *testing.T) {
	realtest.Root(t)
	var r device.Resolver
	root, ok, err := r.RootDisk()
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		realtest.Missing(t, "a root filesystem on a block device", "run on a VM or host whose / is a disk")
	}
	base, err := os.MkdirTemp("/var/tmp", "kdg-datadisk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	data, plain := filepath.Join(base, "data"), filepath.Join(base, "plain")
	for _, d := range []string{data, plain} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := r.DataDevices(data, ""); len(got) != 1 || got[0] != root {
		t.Skipf("%s is not on the root disk %s (%v): the test needs it there", base, root, got)
	}
	waiting := func(what string, want ...string) {
		t.Helper()
		d, err := r.DataDisk(device.Settings{Mount: data})
		if !errors.Is(err, device.ErrNoDataDisk) {
			t.Fatalf("%s: DataDisk = %v, %v; want ErrNoDataDisk", what, d, err)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not say %q", what, err, w)
			}
		}
		t.Logf("%s: %v", what, err)
	}
	disk := loopdisk.New(t, 64)
	ch := watch(t)

	waiting("a directory on the root disk", "is not a mount point")
	if d, err := r.DataDisk(device.Settings{Mount: data, AllowRootDisk: true}); err != nil || len(d.Devices) != 1 || d.Devices[0] != root {
		t.Errorf("with DATA_ALLOW_ROOT_DISK: %v, %v; want the root disk %s", d, err, root)
	}

	disk.Mount(t, data)
	notified(t, ch, "mounting the loop disk")
	d, err := r.DataDisk(device.Settings{Mount: data})
	if err != nil || !d.Equal(device.DataDisk{Devices: []device.Device{disk.Dev}, Source: data}) {
		t.Fatalf("with %s mounted: DataDisk = %v, %v; want %s (%s)", disk.Loop, d, err, disk.Dev, data)
	}
	t.Logf("with %s mounted: %s", disk.Loop, d)

	disk.Unmount(t, data)
	notified(t, ch, "unmounting the loop disk")
	waiting("after the unmount", "is not a mount point")

	if err := syscall.Mount(plain, data, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(data, 0) })
	notified(t, ch, "a bind mount")
	waiting("a bind mount of a root-disk directory", "on the root disk "+root.String())
}
