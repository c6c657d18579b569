package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
)

// hostNode is the Node of a cluster on this machine (HostNode): the kubelet,
// containerd and the programs the harness starts run here, so every method
// works on the host directly. Its data disk is a sparse file with ext4 on a
// loop device, mounted at DIR/data for the cluster's lifetime.
type hostNode struct {
	c      *Cluster
	layout Layout
}

var _ Node = (*hostNode)(nil)

func (h *hostNode) Layout() Layout { return h.layout }

func (h *hostNode) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

func (h *hostNode) Program(_ context.Context, bin string) (string, error) {
	if _, err := os.Stat(bin); err != nil {
		return "", err
	}
	return bin, nil
}

func (h *hostNode) ReadFile(_ context.Context, path string) ([]byte, error) { return os.ReadFile(path) }

func (h *hostNode) WriteFile(_ context.Context, path string, data []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, data, perm)
}

func (h *hostNode) DataDir() string { return h.c.DataDisk.MountPoint }

func (h *hostNode) DataDisk() device.Device {
	d, _ := device.Parse(h.c.DataDisk.Device) // written by setUpDataDisk
	return d
}

func (h *hostNode) Dir() string              { return h.c.Dir }
func (h *hostNode) Kubeconfig() string       { return h.c.Kubeconfig }
func (h *hostNode) ContainerdSocket() string { return h.c.ContainerdAddress }

func (h *hostNode) Ctr(_ context.Context, args ...string) ([]byte, error) { return h.c.ctr(args...) }

func (h *hostNode) ImportImage(_ context.Context, hostTar string) error {
	_, err := h.c.ctr("images", "import", hostTar)
	return err
}

func (h *hostNode) Start(_ context.Context, spec ProcSpec) (Proc, error) {
	return h.c.startProc(spec)
}

func (h *hostNode) FreePorts(_ context.Context, n int) ([]int, error) { return FreeLocalPorts(n) }

func (h *hostNode) HTTPGet(ctx context.Context, addr, path string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := noKeepAlive.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// noKeepAlive opens a connection for each request: one opened before
// kube-proxy wrote a Service's rules is not NATed, and conntrack keeps it so.
var noKeepAlive = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

func (h *hostNode) TLSPeer(ctx context.Context, addr, serverName string) (*x509.Certificate, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 3 * time.Second}, Config: &tls.Config{ServerName: serverName, InsecureSkipVerify: true}}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

// FreeLocalPorts returns n TCP ports free on this machine's loopback.
func FreeLocalPorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// hostLayout is this machine's layout: the block IO controller is cgroup
// v1's (checked, as the applier detects it), the kubelet and containerd use
// the cgroupfs driver (configured so in startKubelet and startContainerd),
// and containerd reports its version.
func (c *Cluster) hostLayout() (Layout, error) {
	h, err := cgroup.Open(cgroup.DefaultRoot, cgroup.Auto)
	if err != nil {
		return Layout{}, err
	}
	out, err := c.ctr("version")
	if err != nil {
		return Layout{}, err
	}
	return Layout{Cgroup: h.Version(), Driver: cgroup.Cgroupfs, Runtime: "containerd", RuntimeVersion: serverVersion(string(out)), CgroupRoot: cgroup.DefaultRoot}, nil
}

// serverVersion is the server's Version line of `ctr version`.
func serverVersion(out string) string {
	_, server, ok := strings.Cut(out, "Server:")
	if !ok {
		return "unknown"
	}
	for _, line := range strings.Split(server, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Version:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// DataDiskState is the host node's data disk, recorded step by step as it
// is made so that teardown undoes exactly what was done, also after a crash.
type DataDiskState struct {
	Image      string `json:"image"`                // the sparse file holding the filesystem
	Loop       string `json:"loop,omitempty"`       // the loop device backed by Image, once attached
	Device     string `json:"device,omitempty"`     // its MAJ:MIN
	MountPoint string `json:"mountPoint,omitempty"` // where it is mounted, once mounted
}

// setUpDataDisk makes the data disk: a sparse file of Config.DataDiskMiB
// with ext4 (inode tables and journal written now, so that no lazy
// initialisation does IO on it later), attached to a free loop device and
// mounted at DIR/data, shared (as systemd mounts every mount: a DaemonSet's
// HostToContainer mount of it needs that; this host's / is private).
func (c *Cluster) setUpDataDisk(ctx context.Context) error {
	dd := &DataDiskState{Image: c.path("data.img")}
	c.State.DataDisk = dd
	if err := c.save(); err != nil {
		return err
	}
	f, err := os.OpenFile(dd.Image, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(c.DataDiskMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "kdg-data",
		"-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dd.Image).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", dd.Image, err, strings.TrimSpace(string(out)))
	}
	out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", dd.Image).CombinedOutput()
	if err != nil {
		return fmt.Errorf("losetup --find --show %s: %w: %s", dd.Image, err, strings.TrimSpace(string(out)))
	}
	dd.Loop = strings.TrimSpace(string(out))
	if err := c.save(); err != nil {
		return err
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dd.Loop, &st); err != nil {
		return err
	}
	dd.Device = device.FromRdev(st.Rdev).String()
	mp := c.path("data")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount(dd.Loop, mp, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mounting %s (%s) at %s: %w", dd.Loop, dd.Image, mp, err)
	}
	dd.MountPoint = mp
	if err := c.save(); err != nil {
		return err
	}
	if err := syscall.Mount("", mp, "", syscall.MS_SHARED, ""); err != nil {
		return fmt.Errorf("making %s a shared mount: %w", mp, err)
	}
	c.logf("data disk: %s (%s; %d MiB ext4 in %s) mounted at %s, shared", dd.Loop, dd.Device, c.DataDiskMiB, dd.Image, mp)
	return nil
}

// tearDownDataDisk unmounts the data disk and detaches its loop device
// (only if it is still backed by the recorded image: a loop device
// detached earlier may have been reused since); the image goes with the
// state dir.
func tearDownDataDisk(dd *DataDiskState) error {
	if dd == nil {
		return nil
	}
	var errs []error
	if dd.MountPoint != "" {
		if err := unmountAll(dd.MountPoint); err != nil {
			errs = append(errs, err)
		}
	}
	if dd.Loop != "" && loopBacking(dd.Loop) == dd.Image {
		if out, err := exec.Command("losetup", "--detach", dd.Loop).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup --detach %s: %w: %s", dd.Loop, err, strings.TrimSpace(string(out))))
		}
		// A detach while something still holds the device only marks it
		// for autoclear; wait until it is gone.
		deadline := time.Now().Add(5 * time.Second)
		for loopBacking(dd.Loop) == dd.Image && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if loopBacking(dd.Loop) == dd.Image {
			errs = append(errs, fmt.Errorf("loop device %s still backed by %s", dd.Loop, dd.Image))
		}
	}
	return errors.Join(errs...)
}

// loopBacking is the backing file of the loop device dev (/dev/loopN), ""
// when it has none.
func loopBacking(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// loopDevices lists the attached loop devices as "loopN=backing file".
func loopDevices() []string {
	ms, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, m := range ms {
		dev := filepath.Base(filepath.Dir(filepath.Dir(m)))
		out = append(out, dev+"="+loopBacking(dev))
	}
	return out
}

// SetDataDiskDirectIO turns direct IO of the host node's data disk on or
// off: on, the loop device reads and writes its backing file with O_DIRECT,
// so the data disk's IO reaches the host's disk; off (as Up attaches it),
// it goes through the host's page cache, where reads of a recently written
// file never reach a device. A node whose data disk is not a loop device
// here (a VM's virtio disk) has nothing to change.
func (c *Cluster) SetDataDiskDirectIO(ctx context.Context, on bool) error {
	dd := c.State.DataDisk
	if dd == nil || dd.Loop == "" {
		return nil
	}
	v := map[bool]string{true: "on", false: "off"}[on]
	if out, err := exec.CommandContext(ctx, "losetup", "--direct-io="+v, dd.Loop).CombinedOutput(); err != nil {
		return fmt.Errorf("losetup --direct-io=%s %s: %w: %s", v, dd.Loop, err, strings.TrimSpace(string(out)))
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dd.Loop), "loop", "dio"))
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(string(b)) == "1"; got != on {
		return fmt.Errorf("loop device %s: direct IO %s asked, the kernel reports dio=%s", dd.Loop, v, strings.TrimSpace(string(b)))
	}
	c.logf("data disk %s: direct IO %s", dd.Loop, v)
	return nil
}
