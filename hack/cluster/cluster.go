// Package cluster runs a real single-node Kubernetes on this machine for
// `make demo` and the end-to-end test: etcd, kube-apiserver, containerd with
// its CRI plugin (runc), and the kubelet, all as child processes with their
// files in one state dir, plus a PKI made at start and images built locally
// (no registry). Teardown stops everything by PID and undoes the host changes
// the kubelet and containerd make outside the state dir (sysctls, cgroups,
// mounts, a few fixed paths). See hack/cluster/README.md.
//
// Entry point for people: go run ./hack/cluster/cmd up|down|smoke.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubediskguard/kubediskguard/certs/pki"
)

// Config says where the cluster lives and which binaries it runs. Zero
// values take the defaults (see withDefaults).
type Config struct {
	// Node is the node kind the cluster runs on: HostNode (this machine;
	// the default) or another kind registered with RegisterNodeKind.
	Node NodeKind

	Dir      string // state dir: PKI, configs, data, logs, state.json; default /tmp/kdg-cluster
	BinDir   string // etcd, kube-apiserver, kubelet, kubectl; default $KUBEBUILDER_ASSETS
	NodeName string // default kdg-node

	EtcdPort, EtcdPeerPort, APIServerPort, KubeletPort, KubeletHealthzPort int

	Containerd string // default containerd from $PATH
	Ctr        string // default ctr from $PATH
	Busybox    string // a static busybox for the images; default /bin/busybox
	CNIBinDir  string // default /usr/lib/cni (Debian's containernetworking-plugins)

	// DataDiskMiB is the size of the node's data disk (the host node's is
	// a sparse file); default 4096.
	DataDiskMiB int

	// PodNetwork gives pods their own network namespace on a host bridge
	// (PodBridge, 10.244.0.0/24, no gateway, no masquerade, no forwarding).
	// Off by default: the CNI config is then loopback-only, which makes the
	// node Ready but only hostNetwork pods start (containerd 1.6 wants an
	// eth0 in the sandbox), and the host gets no bridge.
	PodNetwork bool

	// Full makes the node a cluster that runs workloads as a platform team
	// deploys them: kube-controller-manager (Deployments, DaemonSets,
	// ServiceAccounts and their tokens, EndpointSlices), kube-scheduler,
	// kube-proxy (iptables mode: Service ClusterIPs work from pods and from
	// the host, so the apiserver reaches a webhook through its Service) and
	// the ServiceAccount admission plugin. It implies PodNetwork, and the
	// apiserver then listens on the bridge's address (PodGateway), where
	// pods reach it through the `kubernetes` Service.
	Full bool

	// KubeProxyHealthzPort serves kube-proxy's /healthz on 127.0.0.1 (Full).
	KubeProxyHealthzPort, KubeProxyMetricsPort int

	Log io.Writer // progress lines; default os.Stderr
}

func (c *Config) withDefaults() error {
	if c.Dir == "" {
		c.Dir = "/tmp/kdg-cluster"
	}
	abs, err := filepath.Abs(c.Dir)
	if err != nil {
		return err
	}
	c.Dir = abs
	if c.BinDir == "" {
		c.BinDir = os.Getenv("KUBEBUILDER_ASSETS")
	}
	if c.NodeName == "" {
		c.NodeName = "kdg-node"
	}
	kind, err := ParseNodeKind(string(c.Node))
	if err != nil {
		return err
	}
	c.Node = kind
	if c.DataDiskMiB == 0 {
		c.DataDiskMiB = 4096
	}
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.EtcdPort, 23790)
	def(&c.EtcdPeerPort, 23800)
	def(&c.APIServerPort, 26443)
	def(&c.KubeletPort, 21250)
	def(&c.KubeletHealthzPort, 21248)
	def(&c.KubeProxyHealthzPort, 21256)
	def(&c.KubeProxyMetricsPort, 21249)
	if c.Full {
		c.PodNetwork = true
	}
	look := func(p *string, name string) {
		if *p == "" {
			if f, err := exec.LookPath(name); err == nil {
				*p = f
			} else {
				*p = name
			}
		}
	}
	look(&c.Containerd, "containerd")
	look(&c.Ctr, "ctr")
	if c.Busybox == "" {
		c.Busybox = "/bin/busybox"
	}
	if c.CNIBinDir == "" {
		c.CNIBinDir = "/usr/lib/cni"
	}
	if c.Log == nil {
		c.Log = os.Stderr
	}
	return nil
}

// Missing lists what the machine lacks to run the cluster, with how to get
// it; empty means ready.
func (c Config) Missing() []string {
	if err := c.withDefaults(); err != nil {
		return []string{err.Error()}
	}
	var out []string
	if c.Node != HostNode {
		impl, err := kindImpl(c.Node)
		if err != nil {
			return []string{err.Error()}
		}
		return impl.Missing(c)
	}
	bins := []string{"etcd", "kube-apiserver", "kubelet", "kubectl"}
	if c.Full {
		bins = append(bins, "kube-controller-manager", "kube-scheduler", "kube-proxy")
	}
	if c.BinDir == "" {
		out = append(out, "the pinned Kubernetes binaries: set KUBEBUILDER_ASSETS (make test-bins)")
	} else {
		for _, b := range bins {
			if _, err := os.Stat(filepath.Join(c.BinDir, b)); err != nil {
				out = append(out, b+" in "+c.BinDir+" (make test-bins)")
			}
		}
	}
	for _, p := range []struct{ path, how string }{
		{c.Containerd, "apt-get install containerd"},
		{c.Ctr, "apt-get install containerd"},
		{"runc", "apt-get install runc"},
		{c.Busybox, "apt-get install busybox-static"},
		{filepath.Join(c.CNIBinDir, "loopback"), "apt-get install containernetworking-plugins"},
		{"ip", "apt-get install iproute2"},
		{"losetup", "apt-get install mount"},
		{"mkfs.ext4", "apt-get install e2fsprogs"},
	} {
		if _, err := exec.LookPath(p.path); err != nil {
			out = append(out, p.path+" ("+p.how+")")
		}
	}
	if c.Full {
		for _, b := range []string{"iptables", "iptables-restore"} {
			if _, err := exec.LookPath(b); err != nil {
				out = append(out, b+" (apt-get install iptables; kube-proxy needs it)")
			}
		}
		if _, err := exec.LookPath("nft"); err != nil {
			out = append(out, "nft (apt-get install nftables; teardown removes the tables iptables-nft made for kube-proxy)")
		}
	}
	if os.Geteuid() != 0 {
		out = append(out, "root (the kubelet and containerd need it)")
	}
	return out
}

// Proc is a process the harness started. StartTime (from /proc/PID/stat)
// makes sure `down` never signals a recycled PID.
type Proc struct {
	Name      string `json:"name"`
	PID       int    `json:"pid"`
	StartTime string `json:"startTime"`
}

// State is saved as DIR/state.json as soon as anything is started, so that
// `down` can tear down after the `up` process died.
type State struct {
	Node               NodeKind   `json:"node"` // "" (written before node kinds) is the host
	ContainerdAddress  string     `json:"containerdAddress"`
	ContainerdStateDir string     `json:"containerdStateDir"`
	Kubeconfig         string     `json:"kubeconfig"`
	PodBridge          string     `json:"podBridge,omitempty"` // the bridge interface to delete at teardown
	Procs              []Proc     `json:"procs"`
	Host               *HostState `json:"host"`
	// DataDisk is the host node's data disk (loop device, mount).
	DataDisk *DataDiskState `json:"dataDisk,omitempty"`
	Layout   *Layout        `json:"layout,omitempty"` // the node's, once known
	// VM is the v2 node's virtual machine (qemu's disk overlays, ports).
	VM *VMState `json:"vm,omitempty"`
}

// Cluster is a running cluster.
type Cluster struct {
	Config
	State
	// Node is the machine the kubelet runs on: everything node-local
	// (cgroup files, the data disk, processes, images) is asked of it.
	Node    Node
	Client  *kubernetes.Clientset
	Timings []Timing

	ca *pki.CA // the cluster CA, made by writePKI
	// pkiValidity overrides certValidity (writePKI) when set.
	pkiValidity time.Duration
	mu          sync.Mutex // guards State.Procs and the state file
}

// Timing is how long a step of Up took.
type Timing struct {
	Step string
	Took time.Duration
}

func stateFile(dir string) string { return filepath.Join(dir, "state.json") }

func (c *Cluster) save() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.saveLocked()
}

func (c *Cluster) saveLocked() error {
	b, err := json.MarshalIndent(c.State, "", "  ")
	if err != nil {
		return err
	}
	tmp := stateFile(c.Dir) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, stateFile(c.Dir))
}

func (c *Cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.Log, "cluster: "+format+"\n", args...)
}

func (c *Cluster) path(parts ...string) string {
	return filepath.Join(append([]string{c.Dir}, parts...)...)
}

// Up starts the cluster on the node kind cfg.Node and returns when the
// Node is Ready. On failure (or when ctx ends) it tears down what it
// started before returning the error.
func Up(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if err := cfg.withDefaults(); err != nil {
		return nil, err
	}
	if m := cfg.Missing(); len(m) > 0 {
		return nil, fmt.Errorf("missing: %s", strings.Join(m, "; "))
	}
	if cfg.Node != HostNode {
		impl, err := kindImpl(cfg.Node)
		if err != nil {
			return nil, err
		}
		return impl.Up(ctx, cfg)
	}
	return upHost(ctx, cfg)
}

// upHost is Up on this machine (HostNode).
func upHost(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if _, err := os.Stat(stateFile(cfg.Dir)); err == nil {
		return nil, fmt.Errorf("%s exists: a cluster is up or was not torn down; run `go run ./hack/cluster/cmd down -dir %s`", stateFile(cfg.Dir), cfg.Dir)
	}
	if pids := pidsNamed("kubelet"); len(pids) > 0 {
		return nil, fmt.Errorf("a kubelet already runs on this machine (pid %v); two kubelets collide", pids)
	}
	ports := []int{cfg.EtcdPort, cfg.EtcdPeerPort, cfg.APIServerPort, cfg.KubeletPort, cfg.KubeletHealthzPort}
	if cfg.Full {
		ports = append(ports, cfg.KubeProxyHealthzPort, cfg.KubeProxyMetricsPort)
	}
	for _, p := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			return nil, fmt.Errorf("port %d is taken: %w", p, err)
		}
		l.Close()
	}
	// No state.json: whatever is left in the dir is from a finished run
	// (logs) or a teardown that stopped half-way; start from scratch.
	if m := MountsUnder(cfg.Dir); len(m) > 0 {
		return nil, fmt.Errorf("mounts left under %s (%v): run `go run ./hack/cluster/cmd down -dir %s` or unmount them", cfg.Dir, m, cfg.Dir)
	}
	if err := EmptyOwnedDir(cfg.Dir, stateDirEntries, "the cluster harness"); err != nil {
		return nil, err
	}
	c := &Cluster{Config: cfg}
	c.State.Node = HostNode
	// The socket has a folder of its own, which a DaemonSet can mount
	// without the runtime's root and its rootfs mounts.
	c.State.ContainerdAddress = c.path("containerd-run", "containerd.sock")
	c.State.ContainerdStateDir = c.path("containerd", "state")
	c.State.Kubeconfig = c.path("admin.kubeconfig")
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		return nil, err
	}
	host, err := snapshotHost()
	if err != nil {
		return nil, err
	}
	c.State.Host = host
	if err := c.save(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			c.logf("up failed: %v; tearing down (logs in %s)", err, c.path("logs"))
			if derr := Down(c.Dir, c.Log); derr != nil {
				err = errors.Join(err, fmt.Errorf("teardown: %w", derr))
			}
		}
	}()
	type step struct {
		name string
		fn   func(context.Context) error
	}
	steps := []step{{"data disk", c.setUpDataDisk}}
	if c.PodNetwork {
		steps = append(steps, step{"pod network", c.startPodNetwork})
	}
	steps = append(steps, step{"pki", c.writePKI}, step{"images", c.buildImages},
		step{"etcd", c.startEtcd}, step{"kube-apiserver", c.startAPIServer})
	if c.Full {
		steps = append(steps, step{"kube-controller-manager", c.startControllerManager}, step{"kube-scheduler", c.startScheduler})
	}
	steps = append(steps, step{"containerd", c.startContainerd}, step{"node layout", c.setHostNode}, step{"kubelet", c.startKubelet})
	if c.Full {
		steps = append(steps, step{"kube-proxy", c.startKubeProxy})
	}
	total := time.Now()
	for _, s := range steps {
		t := time.Now()
		if err := s.fn(ctx); err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		c.Timings = append(c.Timings, Timing{s.name, time.Since(t)})
		c.logf("%s ready in %s", s.name, time.Since(t).Round(time.Millisecond))
	}
	c.logf("node %s Ready; cluster up in %s (kubeconfig %s)", c.NodeName, time.Since(total).Round(time.Millisecond), c.Kubeconfig)
	return c, nil
}

// setHostNode makes the host the cluster's Node, once containerd runs
// (its version is part of the layout).
func (c *Cluster) setHostNode(context.Context) error {
	l, err := c.hostLayout()
	if err != nil {
		return err
	}
	c.Node = &hostNode{c: c, layout: l}
	c.State.Layout = &l
	c.logf("node layout: %s", l)
	return c.save()
}

// start runs a component of the cluster (startProc).
func (c *Cluster) start(name, bin string, args ...string) (Proc, error) {
	return c.startProc(ProcSpec{Name: name, Bin: bin, Args: args})
}

// startProc runs a program on the host in its own process group (a Ctrl-C
// on the terminal reaches the harness, which then stops it in order; it
// outlives the harness's process), with spec.Env added to this process's
// environment, logging to DIR/logs/NAME.log, and records it in the state
// file (Down stops it).
func (c *Cluster) startProc(spec ProcSpec) (Proc, error) {
	logf, err := os.OpenFile(c.path("logs", spec.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return Proc{}, err
	}
	defer logf.Close()
	cmd := exec.Command(spec.Bin, spec.Args...)
	if len(spec.Env) > 0 {
		cmd.Env = append(os.Environ(), spec.Env...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return Proc{}, err
	}
	p := Proc{Name: spec.Name, PID: cmd.Process.Pid, StartTime: StartTime(cmd.Process.Pid)}
	c.mu.Lock()
	c.Procs = append(c.Procs, p)
	err = c.saveLocked()
	c.mu.Unlock()
	if err != nil {
		return Proc{}, err
	}
	go cmd.Wait() // reap; liveness is checked through /proc
	return p, nil
}

// wait polls ok every 100 ms until it returns nil, the process p (none if
// zero) dies or the timeout ends.
func (c *Cluster) wait(ctx context.Context, what string, p Proc, timeout time.Duration, ok func() error) error {
	err := Poll(ctx, what, 100*time.Millisecond, timeout, func() error {
		err := ok()
		if err != nil && p.PID != 0 && !p.Alive() {
			return Final(fmt.Errorf("exited: %w", err))
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%w (see %s)", err, c.path("logs"))
	}
	return nil
}

// Poll calls ok at once, then every interval, until it returns nil, ctx
// ends or timeout passes (wait.PollUntilContextTimeout). Its error names
// what and ok's last error. An error ok wraps with Final ends the wait at
// once (the process it waits for has died).
func Poll(ctx context.Context, what string, interval, timeout time.Duration, ok func() error) error {
	var last error
	err := wait.PollUntilContextTimeout(ctx, interval, timeout, true, func(context.Context) (bool, error) {
		last = ok()
		var f finalError
		if errors.As(last, &f) {
			return false, f
		}
		return last == nil, nil
	})
	var f finalError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &f):
		return fmt.Errorf("%s: %w", what, f.error)
	case ctx.Err() != nil:
		return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), last)
	default:
		return fmt.Errorf("%s: not after %s: %w", what, timeout, last)
	}
}

// Final marks an error of Poll's ok as one waiting longer cannot mend.
func Final(err error) error { return finalError{err} }

type finalError struct{ error }

func (f finalError) Unwrap() error { return f.error }

func (c *Cluster) startEtcd(ctx context.Context) error {
	client := fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPort)
	peer := fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPeerPort)
	proc, err := c.start("etcd", filepath.Join(c.BinDir, "etcd"),
		"--name=kdg", "--data-dir="+c.path("etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=kdg="+peer, "--unsafe-no-fsync", "--log-level=warn")
	if err != nil {
		return err
	}
	return c.wait(ctx, "etcd", proc, 30*time.Second, func() error {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", c.EtcdPort), time.Second)
		if err == nil {
			conn.Close()
		}
		return err
	})
}

// APIServerURL is the apiserver's address from the host: loopback (a VM
// node's is qemu's forward to it), or the pod bridge's address in a Full
// host-node cluster (pods reach it there).
func (c *Cluster) APIServerURL() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(c.apiServerHost(), strconv.Itoa(c.APIServerPort)))
}

func (c *Cluster) apiServerHost() string {
	if c.Full && c.Config.Node == HostNode {
		return PodGateway
	}
	return "127.0.0.1"
}

func (c *Cluster) startAPIServer(ctx context.Context) error {
	p := func(n string) string { return c.path("pki", n) }
	// Without a controller-manager nothing creates the `default`
	// ServiceAccount of a namespace, and the ServiceAccount admission plugin
	// would reject every pod: pods set automountServiceAccountToken: false.
	admission := "--disable-admission-plugins=ServiceAccount"
	if c.Full {
		admission = "--disable-admission-plugins="
	}
	proc, err := c.start("kube-apiserver", filepath.Join(c.BinDir, "kube-apiserver"),
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", c.EtcdPort),
		"--bind-address="+c.apiServerHost(), "--advertise-address="+c.apiServerHost(),
		fmt.Sprintf("--secure-port=%d", c.APIServerPort),
		"--cert-dir="+c.path("apiserver"),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"),
		"--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		"--authorization-mode=Node,RBAC",
		admission,
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false", "--v=1")
	if err != nil {
		return err
	}
	if err := c.connectAdmin(); err != nil {
		return err
	}
	return c.wait(ctx, "kube-apiserver", proc, 60*time.Second, func() error {
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	})
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	d := c.path("containerd")
	for _, sub := range []string{"root", "state", "runc", "opt", "net.d"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Dir(c.ContainerdAddress), 0o755); err != nil {
		return err
	}
	conflist := `{"cniVersion": "0.4.0", "name": "kdg-loopback", "plugins": [{"type": "loopback"}]}`
	if c.PodNetwork {
		// The bridge exists already (startPodNetwork) and holds the
		// gateway address: isGateway false keeps the plugin from turning on
		// IP forwarding; the IPAM result gives pods the default route.
		conflist = fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "kdg-bridge", "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": false, "ipMasq": false, "hairpinMode": false,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": %q, "gateway": %q}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": %q}}]}`,
			PodBridge, PodCIDR, PodGateway, c.path("cni-ipam"))
	}
	if err := os.WriteFile(filepath.Join(d, "net.d", "10-kdg.conflist"), []byte(conflist), 0o644); err != nil {
		return err
	}
	cri := `plugins."io.containerd.grpc.v1.cri"`
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q

[%[6]s]
  sandbox_image = %[7]q
  # No CAP_SYS_RESOURCE here: containers may not lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [%[6]s.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [%[6]s.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # Pod annotations KubeDiskGuard's applier reads from the OCI spec.
      pod_annotations = ["kubediskguard.io/*"]
      [%[6]s.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %[8]q
  [%[6]s.cni]
    bin_dir = %[9]q
    conf_dir = %[10]q
    max_conf_num = 1
`, filepath.Join(d, "root"), c.ContainerdStateDir, c.ContainerdAddress, c.ContainerdAddress+".ttrpc",
		filepath.Join(d, "opt"), cri, PauseImage, filepath.Join(d, "runc"), c.CNIBinDir, filepath.Join(d, "net.d"))
	if err := os.WriteFile(filepath.Join(d, "config.toml"), []byte(config), 0o644); err != nil {
		return err
	}
	proc, err := c.start("containerd", c.Containerd, "--config", filepath.Join(d, "config.toml"), "--log-level", "warn")
	if err != nil {
		return err
	}
	if err := c.wait(ctx, "containerd", proc, 30*time.Second, func() error {
		_, err := c.ctr("version")
		return err
	}); err != nil {
		return err
	}
	for _, img := range []string{"busybox.tar", "pause.tar"} {
		if _, err := c.ctr("images", "import", c.path("images", img)); err != nil {
			return err
		}
	}
	return nil
}

// ctr runs ctr against the cluster's containerd in the k8s.io namespace.
func (c *Cluster) ctr(args ...string) ([]byte, error) {
	return CtrAt(c.Config.Ctr, c.ContainerdAddress)(args...)
}

// CtrAt returns a function that runs the program bin (containerd's ctr)
// against the containerd at address, in the kubelet's k8s.io namespace.
func CtrAt(bin, address string) func(args ...string) ([]byte, error) {
	return func(args ...string) ([]byte, error) {
		out, err := exec.Command(bin, append([]string{"--address", address, "--namespace", "k8s.io"}, args...)...).CombinedOutput()
		if err != nil {
			return out, fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return out, nil
	}
}

func (c *Cluster) buildImages(ctx context.Context) error {
	if err := os.MkdirAll(c.path("images"), 0o755); err != nil {
		return err
	}
	if err := BuildImageTar(c.path("images", "busybox.tar"), BusyboxImage, c.Busybox, nil, []string{"sh"}); err != nil {
		return err
	}
	return BuildImageTar(c.path("images", "pause.tar"), PauseImage, c.Busybox, []string{"/bin/sleep", "inf"}, nil)
}

func (c *Cluster) startKubelet(ctx context.Context) error {
	nodeIP, err := hostIP()
	if err != nil {
		return err
	}
	if err := c.writeKubeletServing(nodeIP); err != nil {
		return err
	}
	kc := c.path("kubelet.kubeconfig")
	if err := c.writeKubeconfig(kc, "kubelet"); err != nil {
		return err
	}
	p := func(n string) string { return c.path("pki", n) }
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %q
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
podLogsDir: %q
cgroupDriver: cgroupfs
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
failCgroupV1: false
oomScoreAdj: 0
protectKernelDefaults: false
# No KUBE-FIREWALL / canary chains on the host (teardown removes any anyway).
makeIPTablesUtilChains: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
fileCheckFrequency: 5s
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
resolvConf: ""
`, nodeIP, c.KubeletPort, c.KubeletHealthzPort, p("kubelet-serving.crt"), p("kubelet-serving.key"), p("ca.crt"),
		c.ContainerdAddress, c.ContainerdAddress, c.path("kubelet-pod-logs"))
	if err := os.WriteFile(c.path("kubelet.yaml"), []byte(config), 0o644); err != nil {
		return err
	}
	proc, err := c.start("kubelet", filepath.Join(c.BinDir, "kubelet"),
		"--config="+c.path("kubelet.yaml"),
		"--kubeconfig="+kc,
		"--root-dir="+c.path("kubelet"),
		"--cert-dir="+c.path("kubelet-pki"),
		"--hostname-override="+c.NodeName,
		"--node-ip="+nodeIP,
		"--v=1")
	if err != nil {
		return err
	}
	return c.wait(ctx, "kubelet (waiting for node "+c.NodeName+" Ready)", proc, 90*time.Second, func() error {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("Ready=%s: %s", cond.Status, cond.Message)
			}
		}
		return errors.New("no Ready condition yet")
	})
}

// hostIP is the address of the interface holding the default route (the
// kubelet's InternalIP: the kubelet refuses a loopback node IP).
func hostIP() (string, error) {
	if conn, err := net.Dial("udp4", "192.0.2.254:9"); err == nil { // no packet is sent
		defer conn.Close()
		if a, ok := conn.LocalAddr().(*net.UDPAddr); ok && !a.IP.IsLoopback() {
			return a.IP.String(), nil
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String(), nil
		}
	}
	return "", errors.New("no non-loopback IPv4 address for the node")
}

// Kubectl runs the pinned kubectl as cluster-admin.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// The pod network of Config.PodNetwork: a host bridge holding the pods'
// gateway address. The host reaches pods on it, and pods reach the host's
// own addresses through it; nothing is forwarded or masqueraded.
const (
	PodBridge  = "kdg0"
	PodCIDR    = "10.244.0.0/24"
	PodGateway = "10.244.0.1"
)

// Env is the environment KubeDiskGuard's applier needs on the node to work
// against this cluster, as KEY=VALUE (on-node paths).
func (c *Cluster) Env() []string {
	return []string{
		"KUBECONFIG=" + c.Node.Kubeconfig(),
		"NODE_NAME=" + c.NodeName,
		"CONTAINER_RUNTIME=containerd",
		"CONTAINER_SOCKET_PATH=" + c.Node.ContainerdSocket(),
		"CONTAINERD_NAMESPACE=k8s.io",
	}
}

// stateDirEntries are the names the harness writes in its state dir.
var stateDirEntries = map[string]bool{
	"logs": true, "pki": true, "images": true, "etcd": true, "apiserver": true, "containerd": true,
	"containerd-run": true, "kubelet": true, "kubelet-pki": true, "kubelet-pod-logs": true, "cni-ipam": true,
	"admin.kubeconfig": true, "kubelet.kubeconfig": true, "kubelet.yaml": true, "kube-proxy.yaml": true, "state.json.tmp": true,
	"data.img": true, "data": true, "kdg": true,
}

// EmptyOwnedDir empties dir, which owner (a program) made, after checking
// that it holds only the names owned lists: a mistyped directory flag must
// not wipe someone's files. A dir that does not exist is fine.
func EmptyOwnedDir(dir string, owned map[string]bool, owner string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !owned[e.Name()] {
			return fmt.Errorf("%s holds %s, which %s did not write: not removing it (choose an empty or new directory)", dir, e.Name(), owner)
		}
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// connectAdmin writes the cluster-admin kubeconfig (c.Kubeconfig) for the
// apiserver at c.APIServerPort and makes c.Client from it.
func (c *Cluster) connectAdmin() error {
	if err := c.writeKubeconfig(c.Kubeconfig, "admin"); err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return err
	}
	c.Client, err = kubernetes.NewForConfig(rc)
	return err
}
