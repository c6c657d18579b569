package cluster

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
)

// The cgroup v2 node kind (V2Node): a qemu VM under software emulation
// (TCG; there is no KVM here) booting the cached image (vmimage.go) to
// systemd, with etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, containerd 2.x and the kubelet inside. Up restores the
// image's snapshot (the VM saved once its node was Ready) instead of
// booting, sets the guest clock, and reaches the guest only through two qemu
// user-mode forwards bound to the host's 127.0.0.1: the agent
// (v2node/agent: commands, files, programs, probes; authenticated with the
// image's token) and the apiserver (KUBECONFIG works from the host). The
// guest has no route anywhere (-netdev user,restrict=on). Down stops qemu by
// PID and removes the VM's disk overlays; nothing else on the host changed.

func init() {
	// Slowdown 3: under software emulation a pod start took 8–50 s, and the
	// applier's start-up (24 s to reach containerd, then a first full pass of
	// over 35 s while pods started) outlasted the host's 60 s readiness wait.
	RegisterNodeKind(V2Node, NodeKindImpl{Missing: vmMissing, Up: vmUp, Down: vmDown, Slowdown: 3})
}

// VMState is the v2 node's VM in State: what Down removes.
type VMState struct {
	Image       string `json:"image"`       // image-<key> in the cache
	Snapshot    string `json:"snapshot"`    // its snapshot dir
	Dir         string `json:"dir"`         // DIR/vm: overlays, monitor socket, console log
	AgentPort   int    `json:"agentPort"`   // host 127.0.0.1 port forwarded to the agent
	APIPort     int    `json:"apiPort"`     // host 127.0.0.1 port forwarded to the apiserver
	QemuVersion string `json:"qemuVersion"` // informational
}

// vmQemuArgs is qemu's command line for the image, with disks root and data
// (qcow2), the monitor socket mon and the console log serial. The snapshot
// is keyed by it with those four as placeholders: a restore must use the
// same machine.
func vmQemuArgs(im vmImage, root, data, mon, serial string) []string {
	return []string{
		"-name", "kdg-v2node", "-accel", "tcg,thread=multi", "-machine", "q35", "-cpu", "max",
		"-smp", "2", "-m", strconv.Itoa(vmMemMiB), "-nodefaults", "-display", "none", "-no-reboot",
		"-kernel", im.path("vmlinuz"), "-initrd", im.path("initrd.img"), "-append", vmKernelArgs,
		"-drive", "file=" + root + ",if=virtio,format=qcow2,cache=unsafe",
		"-drive", "file=" + data + ",if=virtio,format=qcow2,cache=none",
		"-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
		"-device", "virtio-rng-pci",
		"-serial", "file:" + serial, "-monitor", "unix:" + mon + ",server,nowait",
	}
}

func vmSnapshotKeyArgs(im vmImage) []string { return vmQemuArgs(im, "ROOT", "DATA", "MON", "SERIAL") }

// vmm is a running VM: its qemu monitor and its agent.
type vmm struct {
	mon   string // monitor socket
	agent *agentClient
	proc  Proc
}

// startVM starts qemu (through c.start, so it is recorded and Down stops
// it) on overlays in dir backed by the disks base (root.X and data.X with
// their format), restoring state when set, and forwards fresh host
// loopback ports to the agent and the apiserver.
func (c *Cluster) startVM(ctx context.Context, im vmImage, dir, rootBase, dataBase, baseFmt, state string) (*vmm, [2]int, error) {
	var ports [2]int
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, ports, err
	}
	root, data := filepath.Join(dir, "root.qcow2"), filepath.Join(dir, "data.qcow2")
	for _, d := range [][2]string{{rootBase, root}, {dataBase, data}} {
		if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", d[0], "-F", baseFmt, d[1]).CombinedOutput(); err != nil {
			return nil, ports, fmt.Errorf("qemu-img create %s: %w: %s", d[1], err, out)
		}
	}
	mon := filepath.Join(dir, "monitor.sock")
	args := vmQemuArgs(im, root, data, mon, filepath.Join(dir, "console.log"))
	if state != "" {
		args = append(args, "-incoming", "exec:cat "+shellQuote(state))
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, ports, err
	}
	p, err := c.start("qemu", qemu, args...)
	if err != nil {
		return nil, ports, err
	}
	v := &vmm{mon: mon, proc: p}
	if err := c.wait(ctx, "qemu monitor", p, 30*time.Second, func() error { _, err := v.hmp("info status"); return err }); err != nil {
		return nil, ports, err
	}
	free, err := FreeLocalPorts(2)
	if err != nil {
		return nil, ports, err
	}
	ports = [2]int{free[0], free[1]}
	for i, guest := range []int{vmAgentPort, vmAPIServerPort} {
		out, err := v.hmp(fmt.Sprintf("hostfwd_add n0 tcp:127.0.0.1:%d-:%d", ports[i], guest))
		if err != nil || strings.TrimSpace(out) != "" {
			return nil, ports, fmt.Errorf("hostfwd_add 127.0.0.1:%d → guest :%d: %v %s", ports[i], guest, err, out)
		}
	}
	if state != "" {
		// The state was saved from a stopped guest: once loaded, it stays
		// paused until told to continue.
		if err := c.wait(ctx, "loading the VM state", p, 3*time.Minute, func() error {
			out, err := v.hmp("info migrate")
			if err != nil {
				return err
			}
			if strings.Contains(out, "Migration status: failed") {
				return Final(fmt.Errorf("loading the VM state failed: %s", out))
			}
			if !strings.Contains(out, "Migration status: completed") {
				return errors.New("still loading")
			}
			return nil
		}); err != nil {
			return nil, ports, err
		}
		if _, err := v.hmp("cont"); err != nil {
			return nil, ports, err
		}
	}
	if v.agent, err = imageAgent(im.Dir, ports[0]); err != nil {
		return nil, ports, err
	}
	return v, ports, nil
}

// hmp runs one human monitor command and returns its output.
func (v *vmm) hmp(cmd string) (string, error) {
	conn, err := net.DialTimeout("unix", v.mon, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(conn)
	readPrompt := func() (string, error) {
		var buf bytes.Buffer
		for !bytes.HasSuffix(buf.Bytes(), []byte("(qemu) ")) {
			b, err := r.ReadByte()
			if err != nil {
				return buf.String(), err
			}
			buf.WriteByte(b)
		}
		return strings.TrimSuffix(buf.String(), "(qemu) "), nil
	}
	if _, err := readPrompt(); err != nil {
		return "", err
	}
	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", err
	}
	out, err := readPrompt()
	// The monitor echoes the command line (with terminal escapes) first.
	if i := strings.Index(out, "\n"); i >= 0 {
		out = out[i+1:]
	}
	return strings.ReplaceAll(out, "\r", ""), err
}

// waitGuest waits for the agent, then sets the guest's clock to the host's
// (a restored guest's clock stands at the time of its snapshot).
func (v *vmm) waitGuest(ctx context.Context, c *Cluster, timeout time.Duration) error {
	if err := c.wait(ctx, "the guest agent", v.proc, timeout, func() error {
		_, err := v.agent.run(ctx, nil, "true")
		return err
	}); err != nil {
		return err
	}
	now := time.Now()
	_, err := v.agent.run(ctx, nil, "date", "-u", "-s", "@"+strconv.FormatInt(now.Unix(), 10)+"."+fmt.Sprintf("%09d", now.Nanosecond()))
	return err
}

// waitNodeReady waits for the apiserver and for the node's Ready condition
// heartbeat newer than since.
func (c *Cluster) waitNodeReady(ctx context.Context, p Proc, since time.Time, timeout time.Duration) error {
	return c.wait(ctx, "node "+c.NodeName+" Ready", p, timeout, func() error {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status != corev1.ConditionTrue {
					return fmt.Errorf("Ready=%s: %s", cond.Status, cond.Message)
				}
				if cond.LastHeartbeatTime.Time.Before(since.Add(-time.Second)) {
					return fmt.Errorf("Ready, but last heartbeat %s (before %s)", cond.LastHeartbeatTime.Time.Format(time.RFC3339), since.Format(time.RFC3339))
				}
				return nil
			}
		}
		return errors.New("no Ready condition yet")
	})
}

// connect writes DIR/admin.kubeconfig for the forwarded apiserver port and
// makes c.Client; the CA is the image's.
func (c *Cluster) connectVM(im vmImage, apiPort int) error {
	if err := os.MkdirAll(c.path("pki"), 0o700); err != nil {
		return err
	}
	for _, f := range []string{"ca.crt", "admin.crt", "admin.key"} {
		b, err := os.ReadFile(im.path("host", f))
		if err != nil {
			return err
		}
		if err := writeFile(c.path("pki"), f, b); err != nil {
			return err
		}
	}
	ca, err := loadCA(im.path("host"))
	if err != nil {
		return err
	}
	c.ca = ca
	c.APIServerPort = apiPort
	return c.connectAdmin()
}

// ensureVMSnapshot boots the image once, waits until its node is Ready and
// saves the machine (disk overlays + state) into its snapshot dir, unless
// it is there.
func ensureVMSnapshot(ctx context.Context, cfg Config, im vmImage) (string, error) {
	sd, err := im.snapshotDir(vmSnapshotKeyArgs(im))
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(sd, "done")); err == nil {
		return sd, nil
	}
	unlock, err := lockCache(VMCacheDir())
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(sd, "done")); err == nil {
		return sd, nil
	}
	tmp := sd + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Join(tmp, "logs"), 0o755); err != nil {
		return "", err
	}
	c := &Cluster{Config: cfg}
	c.Dir = tmp
	c.NodeName = vmNodeName
	c.State.Kubeconfig = filepath.Join(tmp, "admin.kubeconfig")
	c.logf("v2 node: first boot of %s to save a snapshot (once per image; a few minutes under emulation)", filepath.Base(im.Dir))
	t := time.Now()
	v, ports, err := c.startVM(ctx, im, tmp, im.path("root.img"), im.path("data.img"), "raw", "")
	stopQemu := func() {
		for _, p := range c.Procs {
			stop(p, 10*time.Second)
		}
	}
	if err != nil {
		stopQemu()
		return "", err
	}
	if err := v.waitGuest(ctx, c, 10*time.Minute); err != nil {
		stopQemu()
		return "", fmt.Errorf("%w (console: %s)", err, lastLines(readFileString(filepath.Join(tmp, "console.log")), 20))
	}
	c.logf("v2 node: agent up %s after qemu started", time.Since(t).Round(time.Second))
	if err := c.connectVM(im, ports[1]); err != nil {
		stopQemu()
		return "", err
	}
	if err := c.waitNodeReady(ctx, v.proc, time.Time{}, 10*time.Minute); err != nil {
		stopQemu()
		return "", err
	}
	if err := c.wait(ctx, "the default ServiceAccount (kube-controller-manager)", Proc{}, 5*time.Minute, func() error {
		return c.defaultServiceAccountReady(ctx)
	}); err != nil {
		stopQemu()
		return "", err
	}
	c.logf("v2 node: node Ready %s after qemu started; saving", time.Since(t).Round(time.Second))
	// Let the node settle (its first status updates, the kube-root-ca
	// ConfigMap), drop the guest's page cache (a smaller state file), save.
	time.Sleep(10 * time.Second)
	v.agent.run(ctx, nil, "sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches")
	v.agent.http.CloseIdleConnections()
	if err := saveVM(ctx, v, filepath.Join(tmp, "vmstate")); err != nil {
		stopQemu()
		return "", err
	}
	stopQemu()
	for _, f := range []string{"monitor.sock", "admin.kubeconfig", "pki"} {
		os.RemoveAll(filepath.Join(tmp, f))
	}
	if err := os.WriteFile(filepath.Join(tmp, "done"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, sd); err != nil {
		return "", err
	}
	c.logf("v2 node: snapshot saved in %s (%s since qemu started)", sd, time.Since(t).Round(time.Second))
	return sd, nil
}

// saveVM stops the guest and migrates its state to the file state.
func saveVM(ctx context.Context, v *vmm, state string) error {
	if _, err := v.hmp("stop"); err != nil {
		return err
	}
	if out, err := v.hmp(`migrate "exec:cat > ` + state + `"`); err != nil || strings.TrimSpace(out) != "" {
		return fmt.Errorf("migrate: %v %s", err, out)
	}
	return Poll(ctx, "saving the VM state", 500*time.Millisecond, 5*time.Minute, func() error {
		out, err := v.hmp("info migrate")
		if err != nil {
			return err
		}
		switch {
		case strings.Contains(out, "Migration status: completed"):
			return nil
		case strings.Contains(out, "Migration status: failed"):
			return Final(fmt.Errorf("migration failed: %s", out))
		}
		return errors.New("still saving")
	})
}

func readFileString(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// PrepareV2Node builds the v2 node's image and its snapshot when they are
// not in the cache yet (make v2node; Up does the same on its first run).
func PrepareV2Node(ctx context.Context, cfg Config) error {
	cfg.Node = V2Node
	if err := cfg.withDefaults(); err != nil {
		return err
	}
	if m := cfg.Missing(); len(m) > 0 {
		return fmt.Errorf("missing: %s", strings.Join(m, "; "))
	}
	t := time.Now()
	im, err := ensureVMImage(ctx, cfg)
	if err != nil {
		return err
	}
	sd, err := ensureVMSnapshot(ctx, cfg, im)
	if err != nil {
		return err
	}
	fmt.Fprintf(cfg.Log, "cluster: v2 node image and snapshot ready in %s (%s)\n", time.Since(t).Round(time.Second), sd)
	return nil
}

// vmStateDirEntries are the names the v2 node writes in its state dir.
var vmStateDirEntries = map[string]bool{"logs": true, "pki": true, "vm": true, "admin.kubeconfig": true, "state.json.tmp": true}

// vmUp is Up on the v2 node: image and snapshot (built when absent), a VM
// restored from the snapshot on fresh disk overlays, the guest clock set,
// the node Ready.
func vmUp(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if cfg.NodeName != vmNodeName {
		return nil, fmt.Errorf("the v2 node's name is %s (its image's PKI and kubelet are made for it), not %s", vmNodeName, cfg.NodeName)
	}
	if _, err := os.Stat(stateFile(cfg.Dir)); err == nil {
		return nil, fmt.Errorf("%s exists: a cluster is up or was not torn down; run `go run ./hack/cluster/cmd down -dir %s`", stateFile(cfg.Dir), cfg.Dir)
	}
	if err := EmptyOwnedDir(cfg.Dir, vmStateDirEntries, "the cluster harness"); err != nil {
		return nil, err
	}
	total := time.Now()
	timings := &[]Timing{}
	step := func(name string, t time.Time) {
		*timings = append(*timings, Timing{name, time.Since(t)})
		fmt.Fprintf(cfg.Log, "cluster: %s ready in %s\n", name, time.Since(t).Round(time.Millisecond))
	}
	t := time.Now()
	im, err := ensureVMImage(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("v2 node image: %w", err)
	}
	step("image", t)
	t = time.Now()
	sd, err := ensureVMSnapshot(ctx, cfg, im)
	if err != nil {
		return nil, fmt.Errorf("v2 node snapshot: %w", err)
	}
	step("snapshot", t)

	// The VM is always a Full node: the pods get a network of their own on
	// a bridge inside it, and a controller-manager, a scheduler, kube-proxy
	// and the ServiceAccount admission plugin run in the guest
	// (vmGuestFiles). The host reaches a Service's ClusterIP only through
	// the node (Node.HTTPGet, Node.TLSPeer).
	cfg.PodNetwork, cfg.Full = true, true
	c := &Cluster{Config: cfg}
	defer func() { c.Timings = *timings }()
	c.State.Node = V2Node
	c.State.Kubeconfig = c.path("admin.kubeconfig")
	c.State.ContainerdAddress = vmContainerdSock
	c.State.VM = &VMState{Image: im.Dir, Snapshot: sd, Dir: c.path("vm")}
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		return nil, err
	}
	if err := c.save(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			c.logf("up failed: %v; tearing down (logs in %s, console in %s)", err, c.path("logs"), c.path("vm", "console.log"))
			if derr := Down(c.Dir, c.Log); derr != nil {
				err = errors.Join(err, fmt.Errorf("teardown: %w", derr))
			}
		}
	}()
	t = time.Now()
	v, ports, err := c.startVM(ctx, im, c.path("vm"), filepath.Join(sd, "root.qcow2"), filepath.Join(sd, "data.qcow2"), "qcow2", filepath.Join(sd, "vmstate"))
	if err != nil {
		return nil, err
	}
	c.State.VM.AgentPort, c.State.VM.APIPort = ports[0], ports[1]
	if err := c.save(); err != nil {
		return nil, err
	}
	if err := v.waitGuest(ctx, c, 3*time.Minute); err != nil {
		return nil, err
	}
	clockSet := time.Now()
	step("vm restored", t)
	t = time.Now()
	if err := c.connectVM(im, ports[1]); err != nil {
		return nil, err
	}
	if err := c.waitNodeReady(ctx, v.proc, clockSet, 3*time.Minute); err != nil {
		return nil, err
	}
	step("node Ready", t)
	// The snapshot has them; a cache saved otherwise is caught here.
	t = time.Now()
	if err := c.wait(ctx, "the default ServiceAccount (kube-controller-manager)", v.proc, 2*time.Minute, func() error {
		return c.defaultServiceAccountReady(ctx)
	}); err != nil {
		return nil, err
	}
	step("default ServiceAccount", t)
	n := &vmNode{c: c, agent: v.agent, uploaded: map[string]string{}}
	ver, err := n.Ctr(ctx, "version")
	if err != nil {
		return nil, err
	}
	dev, err := n.ReadFile(ctx, "/sys/block/"+path.Base(vmDataDevice)+"/dev")
	if err != nil {
		return nil, err
	}
	if n.dataDisk, err = device.Parse(strings.TrimSpace(string(dev))); err != nil {
		return nil, fmt.Errorf("the data disk %s: %w", vmDataDevice, err)
	}
	n.layout = Layout{Cgroup: cgroup.V2, Driver: cgroup.Systemd, Runtime: "containerd", RuntimeVersion: serverVersion(string(ver)), CgroupRoot: cgroup.DefaultRoot}
	c.Node = n
	c.State.Layout = &n.layout
	if err := c.save(); err != nil {
		return nil, err
	}
	c.logf("node layout: %s; data disk %s (%s) at %s", n.layout, vmDataDevice, n.dataDisk, vmDataDir)
	c.logf("node %s Ready; cluster up in %s (kubeconfig %s; agent 127.0.0.1:%d, apiserver 127.0.0.1:%d)", c.NodeName, time.Since(total).Round(time.Millisecond), c.Kubeconfig, ports[0], ports[1])
	return c, nil
}

// vmDown stops the VM (qemu, by PID and start time) and removes its disk
// overlays; the cached image and snapshot stay.
func vmDown(dir string, st State, log io.Writer) error {
	t := time.Now()
	if st.VM != nil {
		saveGuestLogs(st.VM, filepath.Join(dir, "logs"), log)
	}
	for i := len(st.Procs) - 1; i >= 0; i-- {
		stop(st.Procs[i], 10*time.Second)
	}
	var errs []error
	for _, p := range st.Procs {
		if p.Alive() {
			errs = append(errs, fmt.Errorf("%s (pid %d) still runs", p.Name, p.PID))
		}
	}
	if st.VM != nil && st.VM.Dir != "" && len(errs) == 0 {
		if err := os.RemoveAll(st.VM.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	fmt.Fprintf(log, "cluster: v2 node down in %s\n", time.Since(t).Round(time.Millisecond))
	return errors.Join(errs...)
}

// saveGuestLogs copies into logsDir, on the host, what is lost when the VM
// stops: the journal of each of the node's services (node-<unit>.log), the
// logs of the programs the harness started on the node (node-<name>.log)
// and the VM's console. Best effort, bounded to a minute: Down goes on
// whatever it could copy, and says what it could not.
func saveGuestLogs(vm *VMState, logsDir string, log io.Writer) {
	if err := os.MkdirAll(logsDir, 0o755); err != nil {
		fmt.Fprintf(log, "cluster: keeping the node's logs: %v\n", err)
		return
	}
	var errs []error
	save := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(logsDir, name), b, 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(vm.Dir, "console.log")); err == nil {
		save("node-console.log", b)
	}
	a, err := imageAgent(vm.Image, vm.AgentPort)
	if vm.AgentPort == 0 || err != nil {
		return // the VM never got as far as its agent
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, u := range vmUnits {
		b, err := a.run(ctx, nil, "journalctl", "--no-pager", "-o", "short-precise", "-u", u)
		if err != nil {
			errs = append(errs, fmt.Errorf("journal of %s: %w", u, err))
			if ctx.Err() != nil {
				// The guest does not answer: what qemu says of it
				// (running or stopped, where its vCPUs are).
				save("qemu-monitor.log", []byte(vmMonitorReport(filepath.Join(vm.Dir, "monitor.sock"))))
				break
			}
			continue
		}
		save("node-"+strings.TrimSuffix(u, path.Ext(u))+".log", b)
	}
	if out, err := a.run(ctx, nil, "ls", path.Join(vmHarnessDir, "logs")); err == nil {
		for _, name := range strings.Fields(string(out)) {
			if b, err := a.readFile(ctx, path.Join(vmHarnessDir, "logs", name)); err == nil {
				save("node-"+name, b)
			} else {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(log, "cluster: some of the node's logs were not kept: %v\n", err)
	}
	fmt.Fprintf(log, "cluster: the node's journals and logs copied to %s\n", logsDir)
}

// vmMonitorReport is the qemu monitor's view of a guest that stopped
// answering: its run state, and each vCPU's instruction pointer and halt
// flag twice, a second apart (a pointer that moves is a busy guest, HLT=1
// an idle one).
func vmMonitorReport(mon string) string {
	v := &vmm{mon: mon}
	var b strings.Builder
	for i, cmd := range []string{"info status", "info registers -a", "info registers -a"} {
		if i == 2 {
			time.Sleep(time.Second)
		}
		out, err := v.hmp(cmd)
		if strings.HasPrefix(cmd, "info registers") {
			var rips []string
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "CPU#") || strings.HasPrefix(l, "RIP=") {
					rips = append(rips, l)
				}
			}
			out = strings.Join(rips, "\n") + "\n"
		}
		fmt.Fprintf(&b, "(qemu) %s\n%s", cmd, out)
		if err != nil {
			fmt.Fprintf(&b, "error: %v\n", err)
		}
	}
	return b.String()
}

// vmNode is the v2 node's Node: everything through the guest agent.
type vmNode struct {
	c        *Cluster
	agent    *agentClient
	layout   Layout
	dataDisk device.Device

	mu       sync.Mutex
	uploaded map[string]string // host binary (path, size, mtime) → its copy on the node
}

var _ Node = (*vmNode)(nil)

func (n *vmNode) Layout() Layout { return n.layout }

func (n *vmNode) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return n.agent.run(ctx, nil, append([]string{name}, args...)...)
}

func (n *vmNode) ReadFile(ctx context.Context, p string) ([]byte, error) {
	return n.agent.readFile(ctx, p)
}

func (n *vmNode) WriteFile(ctx context.Context, p string, data []byte, perm os.FileMode) error {
	return n.agent.writeFile(ctx, p, bytes.NewReader(data), perm)
}

func (n *vmNode) DataDir() string          { return vmDataDir }
func (n *vmNode) DataDisk() device.Device  { return n.dataDisk }
func (n *vmNode) Dir() string              { return vmHarnessDir }
func (n *vmNode) Kubeconfig() string       { return vmKubeconfig }
func (n *vmNode) ContainerdSocket() string { return vmContainerdSock }

func (n *vmNode) Ctr(ctx context.Context, args ...string) ([]byte, error) {
	return n.Run(ctx, "ctr", append([]string{"--address", vmContainerdSock, "--namespace", "k8s.io"}, args...)...)
}

func (n *vmNode) ImportImage(ctx context.Context, hostTar string) error {
	f, err := os.Open(hostTar)
	if err != nil {
		return err
	}
	defer f.Close()
	p := path.Join(vmHarnessDir, "images", filepath.Base(hostTar))
	if err := n.agent.writeFile(ctx, p, f, 0o644); err != nil {
		return err
	}
	_, err = n.Ctr(ctx, "images", "import", p)
	n.Run(ctx, "rm", "-f", p)
	return err
}

// Program copies the host file bin to the node once (again when it changed)
// and returns its path there.
func (n *vmNode) Program(ctx context.Context, bin string) (string, error) {
	fi, err := os.Stat(bin)
	if err != nil {
		return "", err
	}
	key := fmt.Sprintf("%s\x00%d\x00%d", bin, fi.Size(), fi.ModTime().UnixNano())
	n.mu.Lock()
	p, ok := n.uploaded[key]
	n.mu.Unlock()
	if ok {
		return p, nil
	}
	sum, err := fileSHA(bin)
	if err != nil {
		return "", err
	}
	p = path.Join(vmHarnessDir, "bin", sum[:12], filepath.Base(bin))
	f, err := os.Open(bin)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := n.agent.writeFile(ctx, p, f, 0o755); err != nil {
		return "", err
	}
	n.mu.Lock()
	n.uploaded[key] = p
	n.mu.Unlock()
	return p, nil
}

func (n *vmNode) Start(ctx context.Context, spec ProcSpec) (Proc, error) {
	bin, err := n.Program(ctx, spec.Bin)
	if err != nil {
		return Proc{}, err
	}
	var resp struct {
		PID       int    `json:"pid"`
		StartTime string `json:"startTime"`
	}
	req := map[string]any{"argv": append([]string{bin}, spec.Args...), "env": spec.Env, "log": LogPath(n, spec.Name), "dir": vmHarnessDir}
	if err := n.agent.do(ctx, http.MethodPost, "/start", nil, req, &resp); err != nil {
		return Proc{}, fmt.Errorf("starting %s on the node: %w", spec.Name, err)
	}
	return Proc{Name: spec.Name, PID: resp.PID, StartTime: resp.StartTime}, nil
}

func (n *vmNode) FreePorts(ctx context.Context, count int) ([]int, error) {
	var ports []int
	err := n.agent.do(ctx, http.MethodGet, "/freeports", url.Values{"n": {strconv.Itoa(count)}}, nil, &ports)
	return ports, err
}

func (n *vmNode) HTTPGet(ctx context.Context, addr, p string) (int, []byte, error) {
	var resp struct {
		Status int    `json:"status"`
		Body   []byte `json:"body"`
	}
	err := n.agent.do(ctx, http.MethodGet, "/http", url.Values{"addr": {addr}, "path": {p}}, nil, &resp)
	return resp.Status, resp.Body, err
}

func (n *vmNode) TLSPeer(ctx context.Context, addr, serverName string) (*x509.Certificate, error) {
	var der []byte
	if err := n.agent.do(ctx, http.MethodGet, "/tls", url.Values{"addr": {addr}, "sni": {serverName}}, nil, &der); err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// agentClient talks to the guest agent through its host loopback forward.
type agentClient struct {
	base  string
	token string
	http  *http.Client
}

// imageAgent is the client of the agent of a VM of the image in imageDir
// (its token is the image's), forwarded to the host's port.
func imageAgent(imageDir string, port int) (*agentClient, error) {
	token, err := os.ReadFile(vmImage{Dir: imageDir}.path("host", "token"))
	if err != nil {
		return nil, err
	}
	return newAgentClient(port, strings.TrimSpace(string(token))), nil
}

func newAgentClient(port int, token string) *agentClient {
	return &agentClient{base: fmt.Sprintf("http://127.0.0.1:%d", port), token: token,
		http: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: 30 * time.Second}}}
}

func (a *agentClient) request(ctx context.Context, method, p string, q url.Values, body io.Reader) (*http.Response, error) {
	u := a.base + p
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("the guest agent: %w", err)
	}
	return resp, nil
}

// do sends in (JSON) and decodes the answer into out.
func (a *agentClient) do(ctx context.Context, method, p string, q url.Values, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	resp, err := a.request(ctx, method, p, q, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("the guest agent: %s %s: %s: %s", method, p, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func (a *agentClient) run(ctx context.Context, env []string, argv ...string) ([]byte, error) {
	var resp struct {
		Output []byte `json:"output"`
		Exit   int    `json:"exit"`
		Error  string `json:"error"`
	}
	if err := a.do(ctx, http.MethodPost, "/run", nil, map[string]any{"argv": argv, "env": env}, &resp); err != nil {
		return nil, err
	}
	if resp.Exit != 0 || resp.Error != "" {
		return resp.Output, fmt.Errorf("%s (on the node): exit %d %s: %s", strings.Join(argv, " "), resp.Exit, resp.Error, strings.TrimSpace(string(resp.Output)))
	}
	return resp.Output, nil
}

func (a *agentClient) readFile(ctx context.Context, p string) ([]byte, error) {
	resp, err := a.request(ctx, http.MethodGet, "/file", url.Values{"path": {p}}, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	switch {
	case err != nil:
		return nil, err
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("%s on the node: %w", p, os.ErrNotExist)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("reading %s on the node: %s: %s", p, resp.Status, strings.TrimSpace(string(b)))
	}
	return b, nil
}

func (a *agentClient) writeFile(ctx context.Context, p string, r io.Reader, perm os.FileMode) error {
	resp, err := a.request(ctx, http.MethodPut, "/file", url.Values{"path": {p}, "perm": {strconv.FormatUint(uint64(perm.Perm()), 8)}}, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("writing %s on the node: %s: %s", p, resp.Status, strings.TrimSpace(string(b)))
	}
	return nil
}
