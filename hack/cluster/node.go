package cluster

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// The node seam: everything that differs between the node layouts the
// cluster runs on (where a cgroup file is, how the node starts, where the
// data disk and the runtime socket are, how a program is run there) is asked
// of the cluster's Node, in one place. The checks of hack/e2e, the demo and
// `make up` never read the host's paths: one set of checks runs on every
// node kind, as the Kubernetes node e2e suite runs one suite on several node
// images chosen by configuration.

// NodeKind names a node layout the cluster can run on (Config.Node; NODE= in
// the Makefile, -node on the commands).
type NodeKind string

const (
	// HostNode is this machine itself: cgroup v1 (blkio), the kubelet's
	// cgroupfs driver, Debian's containerd 1.6, and a loop-device data disk.
	HostNode NodeKind = "host"
	// V2Node is a qemu VM as distributions ship a node: cgroup v2 with
	// systemd as PID 1, the systemd cgroup driver, containerd 2.x.
	V2Node NodeKind = "v2"
)

// ParseNodeKind parses a node kind: "host" or "v2" ("" is host).
func ParseNodeKind(s string) (NodeKind, error) {
	switch k := NodeKind(s); k {
	case "", HostNode:
		return HostNode, nil
	case V2Node:
		return k, nil
	}
	return "", fmt.Errorf("node kind %q: want host or v2", s)
}

// NodeKindImpl is how a cluster on a node kind other than the host is
// started and torn down: its node's package registers it with
// RegisterNodeKind (in an init func), and Up and Down dispatch on
// Config.Node and State.Node.
type NodeKindImpl struct {
	// Missing lists what the machine lacks for this kind, with how to get it.
	Missing func(cfg Config) []string
	// Up starts the cluster and returns it with its Node set, once the
	// Node is Ready. cfg has its defaults. It records its state in
	// DIR/state.json (State.Node = the kind) before it starts anything, and
	// tears down what it started when it fails.
	Up func(ctx context.Context, cfg Config) (*Cluster, error)
	// Down stops everything st (read from dir/state.json) records and
	// undoes what it changed on the host; it is called by Down, which
	// removes the state file when it returns nil.
	Down func(dir string, st State, log io.Writer) error
	// Slowdown is how many times longer than on the host a wait may take
	// there: a pod's start, a process's start-up, a check's wait (0 is 1).
	Slowdown int
}

// Slowed is d, a wait's bound on the host, scaled to kind's Slowdown.
func Slowed(kind NodeKind, d time.Duration) time.Duration {
	if impl, ok := nodeKinds[kind]; ok && impl.Slowdown > 1 {
		return d * time.Duration(impl.Slowdown)
	}
	return d
}

var nodeKinds = map[NodeKind]NodeKindImpl{}

// RegisterNodeKind makes Up and Down able to run clusters on kind.
func RegisterNodeKind(kind NodeKind, impl NodeKindImpl) {
	if kind == HostNode {
		panic("cluster: the host node kind is built in")
	}
	nodeKinds[kind] = impl
}

// kindImpl returns the implementation of a node kind other than the host.
func kindImpl(kind NodeKind) (NodeKindImpl, error) {
	impl, ok := nodeKinds[kind]
	if !ok {
		return impl, fmt.Errorf("unknown node kind %q", kind)
	}
	return impl, nil
}

// Layout is what distinguishes one node layout from another for
// KubeDiskGuard: which cgroup version holds the block IO controller, the
// cgroup driver of the kubelet and the runtime, and the runtime.
type Layout struct {
	Cgroup         cgroup.Version // V1 (blkio) or V2 (io, unified)
	Driver         cgroup.Driver  // the kubelet's and the runtime's cgroup driver
	Runtime        string         // the CRI runtime: "containerd"
	RuntimeVersion string         // as the runtime reports it: "1.6.20", "2.4.2"
	CgroupRoot     string         // where cgroupfs is mounted on the node; "" is /sys/fs/cgroup
}

// String is "cgroup v1, cgroupfs driver, containerd 1.6.20".
func (l Layout) String() string {
	return fmt.Sprintf("cgroup %s, %s driver, %s %s", l.Cgroup, l.Driver, l.Runtime, l.RuntimeVersion)
}

func (l Layout) root() string {
	if l.CgroupRoot == "" {
		return cgroup.DefaultRoot
	}
	return l.CgroupRoot
}

// IODir is the on-node directory of the root cgroup of the hierarchy that
// holds the block IO controller: /sys/fs/cgroup/blkio on v1, /sys/fs/cgroup
// on v2.
func (l Layout) IODir() string {
	if l.Cgroup == cgroup.V1 {
		return path.Join(l.root(), "blkio")
	}
	return l.root()
}

// KubepodsCgroup is the on-node directory of the kubelet's kubepods cgroup
// in the IO hierarchy: .../kubepods (cgroupfs) or .../kubepods.slice
// (systemd), where DATA_TOTAL_IOPS goes.
func (l Layout) KubepodsCgroup() string {
	if l.Driver == cgroup.Systemd {
		return path.Join(l.IODir(), "kubepods.slice")
	}
	return path.Join(l.IODir(), "kubepods")
}

// PodCgroup is the on-node directory of the pod's cgroup in the IO
// hierarchy, by its QoS class (status.qosClass, which the apiserver sets):
//
//	cgroupfs: kubepods/pod<uid> (Guaranteed), kubepods/burstable/pod<uid>,
//	          kubepods/besteffort/pod<uid>
//	systemd:  kubepods.slice/kubepods-pod<uid_>.slice (Guaranteed),
//	          kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice, ...
//
// where uid_ is the UID with "-" as "_" (a dash starts a child slice).
func (l Layout) PodCgroup(pod *corev1.Pod) (string, error) {
	uid := string(pod.UID)
	if uid == "" {
		return "", fmt.Errorf("pod %s/%s has no UID (not created yet?)", pod.Namespace, pod.Name)
	}
	var qos string
	switch pod.Status.QOSClass {
	case corev1.PodQOSGuaranteed:
	case corev1.PodQOSBurstable:
		qos = "burstable"
	case corev1.PodQOSBestEffort:
		qos = "besteffort"
	default:
		return "", fmt.Errorf("pod %s/%s: QoS class %q: want Guaranteed, Burstable or BestEffort (the apiserver sets status.qosClass)", pod.Namespace, pod.Name, pod.Status.QOSClass)
	}
	switch l.Driver {
	case cgroup.Cgroupfs:
		return path.Join(l.KubepodsCgroup(), qos, "pod"+uid), nil
	case cgroup.Systemd:
		slice := "kubepods-"
		if qos != "" {
			slice += qos + "-"
		}
		p, err := cgroup.ExpandSlice(slice + "pod" + strings.ReplaceAll(uid, "-", "_") + ".slice")
		if err != nil {
			return "", fmt.Errorf("pod %s/%s: %w", pod.Namespace, pod.Name, err)
		}
		return path.Join(l.IODir(), p), nil
	}
	return "", fmt.Errorf("unknown cgroup driver %v", l.Driver)
}

// ContainerCgroup is the on-node directory of the container's cgroup in the
// IO hierarchy: <pod cgroup>/<id> (cgroupfs) or <pod
// cgroup>/cri-containerd-<id>.scope (systemd, containerd).
func (l Layout) ContainerCgroup(pod *corev1.Pod, containerID string) (string, error) {
	if containerID == "" || strings.ContainsAny(containerID, "/:") {
		return "", fmt.Errorf("pod %s/%s: container ID %q", pod.Namespace, pod.Name, containerID)
	}
	dir, err := l.PodCgroup(pod)
	if err != nil {
		return "", err
	}
	if l.Driver == cgroup.Cgroupfs {
		return path.Join(dir, containerID), nil
	}
	if l.Runtime != "containerd" {
		return "", fmt.Errorf("systemd scope of a %s container: only containerd's (cri-containerd-<id>.scope) is known", l.Runtime)
	}
	return path.Join(dir, "cri-containerd-"+containerID+".scope"), nil
}

// LimitFile is the name of the cgroup file holding dimension d's limits:
// v1 blkio.throttle.<d>_device, v2 io.max (all four).
func (l Layout) LimitFile(d limits.Dimension) string {
	if l.Cgroup == cgroup.V1 {
		return cgroup.V1File(d)
	}
	return cgroup.IOMaxFile
}

// limitFiles are the distinct files of LimitFile, in dimension order.
func (l Layout) limitFiles() []string {
	var out []string
	for _, d := range limits.Dimensions {
		if f := l.LimitFile(d); len(out) == 0 || out[len(out)-1] != f {
			out = append(out, f)
		}
	}
	return out
}

// Node is the machine the cluster's kubelet runs on, as the harness (the
// e2e checks, the demo, `make up`) uses it. The host node (this machine)
// implements it in hostnode.go; a VM node implements it through a guest
// agent. Paths are paths ON THE NODE; ctx bounds each call. Every method
// works as root on the node. A Node is valid from Up until Down.
type Node interface {
	// Layout is the node's cgroup version and driver and its runtime. It
	// is what the checks derive cgroup paths from (Layout.ContainerCgroup,
	// PodCgroup, KubepodsCgroup) and how IOLimits reads limit files.
	Layout() Layout

	// Run runs the program name (looked up in the node's PATH) with args
	// as root on the node, waits for it and returns its combined output. A
	// non-zero exit is an error that includes the output.
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
	// ReadFile returns the contents of the file at path on the node.
	ReadFile(ctx context.Context, path string) ([]byte, error)
	// WriteFile writes data to the file at path on the node (created with
	// perm, or truncated), making its parent directories.
	WriteFile(ctx context.Context, path string, data []byte, perm os.FileMode) error

	// DataDir is the data disk's mount point on the node: a directory on
	// the node's data disk (its own filesystem; mounted shared, as systemd
	// mounts everything, so that a DaemonSet's HostToContainer mount of it
	// works), what the applier gets as DATA_MOUNT and pods mount as a
	// hostPath. Empty and writable by pods at Up.
	DataDir() string
	// DataDisk is the number of the block device mounted at DataDir: the
	// device the applier must limit, and the one the checks read.
	DataDisk() device.Device

	// Dir is a directory on the node the harness owns: certificates and
	// files it writes for programs it starts on the node (under Dir/kdg),
	// logs of those programs (Dir/logs). Removed at teardown.
	Dir() string
	// Kubeconfig is the on-node path of a cluster-admin kubeconfig that
	// programs on the node use to reach the apiserver.
	Kubeconfig() string
	// ContainerdSocket is the on-node path of the kubelet's containerd
	// socket, alone in its directory (a DaemonSet mounts that directory).
	ContainerdSocket() string
	// Ctr runs containerd's ctr on the node against that containerd, in
	// the kubelet's namespace k8s.io, and returns its output.
	Ctr(ctx context.Context, args ...string) ([]byte, error)
	// ImportImage imports an image tar (OCI layout or docker save), a
	// file on the HOST, into that containerd's k8s.io namespace.
	ImportImage(ctx context.Context, hostTar string) error

	// Start starts spec's program on the node detached from the caller
	// (its own process group or service, surviving the caller's exit),
	// its output in Dir/logs/<spec.Name>.log (appended), and returns at
	// once. It is stopped by Down if still running.
	Start(ctx context.Context, spec ProcSpec) (Proc, error)
	// Program is the on-node path of bin, a program on the HOST, for Run:
	// bin itself on the host node; a VM node copies it in (once per
	// content).
	Program(ctx context.Context, bin string) (string, error)
	// FreePorts returns n TCP ports free on the node's loopback.
	FreePorts(ctx context.Context, n int) ([]int, error)
	// HTTPGet GETs http://<addr><path> from the node's network (addr is
	// host:port: 127.0.0.1 where the binaries' probes listen, a Service's
	// ClusterIP), a new connection each time, and returns the status and
	// body.
	HTTPGet(ctx context.Context, addr, path string) (status int, body []byte, err error)
	// TLSPeer dials addr over TLS from the node's network with SNI
	// serverName, as the apiserver calls a webhook, and returns the
	// certificate the server presents, unverified (the caller compares).
	TLSPeer(ctx context.Context, addr, serverName string) (*x509.Certificate, error)
}

// ProcSpec is a program to run on the node (Node.Start).
type ProcSpec struct {
	// Name names the process (its log is Dir/logs/<Name>.log).
	Name string
	// Bin is the program, a file on the HOST (the host node runs it in
	// place; a VM node copies it in).
	Bin  string
	Args []string
	// Env is KEY=VALUE added to the process's environment.
	Env []string
}

// LogPath is the on-node path of the log of a process named name
// (Node.Start).
func LogPath(n Node, name string) string { return path.Join(n.Dir(), "logs", name+".log") }

// IOLimits reads the block IO limits set in the cgroup at dir (on the node)
// for every device, whatever the layout: cgroup v1's four
// blkio.throttle.*_device files, or cgroup v2's io.max. A device without a
// limit has no entry.
func IOLimits(ctx context.Context, n Node, dir string) (map[device.Device]limits.Limits, error) {
	l := n.Layout()
	files := map[string]string{}
	for _, f := range l.limitFiles() {
		b, err := n.ReadFile(ctx, path.Join(dir, f))
		if err != nil {
			return nil, err
		}
		files[f] = string(b)
	}
	return ParseIOLimits(l, files)
}

// DataDiskIOStat is the IO counters of the cgroup directory dir on the
// node (its descendants included) for the node's data disk, whatever the
// layout (cgroup.StatsOf).
func DataDiskIOStat(ctx context.Context, n Node, dir string) (cgroup.IOStat, error) {
	disk := n.DataDisk()
	s, err := cgroup.StatsOf(n.Layout().Cgroup, dir, func(name string) (string, error) {
		b, err := n.ReadFile(ctx, path.Join(dir, name))
		return string(b), err
	}, []device.Device{disk})
	if err != nil {
		return cgroup.IOStat{}, err
	}
	return s[disk], nil
}

// IOStatSample is a cgroup's counters on the data disk at a time, the
// node's clock.
type IOStatSample struct {
	At time.Time
	cgroup.IOStat
}

// SampleDataDiskIOStat is DataDiskIOStat every interval until the file
// stop appears on the node (removed then) or for at most d, read by one
// shell loop on the node, so that each sample's time is the node's clock
// next to its read rather than a round trip away.
func SampleDataDiskIOStat(ctx context.Context, n Node, dir, stop string, d, every time.Duration) ([]IOStatSample, error) {
	// Every file cgroup.StatsOf may ask for, on either version; a missing
	// one is left out of its sample.
	const files = "io.stat blkio.throttle.io_serviced_recursive blkio.throttle.io_serviced blkio.throttle.io_service_bytes_recursive blkio.throttle.io_service_bytes"
	script := fmt.Sprintf(`end=$(( $(date +%%s) + %d )); while [ ! -e "$2" ] && [ "$(date +%%s)" -lt "$end" ]; do echo "@ $(date +%%s%%N)"; for f in %s; do if [ -e "$1/$f" ]; then echo "# $f"; cat "$1/$f"; fi; done; sleep %.3f; done; rm -f "$2"`,
		int((d+time.Second-1)/time.Second), files, every.Seconds())
	out, err := n.Run(ctx, "sh", "-c", script, "sh", dir, stop)
	if err != nil {
		return nil, fmt.Errorf("sampling %s's io counters: %w", dir, err)
	}
	return parseIOStatSamples(string(out), n.Layout().Cgroup, dir, n.DataDisk())
}

// parseIOStatSamples reads SampleDataDiskIOStat's output: per sample an
// "@ <unix ns>" line, then per file a "# <name>" line and its contents.
func parseIOStatSamples(out string, v cgroup.Version, dir string, disk device.Device) ([]IOStatSample, error) {
	var samples []IOStatSample
	var at time.Time
	var files map[string]*strings.Builder
	var file string
	flush := func() error {
		if files == nil {
			return nil
		}
		st, err := cgroup.StatsOf(v, dir, func(name string) (string, error) {
			b, ok := files[name]
			if !ok {
				return "", fmt.Errorf("%s: %w", name, os.ErrNotExist)
			}
			return b.String(), nil
		}, []device.Device{disk})
		if err != nil {
			return fmt.Errorf("the sample at %s: %w", at.Format(time.RFC3339Nano), err)
		}
		samples = append(samples, IOStatSample{At: at, IOStat: st[disk]})
		return nil
	}
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "@ "):
			if err := flush(); err != nil {
				return nil, err
			}
			ns, err := strconv.ParseInt(strings.TrimPrefix(line, "@ "), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("sampling %s: a time %q: %w", dir, line, err)
			}
			at, files, file = time.Unix(0, ns), map[string]*strings.Builder{}, ""
		case strings.HasPrefix(line, "# ") && files != nil:
			file = strings.TrimPrefix(line, "# ")
			files[file] = &strings.Builder{}
		case file != "":
			files[file].WriteString(line + "\n")
		}
	}
	if err := flush(); err != nil {
		return nil, err
	}
	if len(samples) < 2 {
		return nil, fmt.Errorf("sampling %s's io counters: %d samples, want 2 or more: %.300s", dir, len(samples), out)
	}
	return samples, nil
}

// Rates is the read and write IOs a second between samples at least
// window apart, both taken from from to to, one pair per sample from the
// first: how fast the cgroup went, window by window.
func Rates(samples []IOStatSample, from, to time.Time, window time.Duration) (read, write []float64) {
	var in []IOStatSample
	for _, s := range samples {
		if !s.At.Before(from) && !s.At.After(to) {
			in = append(in, s)
		}
	}
	for i, a := range in {
		for _, b := range in[i+1:] {
			if dt := b.At.Sub(a.At); dt >= window {
				read = append(read, float64(b.ReadIOs-a.ReadIOs)/dt.Seconds())
				write = append(write, float64(b.WriteIOs-a.WriteIOs)/dt.Seconds())
				break
			}
		}
	}
	return read, write
}

// ParseIOLimits is IOLimits on the contents of the layout's limit files
// (by file name).
func ParseIOLimits(l Layout, files map[string]string) (map[device.Device]limits.Limits, error) {
	if l.Cgroup != cgroup.V1 {
		out, err := cgroup.ParseIOMax(files[cgroup.IOMaxFile])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", cgroup.IOMaxFile, err)
		}
		return out, nil
	}
	out := map[device.Device]limits.Limits{}
	for _, d := range limits.Dimensions {
		f := cgroup.V1File(d)
		got, err := cgroup.ParseV1File(files[f])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		for dev, v := range got {
			l := out[dev]
			l.Set(d, v)
			out[dev] = l
		}
	}
	return out, nil
}

// FormatIOLimits renders IOLimits' result for messages:
// "7:0 read-iops=200 write-iops=200", "none" when empty.
func FormatIOLimits(m map[device.Device]limits.Limits) string {
	if len(m) == 0 {
		return "none"
	}
	var lines []string
	for d, l := range m {
		lines = append(lines, d.String()+" "+l.String())
	}
	sort.Strings(lines)
	return strings.Join(lines, "; ")
}

// ProcAlive reports whether p, started on n, still runs: the same PID with
// the same start time (a recycled PID is another process).
func ProcAlive(ctx context.Context, n Node, p Proc) bool {
	if p.PID <= 0 {
		return false
	}
	b, err := n.ReadFile(ctx, fmt.Sprintf("/proc/%d/stat", p.PID))
	if err != nil {
		return false
	}
	st := parseStartTime(string(b))
	return st != "" && st == p.StartTime
}

// Signal sends the signal named sig ("TERM", "KILL") to the process pid on
// n.
func Signal(ctx context.Context, n Node, pid int, sig string) error {
	_, err := n.Run(ctx, "kill", "-s", sig, strconv.Itoa(pid))
	return err
}

// StopProc stops p on n: SIGTERM (SIGKILL at once if kill), then SIGKILL
// after grace; it returns once p is gone (or after a further 5 s).
func StopProc(ctx context.Context, n Node, p Proc, kill bool, grace time.Duration) {
	if !ProcAlive(ctx, n, p) {
		return
	}
	sig := "TERM"
	if kill {
		sig = "KILL"
	}
	_ = Signal(ctx, n, p.PID, sig)
	deadline := time.Now().Add(grace)
	for ProcAlive(ctx, n, p) && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	if ProcAlive(ctx, n, p) {
		_ = Signal(ctx, n, p.PID, "KILL")
		for i := 0; i < 100 && ProcAlive(ctx, n, p); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// WriteDataFile writes mib MiB of random data to path on the node and
// syncs it, from a process outside any throttled cgroup, with real blocks
// (reads of never-written extents would not reach the disk).
func WriteDataFile(ctx context.Context, n Node, path string, mib int) error {
	_, err := n.Run(ctx, "dd", "if=/dev/urandom", "of="+path, "bs=1M", "count="+strconv.Itoa(mib), "conv=fsync", "status=none")
	return err
}
