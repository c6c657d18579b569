package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/kubediskguard/kubediskguard/certs/pki"
)

// The cgroup v2 node's disk image (V2Node): built once per set of inputs and
// cached OUTSIDE the clone (VMCacheDir, default /var/cache/kubediskguard/v2node),
// so that a fresh clone (CI) reuses it. Three layers, each keyed by what
// goes into it and rebuilt when that changes:
//
//	base-<key>/     Debian bookworm minbase + packages + Debian's 6.1 cloud kernel
//	                (v2node/rootfs.sh; key: the script)
//	image-<key>/    the base + the pinned Kubernetes binaries, containerd 2.x, the
//	                guest agent, the configuration (systemd units, kubelet.yaml
//	                with cgroupDriver: systemd, containerd's config version 3 with
//	                SystemdCgroup = true), a PKI and the agent's token made for
//	                this image: root.img and data.img (ext4, raw), vmlinuz,
//	                initrd.img, host/ (what the host needs: CA, admin cert, token)
//	                (key: the base's key, every binary's sha256, every file written)
//	image-<key>/snapshot-<key>/
//	                the VM booted once until its node was Ready, then saved:
//	                qcow2 overlays of both disks and the machine state (a qemu
//	                migration to a file); Up restores it (key: qemu's version and
//	                command line)

//go:embed v2node/rootfs.sh
var rootfsScript []byte

// vmImageVersion changes when the layout of image-<key> changes in a way the
// files' contents do not show.
const vmImageVersion = "v2node-image-1"

// The guest's fixed addresses: qemu's user-mode network gives it 10.0.2.15;
// the host reaches the agent and the apiserver only through forwards to its
// own 127.0.0.1 (restrict=on: the guest has no route anywhere).
const (
	vmGuestIP              = "10.0.2.15"
	vmAgentPort            = 2222
	vmAPIServerPort        = 6443
	vmNodeName             = "kdg-node"
	vmDataDevice           = "/dev/vdb"
	vmDataDir              = "/data"
	vmHarnessDir           = "/var/lib/kdg"
	vmContainerdSock       = "/run/kdg-containerd/containerd.sock"
	vmKubeconfig           = "/etc/kubernetes/admin.kubeconfig"
	vmPodCIDR              = "10.88.0.0/24" // the guest's bridge cni0
	vmServiceCIDR          = "10.96.0.0/24"
	vmKubeProxyHealthzPort = 10256
	vmKubeProxyMetricsPort = 10249
	vmRootMiB              = 6144
	vmDataMiB              = 2048
	vmMemMiB               = 3072
	vmPKIValidity          = 365 * 24 * time.Hour
)

// vmKernelArgs is the guest kernel's command line (part of the image key).
const vmKernelArgs = "console=ttyS0 systemd.unified_cgroup_hierarchy=1 net.ifnames=0 fsck.mode=skip clocksource=tsc tsc=reliable panic=-1 quiet"

// VMCacheDir is where the v2 node's images are cached: $KDG_V2NODE_CACHE,
// default /var/cache/kubediskguard/v2node.
func VMCacheDir() string {
	if d := os.Getenv("KDG_V2NODE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/kubediskguard/v2node"
}

// vmBinaries are the files the image needs from the host: name in the
// guest's /usr/local/bin → host path.
func vmBinaries(cfg Config) map[string]string {
	bins := map[string]string{}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet", "kubectl"} {
		bins[b] = filepath.Join(cfg.BinDir, b)
	}
	c2 := containerd2Dir()
	for _, b := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		bins[b] = filepath.Join(c2, b)
	}
	return bins
}

// containerd2Dir is containerd 2.x's bin dir: $KDG_CONTAINERD2_DIR (the
// Makefile sets it; make test-bins builds it), else the repository's
// .cache/bin/containerd-v2.4.2.
func containerd2Dir() string {
	if d := os.Getenv("KDG_CONTAINERD2_DIR"); d != "" {
		return d
	}
	if root, err := repoRoot(); err == nil {
		return filepath.Join(root, ".cache", "bin", "containerd-v2.4.2")
	}
	return ".cache/bin/containerd-v2.4.2"
}

// repoRoot is the module's root: the nearest directory at or above the
// working directory with go.mod.
func repoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		p := filepath.Dir(d)
		if p == d {
			return "", errors.New("no go.mod at or above the working directory")
		}
		d = p
	}
}

// vmMissing is what the machine lacks to build and run the v2 node.
func vmMissing(cfg Config) []string {
	var out []string
	for _, p := range []struct{ bin, how string }{
		{"qemu-system-x86_64", "apt-get install --no-install-recommends qemu-system-x86 (make v2node)"},
		{"qemu-img", "apt-get install --no-install-recommends qemu-utils (make v2node)"},
		{"debootstrap", "apt-get install --no-install-recommends debootstrap (make v2node)"},
		{"mkfs.ext4", "apt-get install e2fsprogs"},
		{"cpio", "apt-get install cpio (make v2node)"},
		{"go", "the Go toolchain (builds the guest agent)"},
	} {
		if _, err := exec.LookPath(p.bin); err != nil {
			out = append(out, p.bin+" ("+p.how+")")
		}
	}
	if cfg.BinDir == "" {
		out = append(out, "the pinned Kubernetes binaries: set KUBEBUILDER_ASSETS (make test-bins)")
	}
	names := make([]string, 0)
	bins := vmBinaries(cfg)
	for n := range bins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if cfg.BinDir == "" && !strings.HasPrefix(n, "c") {
			continue
		}
		if _, err := os.Stat(bins[n]); err != nil {
			out = append(out, bins[n]+" (make test-bins)")
		}
	}
	if os.Geteuid() != 0 {
		out = append(out, "root (debootstrap, mkfs of the VM image)")
	}
	return out
}

// vmImage is a built image (image-<key>).
type vmImage struct {
	Dir     string // image-<key>
	Key     string
	Release string // the guest kernel
}

func (im vmImage) path(p ...string) string { return filepath.Join(append([]string{im.Dir}, p...)...) }

// snapshotDir is where the booted-and-saved state of the image lives for
// the qemu command line args (keyed by it and qemu's version).
// vmSnapshotRecipe names what the guest has settled into when the snapshot
// is saved (part of its key): change it when saveVMSnapshot waits for more.
const vmSnapshotRecipe = "node Ready, default ServiceAccount"

func (im vmImage) snapshotDir(qemuArgs []string) (string, error) {
	out, err := exec.Command("qemu-system-x86_64", "--version").Output()
	if err != nil {
		return "", fmt.Errorf("qemu-system-x86_64 --version: %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n", out, strings.Join(qemuArgs, "\x00"), vmSnapshotRecipe)
	return im.path("snapshot-" + hex.EncodeToString(h.Sum(nil))[:16]), nil
}

// lockCache takes an exclusive lock on the cache dir while an image is
// built (two test processes must not build the same image at once).
func lockCache(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

func shortHash(parts ...[]byte) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:", len(p))
		h.Write(p)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func fileSHA(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func runLogged(ctx context.Context, logf func(string, ...any), name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLines(string(out), 30))
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ensureVMBase runs v2node/rootfs.sh into base-<sha of the script> unless
// it is there.
func ensureVMBase(ctx context.Context, cache string, logf func(string, ...any)) (string, error) {
	dir := filepath.Join(cache, "base-"+shortHash(rootfsScript))
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		return dir, nil
	}
	logf("v2 node: building the base root filesystem in %s (debootstrap; about 1 min: 53 s and 59 s on fresh 2-core machines)", dir)
	t := time.Now()
	script := filepath.Join(cache, ".rootfs.sh")
	if err := os.WriteFile(script, rootfsScript, 0o755); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "bash", script, dir)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("v2node/rootfs.sh: %w: %s", err, lastLines(buf.String(), 30))
	}
	logf("v2 node: base root filesystem in %s", time.Since(t).Round(time.Second))
	return dir, nil
}

// ensureVMImage returns the image for cfg's inputs, building it (and the
// base) when absent.
func ensureVMImage(ctx context.Context, cfg Config) (vmImage, error) {
	logf := func(format string, args ...any) { fmt.Fprintf(cfg.Log, "cluster: "+format+"\n", args...) }
	cache := VMCacheDir()
	unlock, err := lockCache(cache)
	if err != nil {
		return vmImage{}, err
	}
	defer unlock()
	base, err := ensureVMBase(ctx, cache, logf)
	if err != nil {
		return vmImage{}, err
	}
	rel, err := os.ReadFile(filepath.Join(base, "kernel-release"))
	if err != nil {
		return vmImage{}, err
	}
	release := strings.TrimSpace(string(rel))

	// Build the agent first: its binary is an input like the others.
	work, err := os.MkdirTemp(cache, ".work-")
	if err != nil {
		return vmImage{}, err
	}
	defer os.RemoveAll(work)
	agent := filepath.Join(work, "kdg-agent")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", agent, "github.com/kubediskguard/kubediskguard/hack/cluster/v2node/agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if root, err := repoRoot(); err == nil {
		build.Dir = root
	}
	if out, err := build.CombinedOutput(); err != nil {
		return vmImage{}, fmt.Errorf("building the guest agent: %w: %s", err, out)
	}
	bins := vmBinaries(cfg)
	bins["kdg-agent"] = agent
	files := vmGuestFiles(release)
	var parts [][]byte
	parts = append(parts, []byte(vmImageVersion), []byte(filepath.Base(base)), []byte(vmKernelArgs))
	names := make([]string, 0, len(bins))
	for n := range bins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		sum, err := fileSHA(bins[n])
		if err != nil {
			return vmImage{}, err
		}
		parts = append(parts, []byte(n+"="+sum))
	}
	bsum, err := fileSHA(cfg.Busybox)
	if err != nil {
		return vmImage{}, err
	}
	parts = append(parts, []byte("busybox="+bsum))
	fnames := make([]string, 0, len(files))
	for n := range files {
		fnames = append(fnames, n)
	}
	sort.Strings(fnames)
	for _, n := range fnames {
		parts = append(parts, []byte(n), []byte(files[n].data), []byte(files[n].perm.String()))
	}
	key := shortHash(parts...)
	im := vmImage{Dir: filepath.Join(cache, "image-"+key), Key: key, Release: release}
	if _, err := os.Stat(im.path("done")); err == nil {
		if ok, _ := vmPKIFresh(im); ok {
			return im, nil
		}
		logf("v2 node: the PKI of %s expires within a week: rebuilding it", im.Dir)
	}
	logf("v2 node: building image %s", im.Dir)
	t := time.Now()
	if err := buildVMImage(ctx, cfg, im, base, bins, files, work, logf); err != nil {
		return vmImage{}, err
	}
	logf("v2 node: image built in %s", time.Since(t).Round(time.Second))
	return im, nil
}

type guestFile struct {
	data string
	perm os.FileMode
}

func buildVMImage(ctx context.Context, cfg Config, im vmImage, base string, bins map[string]string, files map[string]guestFile, work string, logf func(string, ...any)) error {
	os.RemoveAll(im.Dir)
	tmp := im.Dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Join(tmp, "host"), 0o700); err != nil {
		return err
	}
	root := filepath.Join(work, "rootfs")
	if err := runLogged(ctx, logf, "cp", "-a", filepath.Join(base, "rootfs"), root); err != nil {
		return err
	}
	for n, src := range bins {
		if err := runLogged(ctx, logf, "install", "-m", "0755", src, filepath.Join(root, "usr/local/bin", n)); err != nil {
			return err
		}
	}
	for n, f := range files {
		p := filepath.Join(root, n)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(f.data), f.perm); err != nil {
			return err
		}
	}
	// Units enabled as `systemctl enable` would.
	wants := filepath.Join(root, "etc/systemd/system/multi-user.target.wants")
	if err := os.MkdirAll(wants, 0o755); err != nil {
		return err
	}
	for _, u := range vmUnits {
		if err := os.Symlink("/etc/systemd/system/"+u, filepath.Join(wants, u)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	for _, d := range []string{vmDataDir, vmHarnessDir, "opt/kdg/images"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := BuildImageTar(filepath.Join(root, "opt/kdg/images/busybox.tar"), BusyboxImage, cfg.Busybox, nil, []string{"sh"}); err != nil {
		return err
	}
	if err := BuildImageTar(filepath.Join(root, "opt/kdg/images/pause.tar"), PauseImage, cfg.Busybox, []string{"/bin/sleep", "inf"}, nil); err != nil {
		return err
	}
	// The PKI and the agent's token, made for this image: in the guest's
	// /etc/kubernetes/pki and /etc/kdg-agent, and what the host needs in host/.
	if err := writeVMPKI(ctx, root, filepath.Join(tmp, "host")); err != nil {
		return err
	}
	tok := make([]byte, 32)
	if _, err := rand.Read(tok); err != nil {
		return err
	}
	token := hex.EncodeToString(tok)
	if err := os.MkdirAll(filepath.Join(root, "etc/kdg-agent"), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc/kdg-agent/token"), []byte(token+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "host", "token"), []byte(token+"\n"), 0o600); err != nil {
		return err
	}
	if err := runLogged(ctx, logf, "cp", filepath.Join(root, "boot", "vmlinuz-"+im.Release), filepath.Join(tmp, "vmlinuz")); err != nil {
		return err
	}
	if err := buildInitrd(ctx, root, im.Release, filepath.Join(work, "initrd"), filepath.Join(tmp, "initrd.img"), logf); err != nil {
		return err
	}
	if err := mkfsImage(ctx, filepath.Join(tmp, "root.img"), vmRootMiB, "kdg-root", root, logf); err != nil {
		return err
	}
	if err := mkfsImage(ctx, filepath.Join(tmp, "data.img"), vmDataMiB, "kdg-data", "", logf); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "kernel-release"), []byte(im.Release+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "done"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, im.Dir)
}

// mkfsImage makes a sparse raw disk image of mib MiB with ext4, from the
// tree src when set (mkfs.ext4 -d: no loop mount), inode tables and journal
// written now.
func mkfsImage(ctx context.Context, img string, mib int, label, src string, logf func(string, ...any)) error {
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(mib) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	args := []string{"-q", "-F", "-m", "0", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"}
	if src != "" {
		args = append(args, "-d", src)
	}
	return runLogged(ctx, logf, "mkfs.ext4", append(args, img)...)
}

// vmInitrdModules are loaded by the initrd, in order, to reach /dev/vda.
var vmInitrdModules = []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"}

// buildInitrd makes a tiny busybox initrd: load the virtio block modules,
// mount /dev/vda and switch_root to systemd.
func buildInitrd(ctx context.Context, root, release, dir, out string, logf func(string, ...any)) error {
	for _, d := range []string{"bin", "modules", "proc", "sys", "dev", "newroot"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := runLogged(ctx, logf, "cp", filepath.Join(root, "bin/busybox"), filepath.Join(dir, "bin/busybox")); err != nil {
		return err
	}
	modRoot := filepath.Join(root, "lib/modules", release)
	for _, m := range vmInitrdModules {
		var found string
		filepath.WalkDir(modRoot, func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() && d.Name() == m+".ko" {
				found = p
				return filepath.SkipAll
			}
			return nil
		})
		if found == "" {
			continue // built in
		}
		if err := runLogged(ctx, logf, "cp", found, filepath.Join(dir, "modules", m+".ko")); err != nil {
			return err
		}
	}
	init := `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in ` + strings.Join(vmInitrdModules, " ") + `; do
  [ -e /modules/$m.ko ] && insmod /modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /lib/systemd/systemd
`
	if err := os.WriteFile(filepath.Join(dir, "init"), []byte(init), 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "sh", "-c", "find . | cpio -o -H newc --quiet | gzip -1 > "+shellQuote(out))
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("initrd: %w: %s", err, b)
	}
	return nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// writeVMPKI makes the guest's PKI (as writePKI does for the host node,
// valid for vmPKIValidity) in root/etc/kubernetes/pki, and copies what the
// host uses (the CA and its key, to sign webhook certificates the apiserver
// trusts; the admin client pair) into hostDir.
func writeVMPKI(ctx context.Context, root, hostDir string) error {
	k := &Cluster{Config: Config{Dir: filepath.Join(root, "etc/kubernetes"), NodeName: vmNodeName}, pkiValidity: vmPKIValidity}
	if err := os.MkdirAll(k.Dir, 0o755); err != nil {
		return err
	}
	if err := k.writePKI(ctx); err != nil {
		return err
	}
	if err := k.writeKubeletServing(vmGuestIP); err != nil {
		return err
	}
	for _, f := range []string{"ca.crt", "ca.key", "admin.crt", "admin.key"} {
		b, err := os.ReadFile(filepath.Join(k.Dir, "pki", f))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(hostDir, f), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// vmPKIFresh reports whether the image's CA is valid for at least a week more.
func vmPKIFresh(im vmImage) (bool, error) {
	ca, err := loadCA(im.path("host"))
	if err != nil {
		return false, err
	}
	return time.Until(ca.Cert.NotAfter) > 7*24*time.Hour, nil
}

// loadCA reads dir/ca.crt and dir/ca.key (written by writePKI).
func loadCA(dir string) (*pki.CA, error) {
	crt, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, err
	}
	key, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(crt)
	if b == nil {
		return nil, fmt.Errorf("%s/ca.crt: no PEM block", dir)
	}
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s/ca.crt: %w", dir, err)
	}
	k, _ := pem.Decode(key)
	if k == nil {
		return nil, fmt.Errorf("%s/ca.key: no PEM block", dir)
	}
	priv, err := x509.ParseECPrivateKey(k.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s/ca.key: %w", dir, err)
	}
	return &pki.CA{Cert: cert, Key: priv, PEM: crt}, nil
}
