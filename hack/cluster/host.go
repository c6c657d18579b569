package cluster

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
)

// The host changes a kubelet + containerd CRI make outside their own folders
// (found by running them here; see REAL-COMPONENTS.md). The harness records
// the host before it starts anything and undoes exactly what it added.

// hostSysctls are the kernel tunables the kubelet sets at start
// (protectKernelDefaults: false makes it write them instead of failing),
// and those kube-proxy may set (the harness configures it not to; restored
// all the same) and a CNI plugin may (IP forwarding).
var hostSysctls = []string{
	"vm.overcommit_memory",
	"vm.panic_on_oom",
	"kernel.panic",
	"kernel.panic_on_oops",
	"kernel.keys.root_maxkeys",
	"kernel.keys.root_maxbytes",
	"net.ipv4.ip_forward",
	"net.ipv4.conf.all.route_localnet",
	"net.bridge.bridge-nf-call-iptables",
	"net.netfilter.nf_conntrack_max",
	"net.netfilter.nf_conntrack_tcp_timeout_established",
	"net.netfilter.nf_conntrack_tcp_timeout_close_wait",
}

// hostPaths are paths outside the state dir that the kubelet, containerd or
// the CNI plugins create at fixed locations. For each, the topmost ancestor
// that did not exist before start is removed at teardown.
var hostPaths = []string{
	"/var/lib/kubelet/device-plugins/kubelet.sock",
	"/var/lib/kubelet/device-plugins/DEPRECATION",
	"/var/log/containers",
	"/var/log/pods",
	"/usr/libexec/kubernetes/kubelet-plugins/volume/exec",
	"/var/lib/cni",
	"/etc/cni",
	"/opt/cni",
	"/opt/containerd",
	"/var/run/kubernetes",
}

// emptyDirs are shared folders other programs may use too: removed only if
// the harness created them and they are empty at teardown.
var emptyDirs = []string{"/run/containerd/s", "/run/containerd", "/run/netns"}

const cgroupRoot = "/sys/fs/cgroup"

// HostState is the host as it was before Up; it is saved in the state file so
// that `down` from another process can undo the changes.
type HostState struct {
	Sysctls        map[string]string `json:"sysctls"`
	CreatedPaths   []string          `json:"createdPaths"`   // to RemoveAll at teardown
	CreatedDirs    []string          `json:"createdDirs"`    // to Remove if empty
	KubepodsAbsent []string          `json:"kubepodsAbsent"` // cgroup dirs <controller>/kubepods absent before
	NetnsBefore    []string          `json:"netnsBefore"`
	Iptables       *IptablesState    `json:"iptables"`
}

// snapshotHost records what teardown needs to restore.
func snapshotHost() (*HostState, error) {
	h := &HostState{Sysctls: map[string]string{}}
	for _, s := range hostSysctls {
		v, err := readSysctl(s)
		if err != nil {
			continue // not on this kernel: the kubelet will not set it either
		}
		h.Sysctls[s] = v
	}
	seen := map[string]bool{}
	for _, p := range hostPaths {
		if a := topmostMissing(p); a != "" && !seen[a] {
			seen[a] = true
			h.CreatedPaths = append(h.CreatedPaths, a)
		}
	}
	for _, d := range emptyDirs {
		if _, err := os.Lstat(d); errors.Is(err, os.ErrNotExist) {
			h.CreatedDirs = append(h.CreatedDirs, d)
		}
	}
	ctrls, err := cgroupMounts()
	if err != nil {
		return nil, err
	}
	if err := removeStaleKubepods(ctrls); err != nil {
		return nil, err
	}
	for _, c := range ctrls {
		kp := filepath.Join(c, "kubepods")
		if _, err := os.Stat(kp); errors.Is(err, os.ErrNotExist) {
			h.KubepodsAbsent = append(h.KubepodsAbsent, kp)
		} else if err == nil && filepath.Base(c) == "blkio" {
			return nil, fmt.Errorf("%s exists already: another kubelet runs (or ran) on this machine; run `go run ./hack/cluster/cmd down` or remove it", kp)
		}
	}
	h.NetnsBefore, _ = listDir("/run/netns")
	h.Iptables = snapshotIptables()
	return h, nil
}

// removeStaleKubepods removes the kubepods cgroup trees a kubelet left in
// the hierarchies ctrls when no kubelet runs on the machine and no process
// is left in any of them: what a harness killed with the machine (its state
// dir, and so Down's record, gone with it) leaves behind. With a kubelet
// running, or a process in a tree, it leaves them: Up then refuses to start.
func removeStaleKubepods(ctrls []string) error {
	var trees []string
	for _, c := range ctrls {
		kp := filepath.Join(c, "kubepods")
		if _, err := os.Stat(kp); err != nil {
			continue
		}
		if len(cgroupPIDs(kp)) != 0 {
			return nil
		}
		trees = append(trees, kp)
	}
	if len(trees) == 0 || len(pidsNamed("kubelet")) != 0 {
		return nil
	}
	for _, kp := range trees {
		if err := removeCgroupTree(kp); err != nil {
			return fmt.Errorf("removing the empty kubepods cgroup %s a dead kubelet left: %w", kp, err)
		}
	}
	return nil
}

// topmostMissing returns the highest ancestor of p (or p) that does not exist.
func topmostMissing(p string) string {
	missing := ""
	for cur := p; cur != "/" && cur != "."; cur = filepath.Dir(cur) {
		if _, err := os.Lstat(cur); errors.Is(err, os.ErrNotExist) {
			missing = cur
		} else {
			break
		}
	}
	return missing
}

func readSysctl(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")))
	return strings.TrimSpace(string(b)), err
}

func writeSysctl(name, v string) error {
	return os.WriteFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")), []byte(v), 0o644)
}

// cgroupMounts lists the cgroup hierarchies mounted under /sys/fs/cgroup (v1
// controllers and the unified v2 mount of a hybrid layout).
func cgroupMounts() ([]string, error) { return cgroup.Hierarchies(cgroupRoot) }

func mountInfo() ([]device.Mount, error) { return device.ReadMountInfo("/proc/self/mountinfo") }

// MountsUnder lists the mount points at or below dir, deepest first.
func MountsUnder(dir string) []string {
	mounts, _ := mountInfo()
	var out []string
	for _, m := range mounts {
		if m.MountPoint == dir || strings.HasPrefix(m.MountPoint, dir+"/") {
			out = append(out, m.MountPoint)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out
}

// unmountAll unmounts everything at or below dir (repeatedly: a bind mount of
// the kubelet's root dir can be stacked), detaching what is busy.
func unmountAll(dir string) error {
	var errs []error
	for round := 0; round < 5; round++ {
		ms := MountsUnder(dir)
		if len(ms) == 0 {
			return nil
		}
		for _, m := range ms {
			if err := syscall.Unmount(m, 0); err != nil {
				if err2 := syscall.Unmount(m, syscall.MNT_DETACH); err2 != nil && round == 4 {
					errs = append(errs, fmt.Errorf("unmount %s: %w", m, err2))
				}
			}
		}
	}
	if ms := MountsUnder(dir); len(ms) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %v", ms))
	}
	return errors.Join(errs...)
}

func listDir(d string) ([]string, error) {
	ents, err := os.ReadDir(d)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out, nil
}

// cgroupTree lists dir and its descendants, deepest first.
func cgroupTree(dir string) []string {
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	sort.SliceStable(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out
}

// cgroupPIDs lists the processes in the cgroup tree at dir.
func cgroupPIDs(dir string) []int {
	var pids []int
	for _, cg := range cgroupTree(dir) {
		b, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// removeCgroupTree kills what is left in the tree and removes it leaf-first.
func removeCgroupTree(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var last error
	for try := 0; try < 50; try++ {
		for _, pid := range cgroupPIDs(dir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		last = nil
		for _, cg := range cgroupTree(dir) {
			if err := syscall.Rmdir(cg); err != nil && !errors.Is(err, syscall.ENOENT) {
				last = fmt.Errorf("rmdir %s: %w", cg, err)
			}
		}
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// shimSocket is where containerd 1.6's runc shim v2 listens for the task
// group id (the sandbox id for CRI pods): /run/containerd/s/sha256(address/ns/id).
// The path is fixed whatever containerd's state dir is, so a killed shim
// leaves it behind.
func shimSocket(address, ns, id string) string {
	return fmt.Sprintf("/run/containerd/s/%x", sha256.Sum256([]byte(filepath.Join(address, ns, id))))
}

// shimPIDs finds the containerd shims serving the containerd at address.
func shimPIDs(address string) []int {
	return pidsWhere(func(pid int) bool {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if err != nil {
			return false
		}
		args := strings.Split(string(b), "\x00")
		if !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			return false
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-address" && args[i+1] == address {
				return true
			}
		}
		return false
	})
}

// pidsWhere lists the processes for which match is true.
func pidsWhere(match func(pid int) bool) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && match(pid) {
			out = append(out, pid)
		}
	}
	return out
}
