// Package realtest is for tests that need a real component (a kube-apiserver,
// containerd, dockerd, the kernel's block throttle, qemu): under CI=true a
// missing component fails the test; elsewhere the test is skipped with a
// message that says how to get it.
package realtest

import (
	"os"
	"testing"
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

// Root stops the test unless it runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "the test must run as root", "sudo make test")
	}
}
