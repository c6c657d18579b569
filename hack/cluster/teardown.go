package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Down stops the cluster recorded in dir/state.json and undoes its host
// changes. It works from the state file alone, so it also cleans up after an
// `up` process that died. A cluster on another node kind is torn down by
// its NodeKindImpl.Down. The whole teardown of a host node, in this order:
//  0. stop the programs started on the node for the cluster (Node.Start:
//     KubeDiskGuard's binaries);
//  1. if the cluster still answers, delete every pod (grace 1 s) so the
//     kubelet stops the sandboxes itself (CNI netns, shm mounts go away);
//  2. stop the kubelet; kill what is left in the kubepods cgroups;
//  3. stop containerd, kill its runc shims (found by their -address), stop
//     the apiserver and etcd (each by recorded PID + start time);
//  4. unmount everything under the state dir (the kubelet's bind mount of its
//     root dir, rootfs overlays, shm, the data disk) and the CNI netns it
//     left in /run/netns; detach the data disk's loop device;
//  5. rmdir the kubepods cgroup trees it created (every hierarchy, leaf first);
//  6. remove the shim sockets in /run/containerd/s, the fixed host paths it
//     created, the iptables chains the kubelet added, and restore the
//     sysctls the kubelet changed.
//
// Each step runs even if an earlier one failed; the errors are joined.
func Down(dir string, log io.Writer) error {
	if log == nil {
		log = os.Stderr
	}
	logf := func(format string, args ...any) { fmt.Fprintf(log, "cluster: "+format+"\n", args...) }
	b, err := os.ReadFile(stateFile(dir))
	if errors.Is(err, os.ErrNotExist) {
		logf("no %s: nothing to tear down", stateFile(dir))
		return nil
	}
	if err != nil {
		return err
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("reading %s: %w", stateFile(dir), err)
	}
	if st.Node != "" && st.Node != HostNode {
		impl, err := kindImpl(st.Node)
		if err != nil {
			return fmt.Errorf("%s records a cluster on node kind %s: %w", stateFile(dir), st.Node, err)
		}
		if err := impl.Down(dir, st, log); err != nil {
			return err
		}
		return os.Remove(stateFile(dir))
	}
	start := time.Now()
	var errs []error

	// 0. What was started on the node for the cluster, newest first.
	for i := len(st.Procs) - 1; i >= 0; i-- {
		if !components[st.Procs[i].Name] {
			stop(st.Procs[i], 10*time.Second)
		}
	}
	proc := func(name string) (Proc, bool) {
		for _, p := range st.Procs {
			if p.Name == name {
				return p, true
			}
		}
		return Proc{}, false
	}

	// 1. Pods, through the API, while kubelet and apiserver run; first the
	// controllers, which would make new ones.
	for _, name := range []string{"kube-controller-manager", "kube-scheduler"} {
		if p, ok := proc(name); ok {
			stop(p, 10*time.Second)
		}
	}
	kl, okK := proc("kubelet")
	as, okA := proc("kube-apiserver")
	if okK && okA && kl.Alive() && as.Alive() && st.Kubeconfig != "" {
		if err := deleteAllPods(st.Kubeconfig, 20*time.Second); err != nil {
			logf("deleting pods before stopping the kubelet: %v (continuing)", err)
		}
	}

	// 2. The kubelet, then the containers.
	if okK {
		stop(kl, 10*time.Second)
	}
	if st.Host != nil {
		for _, kp := range st.Host.KubepodsAbsent {
			for _, pid := range cgroupPIDs(kp) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}

	// 3. containerd, its shims, apiserver, etcd.
	var taskIDs []string
	if st.ContainerdStateDir != "" {
		taskIDs, _ = listDir(filepath.Join(st.ContainerdStateDir, "io.containerd.runtime.v2.task", "k8s.io"))
	}
	// containerd first: killed under a running containerd, a shim makes it
	// spawn `shim delete` helpers that would outlive the teardown.
	if p, ok := proc("containerd"); ok {
		stop(p, 10*time.Second)
	}
	if st.ContainerdAddress != "" {
		for _, pid := range shimPIDs(st.ContainerdAddress) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, name := range []string{"kube-apiserver", "etcd"} {
		if p, ok := proc(name); ok {
			stop(p, 10*time.Second)
		}
	}
	for _, p := range st.Procs { // anything else recorded
		stop(p, 5*time.Second)
	}
	if st.ContainerdAddress != "" {
		deadline := time.Now().Add(5 * time.Second)
		for len(shimPIDs(st.ContainerdAddress)) > 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if pids := shimPIDs(st.ContainerdAddress); len(pids) > 0 {
			errs = append(errs, fmt.Errorf("containerd shims still running: %v", pids))
		}
	}

	// 4. Mounts, the data disk.
	if err := unmountAll(dir); err != nil {
		errs = append(errs, err)
	}
	if err := tearDownDataDisk(st.DataDisk); err != nil {
		errs = append(errs, err)
	}
	if st.Host != nil {
		before := map[string]bool{}
		for _, n := range st.Host.NetnsBefore {
			before[n] = true
		}
		now, _ := listDir("/run/netns")
		for _, n := range now {
			if before[n] || !strings.HasPrefix(n, "cni-") {
				continue
			}
			p := filepath.Join("/run/netns", n)
			if err := unmountAll(p); err != nil {
				errs = append(errs, err)
			}
			if err := os.Remove(p); err != nil {
				errs = append(errs, err)
			}
		}
	}

	if st.PodBridge != "" {
		if err := exec.Command("ip", "link", "show", st.PodBridge).Run(); err == nil {
			if out, err := exec.Command("ip", "link", "delete", st.PodBridge).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("ip link delete %s: %v: %s", st.PodBridge, err, out))
			}
		}
	}

	// 5. Cgroups.
	if st.Host != nil {
		for _, kp := range st.Host.KubepodsAbsent {
			if err := removeCgroupTree(kp); err != nil {
				errs = append(errs, err)
			}
		}
	}

	// 6. Files outside the state dir, sysctls.
	for _, id := range taskIDs { // none without a containerd state dir
		s := shimSocket(st.ContainerdAddress, "k8s.io", id)
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if st.Host != nil {
		for _, p := range st.Host.CreatedPaths {
			if err := unmountAll(p); err != nil {
				errs = append(errs, err)
			}
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, err)
			}
		}
		for _, d := range st.Host.CreatedDirs {
			_ = os.Remove(d) // only if empty: others may use it now
		}
		if err := restoreIptables(st.Host.Iptables); err != nil {
			errs = append(errs, err)
		}
		for name, v := range st.Host.Sysctls {
			if cur, err := readSysctl(name); err == nil && cur != v {
				if err := writeSysctl(name, v); err != nil {
					errs = append(errs, fmt.Errorf("restoring %s=%s: %w", name, v, err))
				}
			}
		}
	}

	if err := errors.Join(errs...); err != nil {
		logf("teardown finished with errors in %s (state kept in %s): %v", time.Since(start).Round(time.Millisecond), dir, err)
		return err
	}
	// Keep the logs for a post-mortem; drop the rest of the state dir.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() == "logs" || !stateDirEntries[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := os.Remove(stateFile(dir)); err != nil {
		return err
	}
	logf("torn down in %s; host restored (logs kept in %s)", time.Since(start).Round(time.Millisecond), filepath.Join(dir, "logs"))
	return nil
}

func deleteAllPods(kubeconfig string, timeout time.Duration) error {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	rc.Timeout = 5 * time.Second
	cl, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	pods, err := cl.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	grace := int64(1)
	for _, p := range pods.Items {
		_ = cl.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace})
	}
	return Poll(ctx, "deleting every pod", 200*time.Millisecond, timeout, func() error {
		pods, err := cl.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err == nil && len(pods.Items) > 0 {
			err = fmt.Errorf("%d pods left", len(pods.Items))
		}
		return err
	})
}

// components are the names of the cluster's own processes (State.Procs);
// any other name there is a program started on the node (Node.Start).
var components = map[string]bool{
	"etcd": true, "kube-apiserver": true, "kube-controller-manager": true, "kube-scheduler": true,
	"containerd": true, "kubelet": true, "kube-proxy": true,
}

// StartTime is field 22 of /proc/PID/stat (clock ticks since boot); "" if
// the process is gone or a zombie (as good as gone).
func StartTime(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	return parseStartTime(string(b))
}

// parseStartTime is StartTime from the contents of /proc/PID/stat.
func parseStartTime(s string) string {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 || f[0] == "Z" {
		return ""
	}
	return f[19]
}

// Alive reports whether p still runs (same PID and the same start time).
func (p Proc) Alive() bool {
	st := StartTime(p.PID)
	return st != "" && st == p.StartTime
}

// stop sends SIGTERM, waits up to grace, then SIGKILL.
func stop(p Proc, grace time.Duration) {
	if !p.Alive() {
		return
	}
	syscall.Kill(p.PID, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for p.Alive() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if p.Alive() {
		syscall.Kill(p.PID, syscall.SIGKILL)
		for i := 0; i < 100 && p.Alive(); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// pidsNamed lists processes whose comm is name.
func pidsNamed(name string) []int {
	return pidsWhere(func(pid int) bool {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
		return err == nil && strings.TrimSpace(string(b)) == name && StartTime(pid) != "" // not a zombie
	})
}
