package app

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/loopdisk"
	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

var (
	vda   = device.Device{Major: 254, Minor: 0}
	nvme0 = device.Device{Major: 259, Minor: 0}
)

// fakeCgroups lays out a cgroup root of version v in a temporary directory
// with a kubepods tree (QoS class, pod, container, and a pod cgroup where
// the io controller is not enabled) and a cgroup outside it, and a /proc
// whose init is in the root cgroup. The limits are set through the
// hierarchy's own Apply.
type fakeCgroups struct {
	h                                *cgroup.Hierarchy
	root, proc                       string
	kubepods, qos, pod, ctr, outside string
}

func newFakeCgroups(t *testing.T, v cgroup.Version) *fakeCgroups {
	t.Helper()
	f := &fakeCgroups{root: t.TempDir(), proc: t.TempDir()}
	files := []string{"io.max"}
	dir := f.root
	procLine := "0::/\n"
	if v == cgroup.V1 {
		files = nil
		for _, d := range limits.Dimensions {
			files = append(files, cgroup.V1File(d))
		}
		dir = filepath.Join(f.root, "blkio")
		procLine = "4:blkio:/\n"
	}
	mk := func(rel string, files ...string) string {
		t.Helper()
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, name := range files {
			if err := os.WriteFile(filepath.Join(p, name), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	mk(".", files...)
	if v == cgroup.V2 {
		if err := os.WriteFile(filepath.Join(f.root, "cgroup.controllers"), []byte("cpu io memory\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f.kubepods = mk("kubepods", files...)
	f.qos = mk("kubepods/besteffort", files...)
	f.pod = mk("kubepods/besteffort/pod1", files...)
	f.ctr = mk("kubepods/besteffort/pod1/c1", files...)
	mk("kubepods/burstable/pod2") // no io files: the controller is not enabled there
	f.outside = mk("system.slice/other", files...)
	if err := os.MkdirAll(filepath.Join(f.proc, "1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.proc, "1", "cgroup"), []byte(procLine), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := cgroup.Open(f.root, v)
	if err != nil {
		t.Fatal(err)
	}
	f.h = h
	return f
}

func (f *fakeCgroups) set(t *testing.T, dir string, dev device.Device, l limits.Limits) {
	t.Helper()
	if _, err := f.h.Apply(dir, []device.Device{dev}, l); err != nil {
		t.Fatal(err)
	}
}

func (f *fakeCgroups) limit(t *testing.T, dir string, dev device.Device) limits.Limits {
	t.Helper()
	got, err := f.h.Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	return got[dev]
}

func TestReset(t *testing.T) {
	capped := limits.Limits{ReadIOPS: 3000, WriteIOPS: 3000}
	l500 := limits.Limits{ReadIOPS: 500, WriteIOPS: 500, WriteBPS: 50 << 20}
	for _, v := range []cgroup.Version{cgroup.V1, cgroup.V2} {
		t.Run("clears the node cap and every pod's and container's limits on "+v.String()+", and nothing the second time", func(t *testing.T) {
			f := newFakeCgroups(t, v)
			f.set(t, f.kubepods, vda, capped)
			f.set(t, f.ctr, vda, l500)
			f.set(t, f.pod, vda, l500)
			f.set(t, f.outside, vda, l500)
			args := []string{"reset", "--all-devices", "--cgroup-root", f.root, "--cgroup-version", v.String(), "--proc-root", f.proc}
			o, err := ParseOptions(args, func(string) (string, bool) { return "", false })
			if err != nil {
				t.Fatal(err)
			}
			var out strings.Builder
			if err := Reset(context.Background(), o, &out); err != nil {
				t.Fatalf("reset: %v", err)
			}
			t.Logf("first run:\n%s", out.String())
			for _, dir := range []string{f.kubepods, f.pod, f.ctr} {
				if got := f.limit(t, dir, vda); got != (limits.Limits{}) {
					t.Errorf("%s still limits %s: %v", dir, vda, got)
				}
				if !strings.Contains(out.String(), "cleared 254:0 (") || !strings.Contains(out.String(), " from "+dir+"\n") {
					t.Errorf("the output does not say that it cleared %s:\n%s", dir, out.String())
				}
			}
			if got := f.limit(t, f.outside, vda); got != l500 {
				t.Errorf("the cgroup outside kubepods %s: %v, want its %v left alone", f.outside, got, l500)
			}
			if !strings.Contains(out.String(), "cleared the limits on every device in 3 of 6 cgroups") {
				t.Errorf("the summary does not say 3 of 6 cgroups:\n%s", out.String())
			}

			out.Reset()
			if err := Reset(context.Background(), o, &out); err != nil {
				t.Fatalf("second reset: %v", err)
			}
			if !strings.Contains(out.String(), "nothing to clear") || strings.Contains(out.String(), "cleared ") {
				t.Errorf("second run:\n%s\nwant it to say there is nothing to clear", out.String())
			}
		})
	}

	t.Run("clears only the listed devices", func(t *testing.T) {
		f := newFakeCgroups(t, cgroup.V1) // one device per file: the fake files do not merge lines
		f.set(t, f.ctr, vda, l500)
		var out strings.Builder
		res, err := resetTree(f.h, []device.Device{nvme0}, &out)
		if err != nil {
			t.Fatal(err)
		}
		if res.cleared != 0 || f.limit(t, f.ctr, vda) != l500 {
			t.Errorf("cleared %d cgroups, %s holds %v: want another device's limits left alone", res.cleared, f.ctr, f.limit(t, f.ctr, vda))
		}
		if _, err := resetTree(f.h, []device.Device{vda}, &out); err != nil || f.limit(t, f.ctr, vda) != (limits.Limits{}) {
			t.Errorf("reset of %s: %v; %s holds %v", vda, err, f.ctr, f.limit(t, f.ctr, vda))
		}
	})

	t.Run("says so when there is no kubepods cgroup", func(t *testing.T) {
		f := newFakeCgroups(t, cgroup.V2)
		if err := os.RemoveAll(f.kubepods); err != nil {
			t.Fatal(err)
		}
		o := &Options{CgroupRoot: f.root, CgroupVersion: cgroup.V2, ProcRoot: f.proc, Reset: ResetOptions{Run: true, AllDevices: true}}
		var out strings.Builder
		if err := Reset(context.Background(), o, &out); err != nil || !strings.Contains(out.String(), "no kubepods cgroup") {
			t.Errorf("Reset = %v, output %q; want nil and a word that there is no kubepods cgroup", err, out.String())
		}
	})

	t.Run("without a data disk it fails, naming the way out", func(t *testing.T) {
		f := newFakeCgroups(t, cgroup.V2)
		o := &Options{CgroupRoot: f.root, CgroupVersion: cgroup.V2, ProcRoot: f.proc, DataMount: "/nonexistent-kdg", Reset: ResetOptions{Run: true}}
		err := Reset(context.Background(), o, &strings.Builder{})
		if err == nil || !strings.Contains(err.Error(), "--data-mount") || !strings.Contains(err.Error(), "--all-devices") {
			t.Errorf("Reset = %v, want an error naming the data mount and --all-devices", err)
		}
	})
}

// TestRealReset runs reset on the host's cgroup v1 kernel: a private blkio
// cgroup subtree is bind-mounted as the root of a hierarchy under a
// temporary cgroup root, so it has a kubepods tree of its own. The data
// disk is a loop disk mounted at the data mount; a second loop disk's
// limits, which are not the data disk's, stay — the kernel keeps one line
// per device.
func TestRealReset(t *testing.T) {
	realtest.Root(t)
	h, err := cgroup.Open(cgroup.DefaultRoot, cgroup.Auto)
	if err != nil || h.Version() != cgroup.V1 {
		realtest.Missing(t, "the host's cgroup v1 blkio controller", "run on a cgroup v1 or hybrid host; v2 reset is tested with temporary cgroup roots")
	}
	b := make([]byte, 6)
	rand.Read(b)
	private := filepath.Join(h.Dir(), "kubediskguard-test-"+hex.EncodeToString(b))
	var made []string
	mkdir := func(dir string) {
		t.Helper()
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		made = append(made, dir)
	}
	t.Cleanup(func() {
		for i := len(made) - 1; i >= 0; i-- {
			if err := os.Remove(made[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("removing test cgroup %s: %v", made[i], err)
			}
		}
	})
	mkdir(private)
	for _, rel := range []string{"kubepods", "kubepods/besteffort", "kubepods/besteffort/pod1", "kubepods/besteffort/pod1/c1"} {
		mkdir(filepath.Join(private, rel))
	}
	root := t.TempDir()
	blkio := filepath.Join(root, "blkio")
	if err := os.Mkdir(blkio, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(private, blkio, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("bind-mounting %s at %s: %v", private, blkio, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(blkio, 0); err != nil {
			t.Errorf("unmounting %s: %v", blkio, err)
		}
	})
	fake, err := cgroup.Open(root, cgroup.V1)
	if err != nil {
		t.Fatal(err)
	}
	data, other := loopdisk.New(t, 32), loopdisk.New(t, 32)
	mount := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(mount, 0o755); err != nil {
		t.Fatal(err)
	}
	data.Mount(t, mount)

	l := limits.Limits{ReadIOPS: 100, WriteIOPS: 200, ReadBPS: 1 << 20}
	cgs := []string{"kubepods", "kubepods/besteffort/pod1", "kubepods/besteffort/pod1/c1"}
	for _, rel := range cgs {
		if _, err := fake.Apply(fake.Join(rel), []device.Device{data.Dev, other.Dev}, l); err != nil {
			t.Fatal(err)
		}
	}
	o, err := ParseOptions([]string{"reset", "--cgroup-root", root, "--data-mount", mount}, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if err := Reset(context.Background(), o, &out); err != nil {
		t.Fatal(err)
	}
	t.Logf("reset:\n%s", out.String())
	for _, rel := range cgs {
		got, err := fake.Read(fake.Join(rel))
		if err != nil {
			t.Fatal(err)
		}
		if got[data.Dev] != (limits.Limits{}) || got[other.Dev] != l {
			t.Errorf("%s after reset: data disk %s %v (want none), other disk %s %v (want %v)", rel, data.Dev, got[data.Dev], other.Dev, got[other.Dev], l)
		}
	}
	if want := "the data disk " + data.Dev.String() + " (" + mount + ") in 3 of 4 cgroups"; !strings.Contains(out.String(), want) {
		t.Errorf("the output does not say %q", want)
	}
	out.Reset()
	if err := Reset(context.Background(), o, &out); err != nil || !strings.Contains(out.String(), "nothing to clear") {
		t.Errorf("second reset: %v, %q; want nothing to clear", err, out.String())
	}
	o.Reset.AllDevices = true
	out.Reset()
	if err := Reset(context.Background(), o, &out); err != nil {
		t.Fatal(err)
	}
	for _, rel := range cgs {
		if got, _ := fake.Read(fake.Join(rel)); len(got) != 0 {
			t.Errorf("%s after reset --all-devices: %v, want no limits", rel, got)
		}
	}
}

func TestResetWaitIsReadyOnceDone(t *testing.T) {
	f := newFakeCgroups(t, cgroup.V2)
	f.set(t, f.ctr, vda, limits.Limits{ReadIOPS: 100})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	o, err := ParseOptions([]string{"reset", "--wait", "--all-devices", "--health-probe-bind-address", addr,
		"--cgroup-root", f.root, "--proc-root", f.proc}, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var out strings.Builder
	go func() { done <- Reset(ctx, o, &out) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not ready within 5s: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := f.limit(t, f.ctr, vda); got != (limits.Limits{}) {
		t.Errorf("ready, but %s still holds %v", f.ctr, got)
	}
	select {
	case err := <-done:
		t.Fatalf("reset --wait returned %v before it was stopped", err)
	case <-time.After(100 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("reset --wait returned %v when stopped, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reset --wait did not return within 10s of being stopped")
	}
}
