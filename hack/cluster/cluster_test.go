package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// TestClusterUpSmokeDown brings the real single-node cluster up, runs a pod
// (Running, kubectl exec, its blkio cgroup), tears it down and checks that
// the host is as before: no processes, mounts, cgroups, files, sysctls or
// iptables chains left.
//
// It holds the host lock (only one kubelet may run on a machine, and the
// runtime tests' kubepods cgroups must not be in its way); under CI=true a
// missing component fails the test.
func TestClusterUpSmokeDown(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"hostNetwork", Config{}},
		{"podNetwork", Config{PodNetwork: true}},
		// Also a Deployment behind a Service, reached from the host and
		// reaching the apiserver (see smokeFull).
		{"full", Config{Full: true}},
	} {
		t.Run(tc.name, func(t *testing.T) { testClusterUpSmokeDown(t, tc.cfg) })
	}
}

func testClusterUpSmokeDown(t *testing.T, cfg Config) {
	if testing.Short() {
		t.Skip("starts a real kubelet; not with -short")
	}
	realtest.Root(t)
	realtest.HostLock(t) // one kubelet, and no other test's runtimes or kubepods cgroups meanwhile
	bins := []string{"etcd", "kube-apiserver", "kubelet", "kubectl"}
	if cfg.Full {
		bins = append(bins, "kube-controller-manager", "kube-scheduler", "kube-proxy")
	}
	cfg.BinDir, cfg.Log = realtest.KubeAssets(t, bins...), testWriter{t}
	for _, m := range cfg.Missing() {
		realtest.Missing(t, m, "make host-deps test-bins")
	}
	dir, err := os.MkdirTemp("", "kdg-cluster-test-")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Dir = dir

	before := snapshotForTest(t, dir)

	downing := downOnExit(t, dir, "the cluster", nil)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	start := time.Now()
	c, err := Up(ctx, cfg)
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Logf("up in %s: %v", time.Since(start).Round(time.Millisecond), c.Timings)

	res, err := c.Smoke(ctx)
	if err != nil {
		t.Fatalf("smoke: %v", err)
	}
	if (cfg.PodNetwork || cfg.Full) && !strings.HasPrefix(res.PodIP, "10.244.0.") {
		t.Errorf("pod IP %q, want one from the bridge's 10.244.0.0/24", res.PodIP)
	}
	t.Logf("pod Running in %s, kubectl exec in %s, cgroup %s", res.PodRunning.Round(time.Millisecond), res.Exec.Round(time.Millisecond), res.Cgroup)
	if cfg.Full {
		t.Logf("Deployment created → its Service answering in %s", res.Service.Round(time.Millisecond))
	}
	if !strings.HasPrefix(res.Cgroup, "/sys/fs/cgroup/blkio/kubepods/besteffort/pod") {
		t.Errorf("cgroup %s", res.Cgroup)
	}
	checkDataDisk(t, c)

	taskIDs, _ := listDir(filepath.Join(c.ContainerdStateDir, "io.containerd.runtime.v2.task", "k8s.io"))
	start = time.Now()
	downing()
	if err := Down(dir, testWriter{t}); err != nil {
		t.Fatalf("down: %v", err)
	}
	t.Logf("down in %s", time.Since(start).Round(time.Millisecond))
	if err := Down(dir, testWriter{t}); err != nil {
		t.Errorf("a second down must be a no-op: %v", err)
	}

	checkStopped(t, c.State, taskIDs)
	checkHostAsBefore(t, before, dir)
}

// checkDataDisk: the node's data dir is a mount point of its own, shared,
// of the device DataDisk names: a loop device backed by the state dir's
// image.
func checkDataDisk(t *testing.T, c *Cluster) {
	t.Helper()
	dir, disk := c.Node.DataDir(), c.Node.DataDisk()
	mounts, err := mountInfo()
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, m := range mounts {
		if m.MountPoint != dir {
			continue
		}
		found = true
		if m.Device != disk || m.FSType != "ext4" {
			t.Errorf("%s is mounted from %s (%s), want the data disk %s (ext4)", dir, m.Device, m.FSType, disk)
		}
	}
	if !sharedMount(t, dir) {
		t.Errorf("%s is not a shared mount", dir)
	}
	if !found {
		t.Errorf("the data dir %s is not a mount point", dir)
	}
	if got := loopBacking(c.DataDisk.Loop); got != c.DataDisk.Image {
		t.Errorf("%s is backed by %q, want %s", c.DataDisk.Loop, got, c.DataDisk.Image)
	}
	t.Logf("data disk %s (%s) mounted at %s", c.DataDisk.Loop, disk, dir)
}

// sharedMount reports whether the mount at dir has a peer group
// ("shared:N" among mountinfo's optional fields).
func sharedMount(t *testing.T, dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, _, _ := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		if len(f) > 6 && f[4] == dir {
			for _, o := range f[6:] {
				if strings.HasPrefix(o, "shared:") {
					return true
				}
			}
		}
	}
	return false
}

// TestClusterUpFailureTearsDown: when a component dies during Up, Up tears
// down what it had started (here a kubelet that exits at once) and the host
// is as before.
func TestClusterUpFailureTearsDown(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real etcd, kube-apiserver, containerd; not with -short")
	}
	realtest.Root(t)
	realtest.HostLock(t) // one kubelet, and no other test's runtimes or kubepods cgroups meanwhile
	assets := realtest.KubeAssets(t, "etcd", "kube-apiserver", "kubelet", "kubectl")
	bins := t.TempDir()
	for _, b := range []string{"etcd", "kube-apiserver", "kubectl"} {
		if err := os.Symlink(filepath.Join(assets, b), filepath.Join(bins, b)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(bins, "kubelet"), []byte("#!/bin/sh\necho broken kubelet >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := Config{BinDir: bins, Log: testWriter{t}}
	for _, m := range cfg.Missing() {
		realtest.Missing(t, m, "make host-deps test-bins")
	}
	dir, err := os.MkdirTemp("", "kdg-cluster-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cfg.Dir = dir
	before := snapshotForTest(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := Up(ctx, cfg)
	if err == nil {
		Down(dir, os.Stderr)
		t.Fatalf("up with a broken kubelet succeeded: %+v", c.State)
	}
	if !strings.Contains(err.Error(), "exited") {
		t.Errorf("error does not say the kubelet exited: %v", err)
	}
	t.Logf("up failed as it should: %v", err)
	if _, err := os.Stat(filepath.Join(dir, "state.json")); err == nil {
		t.Errorf("state.json left: the failed up did not tear down")
	}
	checkHostAsBefore(t, before, dir)
}

func checkHostAsBefore(t *testing.T, before map[string]any, dir string) {
	t.Helper()
	after := snapshotForTest(t, dir)
	for _, k := range sortedKeys(before, after) {
		if !reflect.DeepEqual(before[k], after[k]) {
			t.Errorf("host changed: %s\n before: %v\n after:  %v", k, before[k], after[k])
		}
	}
	if left := MountsUnder(dir); len(left) > 0 {
		t.Errorf("mounts left under %s: %v", dir, left)
	}
}

// snapshotForTest records what the cluster may touch on the host. Other
// packages' tests run at the same time (go test ./... runs packages in
// parallel) and start their own containerd, dockerd, apiservers with mounts
// under their temp dirs and cgroups of their own, so only what a kubelet
// cluster makes is compared: the kubelet, kubepods cgroups, mounts outside
// other tests' temp dirs, the kubelet's sysctls and paths, netns, iptables,
// network interfaces.
func snapshotForTest(t *testing.T, dir string) map[string]any {
	s := map[string]any{}
	s["processes kubelet"] = fmt.Sprint(pidsNamed("kubelet"))
	mounts, err := mountInfo()
	if err != nil {
		t.Fatal(err)
	}
	var points []string
	tmp := filepath.Clean(os.TempDir())
	for _, m := range mounts {
		if strings.HasPrefix(m.MountPoint, tmp+"/") && m.MountPoint != dir && !strings.HasPrefix(m.MountPoint, dir+"/") {
			continue // another test's
		}
		points = append(points, m.MountPoint)
	}
	sort.Strings(points)
	s["mounts"] = points
	var cgs []string
	ctrls, _ := cgroupMounts()
	for _, c := range ctrls {
		if _, err := os.Stat(filepath.Join(c, "kubepods")); err == nil {
			cgs = append(cgs, filepath.Join(c, "kubepods"))
		}
	}
	s["kubepods cgroups"] = cgs
	for _, sc := range hostSysctls {
		v, _ := readSysctl(sc)
		s["sysctl "+sc] = v
	}
	for _, p := range hostPaths {
		_, err := os.Lstat(p)
		s["exists "+p] = err == nil
	}
	for _, d := range []string{"/run/netns", "/var/lib/kubelet"} {
		l, _ := listDir(d)
		s["ls "+d] = fmt.Sprint(l)
	}
	for _, bin := range []string{"iptables-save", "ip6tables-save"} {
		if out, err := exec.Command(bin).Output(); err == nil {
			var rules []string
			for _, l := range strings.Split(string(out), "\n") {
				if !strings.HasPrefix(l, "#") { // drop the timestamps
					rules = append(rules, strings.SplitN(l, " [", 2)[0])
				}
			}
			s[bin] = rules
		}
	}
	s["nft tables"] = fmt.Sprint(nftTables())
	s["loop devices"] = loopDevices()
	if ifs, err := net.Interfaces(); err == nil {
		var names []string
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		s["network interfaces"] = names
	}
	return s
}

// checkStopped: nothing the cluster started runs, no shim socket is left.
func checkStopped(t *testing.T, st State, taskIDs []string) {
	t.Helper()
	for _, p := range st.Procs {
		if p.Alive() {
			t.Errorf("%s (pid %d) still runs", p.Name, p.PID)
		}
	}
	if pids := shimPIDs(st.ContainerdAddress); len(pids) > 0 {
		t.Errorf("containerd shims still run: %v", pids)
	}
	if len(taskIDs) == 0 {
		t.Errorf("no containerd task dirs were seen")
	}
	for _, id := range taskIDs {
		if _, err := os.Lstat(shimSocket(st.ContainerdAddress, "k8s.io", id)); err == nil {
			t.Errorf("shim socket of %s left", id)
		}
	}
}

func sortedKeys(a, b map[string]any) []string {
	seen := map[string]bool{}
	var ks []string
	for _, m := range []map[string]any{a, b} {
		for k := range m {
			if !seen[k] {
				seen[k] = true
				ks = append(ks, k)
			}
		}
	}
	sort.Strings(ks)
	return ks
}

func dumpLogs(t *testing.T, dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		t.Logf("--- %s (last %d lines)\n%s", e.Name(), len(lines), strings.Join(lines, "\n"))
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestStaleKubepodsRemoved: the empty kubepods trees a kubelet killed with
// its machine left (no kubelet, no process in them) are removed before Up,
// and a tree that still holds a process is left for Up to refuse.
func TestStaleKubepodsRemoved(t *testing.T) {
	if testing.Short() {
		t.Skip("makes cgroups on the host; not with -short")
	}
	realtest.Root(t)
	realtest.HostLock(t)
	ctrls, err := cgroupMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(pidsNamed("kubelet")) != 0 {
		t.Fatal("a kubelet runs on this machine: stop it (make down) first")
	}
	var blkio string
	for _, c := range ctrls {
		if filepath.Base(c) == "blkio" {
			blkio = c
		}
		if _, err := os.Stat(filepath.Join(c, "kubepods")); err == nil {
			t.Fatalf("%s/kubepods exists before the test", c)
		}
	}
	if blkio == "" {
		t.Fatal("no blkio hierarchy on this host")
	}
	kp := filepath.Join(blkio, "kubepods")
	leaf := filepath.Join(kp, "besteffort", "podstale", "container")
	t.Cleanup(func() { removeCgroupTree(kp) })

	if err := os.MkdirAll(leaf, 0o755); err != nil {
		t.Fatal(err)
	}
	busy := exec.Command("sleep", "60")
	if err := busy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { busy.Process.Kill(); busy.Wait() })
	if err := os.WriteFile(filepath.Join(leaf, "cgroup.procs"), []byte(fmt.Sprint(busy.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := removeStaleKubepods(ctrls); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(leaf); err != nil {
		t.Fatalf("a kubepods tree holding process %d was removed: %v", busy.Process.Pid, err)
	}

	busy.Process.Kill()
	busy.Wait()
	if err := removeStaleKubepods(ctrls); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(kp); !os.IsNotExist(err) {
		t.Fatalf("the empty kubepods tree %s is still there (%v)", kp, err)
	}
}

// downOnExit makes sure the cluster in dir is torn down however the test
// ends: on SIGINT/SIGTERM (then the process exits), and in a cleanup unless
// the test called the returned func before its own Down. A failed test
// logs the cluster's logs, then what failLog adds.
func downOnExit(t *testing.T, dir, what string, failLog func()) (downing func()) {
	realtest.OnInterrupt(t, what).Push(func() { Down(dir, os.Stderr) })
	downDone := false
	t.Cleanup(func() {
		if !downDone {
			if err := Down(dir, os.Stderr); err != nil {
				t.Errorf("teardown: %v", err)
			}
		}
		if t.Failed() {
			dumpLogs(t, filepath.Join(dir, "logs"))
			if failLog != nil {
				failLog()
			}
		}
		os.RemoveAll(dir)
	})
	return func() { downDone = true }
}
