package runtimetest

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

// CheckListed checks what every runtime must say of a running pod
// container: List returns exactly want, want.CgroupDir is the cgroup the
// kernel has its process in (/proc/PID/cgroup), and Container(want.ID)
// returns want. It logs how long List and Container took.
func CheckListed(ctx context.Context, t *testing.T, rt runtime.Runtime, h *cgroup.Hierarchy, want runtime.Container) {
	t.Helper()
	start := time.Now()
	list, err := rt.List(ctx)
	t.Logf("List took %s", time.Since(start).Round(time.Microsecond))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(list, []runtime.Container{want}) {
		t.Fatalf("List:\n got %+v\nwant [%+v]", list, want)
	}
	procDir, err := h.ProcessDir("", want.PID)
	if err != nil {
		t.Fatal(err)
	}
	if procDir != want.CgroupDir {
		t.Errorf("CgroupDir %s, but /proc/%d/cgroup says %s", want.CgroupDir, want.PID, procDir)
	}
	start = time.Now()
	got, err := rt.Container(ctx, want.ID)
	t.Logf("Container took %s", time.Since(start).Round(time.Microsecond))
	if err != nil || got != want {
		t.Errorf("Container(%s) = %+v, %v; want %+v", want.Name, got, err, want)
	}
}
