// Package realtest is for tests that need a real component (a kube-apiserver,
// containerd, dockerd, the kernel's block throttle, qemu): under CI=true a
// missing component fails the test; elsewhere the test is skipped with a
// message that says how to get it.
package realtest

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// InCI reports whether the tests run in CI, where nothing may be skipped.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing stops the test because a real component is missing: what names
// the component and why it is missing, how tells the reader how to get it.
func Missing(t testing.TB, what, how string) {
	t.Helper()
	if InCI() {
		t.Fatalf("real component missing under CI=true: %s (get it with: %s)", what, how)
	}
	t.Skipf("skipping: %s (get it with: %s)", what, how)
}

// Root stops the test unless it runs as root, and skips it under -short:
// it is a test of real components.
func Root(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root and real components; not with -short (make unit-test)")
	}
	if os.Geteuid() != 0 {
		Missing(t, "the test must run as root", "sudo make test")
	}
}

// hostLockPath is the lock that keeps tests of different packages, which
// go test runs in parallel, from using the host's shared resources at once:
// container runtimes, the kubepods cgroups, a kubelet.
const hostLockPath = "/tmp/kubediskguard-host.lock"

// HoldHostLock waits until no other process holds the host lock, and holds
// it until this process exits: for test packages whose tests use the host
// one after the other, so that another package's tests do not take it
// between each of them (every wait for the lock can be minutes).
var HoldHostLock = sync.OnceValue(func() error {
	f, err := os.OpenFile(hostLockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return fmt.Errorf("locking %s: %w", hostLockPath, err)
	}
	heldByProcess = f // never closed: the kernel releases it at exit
	processHolds.Store(true)
	return nil
})

// heldByProcess keeps the file HoldHostLock locked open; processHolds says
// it is held, for HostLock.
var (
	heldByProcess *os.File
	processHolds  atomic.Bool
)

// HostLock waits until no other test holds the host lock, and holds it
// until the test ends (at once when this process holds it: HoldHostLock).
func HostLock(t testing.TB) {
	t.Helper()
	if processHolds.Load() {
		return
	}
	f, err := os.OpenFile(hostLockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("locking %s: %v", hostLockPath, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Logf("waited %s for other tests using the host's runtimes and cgroups", d.Round(time.Millisecond))
	}
	t.Cleanup(func() { f.Close() })
}

// LoadAverage is the host's 1-, 5- and 15-minute load averages, for the logs
// of measurements that other work on the host can slow.
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
