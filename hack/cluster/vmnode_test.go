package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// TestV2NodeUpSmokeDown brings the cluster up on the cgroup v2 node kind (a
// qemu VM: systemd, the systemd cgroup driver, containerd 2.x; its image
// and snapshot are built first when the cache lacks them), runs a pod
// (Running, kubectl exec from the host through the forwarded apiserver, its
// main process in the cri-containerd-<id>.scope under kubepods.slice with
// io enabled down to it), checks the data disk, tears it down and checks
// that nothing is left: qemu stopped, its forwards closed, its overlays
// removed. The VM touches nothing of the host's kubelet, containerd or
// cgroups, but it takes the host lock for the host's cores: beside the
// host cluster tests of other packages (go test ./... runs them at once)
// the emulated node starved, its apiserver timing out TLS handshakes (CI,
// 2026-12-03), wait after wait. The lock was not enough: beside the other
// packages' builds and lock-free tests the same wait failed again (CI,
// 2026-12-04: three minutes of TLS handshake timeouts, the guest agent
// silent too), so make test skips it in go test ./... and runs it on its
// own afterwards, as it does the v2 node's TestE2E. Under CI=true a
// missing qemu, kernel or binary fails the test.
func TestV2NodeUpSmokeDown(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM; not with -short")
	}
	realtest.Root(t)
	realtest.HostLock(t)
	cfg := Config{Node: V2Node, Log: testWriter{t}}
	cfg.BinDir = realtest.KubeAssets(t, "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
	for _, m := range cfg.Missing() {
		realtest.Missing(t, m, "make v2node")
	}
	dir, err := os.MkdirTemp("", "kdg-v2node-test-")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Dir = dir

	downing := downOnExit(t, dir, "the v2 node", func() {
		if b, err := os.ReadFile(filepath.Join(dir, "vm", "console.log")); err == nil {
			t.Logf("--- console\n%s", lastLines(string(b), 40))
		}
	})

	// A cold cache builds the image (~20 min on a busy machine) and its
	// snapshot first.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()

	start := time.Now()
	c, err := Up(ctx, cfg)
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Logf("up in %s: %v", time.Since(start).Round(time.Millisecond), c.Timings)
	l := c.Node.Layout()
	if l.String() != "cgroup v2, systemd driver, containerd "+l.RuntimeVersion || !strings.HasPrefix(strings.TrimPrefix(l.RuntimeVersion, "v"), "2.") {
		t.Errorf("layout %s, want cgroup v2, systemd driver, containerd 2.x", l)
	}

	res, err := c.Smoke(ctx)
	if err != nil {
		if out, lerr := c.Node.Run(ctx, "journalctl", "-u", "kubelet", "-u", "containerd", "--no-pager", "-n", "60"); lerr == nil {
			t.Logf("kubelet and containerd journal:\n%s", out)
		}
		t.Fatalf("smoke: %v", err)
	}
	t.Logf("pod Running in %s, kubectl exec in %s, cgroup %s, pod IP %s; a Deployment's pod with a ServiceAccount token answering on its Service's ClusterIP and reaching the apiserver through the kubernetes Service in %s",
		res.PodRunning.Round(time.Millisecond), res.Exec.Round(time.Millisecond), res.Cgroup, res.PodIP, res.Service.Round(time.Millisecond))
	if res.Service == 0 {
		t.Error("the Service check (controller-manager, scheduler, kube-proxy) did not run: the v2 node is always Full")
	}
	const slice = "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
	if !strings.HasPrefix(res.Cgroup, slice) || !strings.Contains(res.Cgroup, ".slice/cri-containerd-") || !strings.HasSuffix(res.Cgroup, ".scope") {
		t.Errorf("cgroup %s, want %s<uid_>.slice/cri-containerd-<id>.scope", res.Cgroup, slice)
	}
	if !strings.HasPrefix(res.PodIP, "10.88.0.") {
		t.Errorf("pod IP %q, want one of the VM's bridge 10.88.0.0/24", res.PodIP)
	}
	// io is enabled at every level from the root down to the pod slice, so
	// the scope has io.max: where the applier writes.
	for d := path.Dir(res.Cgroup); strings.HasPrefix(d, "/sys/fs/cgroup"); d = path.Dir(d) {
		b, err := c.Node.ReadFile(ctx, path.Join(d, "cgroup.subtree_control"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(" "+strings.TrimSpace(string(b))+" ", " io ") {
			t.Errorf("%s/cgroup.subtree_control is %q: no io", d, strings.TrimSpace(string(b)))
		}
		if d == "/sys/fs/cgroup" {
			break
		}
	}
	if _, err := c.Node.ReadFile(ctx, path.Join(res.Cgroup, "io.max")); err != nil {
		t.Errorf("the container's scope has no io.max: %v", err)
	}
	checkVMDataDisk(t, ctx, c)
	checkFailCgroupV1Default(t, ctx, c)
	checkQoSSlices(t, ctx, c)

	// What Down keeps when the guest stops answering: qemu's view of it.
	if r := vmMonitorReport(filepath.Join(c.State.VM.Dir, "monitor.sock")); !strings.Contains(r, "VM status: running") || strings.Count(r, "RIP=") < 2 || strings.Contains(r, "error:") {
		t.Errorf("the monitor's report of a running guest:\n%s", r)
	} else {
		t.Logf("the monitor's report of a running guest:\n%s", r)
	}
	agent := fmt.Sprintf("127.0.0.1:%d", c.State.VM.AgentPort)
	api := fmt.Sprintf("127.0.0.1:%d", c.State.VM.APIPort)
	vmDir := c.State.VM.Dir
	start = time.Now()
	downing()
	if err := Down(dir, testWriter{t}); err != nil {
		t.Fatalf("down: %v", err)
	}
	t.Logf("down in %s", time.Since(start).Round(time.Millisecond))
	if err := Down(dir, testWriter{t}); err != nil {
		t.Errorf("a second down must be a no-op: %v", err)
	}
	for _, p := range c.State.Procs {
		if p.Alive() {
			t.Errorf("%s (pid %d) still runs", p.Name, p.PID)
		}
	}
	for _, a := range []string{agent, api} {
		if conn, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			conn.Close()
			t.Errorf("%s still answers after down", a)
		}
	}
	if _, err := os.Stat(vmDir); err == nil {
		t.Errorf("the VM's overlays are left in %s", vmDir)
	}
	// What is lost with the VM was copied out first: the kubelet's journal.
	if b, err := os.ReadFile(filepath.Join(dir, "logs", "node-kubelet.log")); err != nil || !strings.Contains(string(b), "kubelet") {
		t.Errorf("the node's kubelet journal was not kept in %s/logs at down (%v): %q", dir, err, lastLines(string(b), 5))
	}
}

// checkVMDataDisk: the node's data dir is a mount point of its own,
// shared, of the device DataDisk names (the VM's second virtio disk).
func checkVMDataDisk(t *testing.T, ctx context.Context, c *Cluster) {
	t.Helper()
	b, err := c.Node.ReadFile(ctx, "/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	mounts, err := device.ParseMountInfo(strings.NewReader(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	dir, disk := c.Node.DataDir(), c.Node.DataDisk()
	var found bool
	for _, m := range mounts {
		if m.MountPoint == dir {
			found = true
			if m.Device != disk || m.FSType != "ext4" {
				t.Errorf("%s is mounted from %s (%s), want the data disk %s (ext4)", dir, m.Device, m.FSType, disk)
			}
		}
	}
	if !found {
		t.Errorf("the data dir %s is not a mount point on the node", dir)
	}
	shared := false
	for _, line := range strings.Split(string(b), "\n") {
		pre, _, _ := strings.Cut(line, " - ")
		if f := strings.Fields(pre); len(f) > 6 && f[4] == dir {
			for _, o := range f[6:] {
				shared = shared || strings.HasPrefix(o, "shared:")
			}
		}
	}
	if !shared {
		t.Errorf("%s is not a shared mount on the node", dir)
	}
	t.Logf("data disk %s mounted at %s on the node", disk, dir)
}

// checkQoSSlices: a Guaranteed and a Burstable pod's cgroups are where the
// layout says (kubepods-pod<uid_>.slice directly under kubepods.slice;
// kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice), with
// io.max, and their containers' scopes below them.
func checkQoSSlices(t *testing.T, ctx context.Context, c *Cluster) {
	t.Helper()
	rl := func(cpu, mem string) corev1.ResourceList {
		return corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem)}
	}
	for _, tc := range []struct {
		name   string
		res    corev1.ResourceRequirements
		qos    corev1.PodQOSClass
		prefix string
	}{
		{"kdg-guaranteed", corev1.ResourceRequirements{Requests: rl("50m", "32Mi"), Limits: rl("50m", "32Mi")}, corev1.PodQOSGuaranteed, "/sys/fs/cgroup/kubepods.slice/kubepods-pod"},
		{"kdg-burstable", corev1.ResourceRequirements{Requests: rl("50m", "32Mi")}, corev1.PodQOSBurstable, "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"},
	} {
		pod := c.Pod("default", tc.name, "sleep", "3600")
		pod.Spec.Containers[0].Resources = tc.res
		if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p, err := c.WaitRunning(ctx, "default", tc.name, c.PodTimeout())
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.QOSClass != tc.qos {
			t.Errorf("%s: QoS %s, want %s", tc.name, p.Status.QOSClass, tc.qos)
		}
		dir, err := c.Node.Layout().PodCgroup(p)
		if err != nil {
			t.Fatal(err)
		}
		scope, err := c.ContainerCgroup(p, "main")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(dir, tc.prefix) || path.Dir(scope) != dir {
			t.Errorf("%s: pod cgroup %s (container %s), want %s<uid_>.slice with the scope in it", tc.name, dir, scope, tc.prefix)
		}
		for _, d := range []string{dir, scope} {
			if _, err := c.Node.ReadFile(ctx, path.Join(d, "io.max")); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
		t.Logf("%s (%s): %s", tc.name, tc.qos, scope)
		c.Client.CoreV1().Pods("default").Delete(ctx, tc.name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
	}
}

// checkFailCgroupV1Default: the kubelet runs with the systemd driver and
// its default failCgroupV1 (never told to accept cgroup v1).
func checkFailCgroupV1Default(t *testing.T, ctx context.Context, c *Cluster) {
	t.Helper()
	b, err := c.Node.ReadFile(ctx, "/etc/kubernetes/kubelet.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "failCgroupV1") || !strings.Contains(string(b), "cgroupDriver: systemd") {
		t.Errorf("kubelet.yaml:\n%s", b)
	}
}
