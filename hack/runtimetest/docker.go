package runtimetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"

	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// Image is the name of the busybox image that StartDockerd imports.
const Image = "kubediskguard-test/busybox:latest"

// Dockerd is a private dockerd: its data root, exec root, pid file and
// socket are in Dir (its data root may be elsewhere, see LaunchDockerd). It
// uses a private containerd of its own, as Debian's docker.service uses the
// system's containerd, has no bridge network and leaves iptables alone.
type Dockerd struct {
	daemon
	// Containerd is the containerd it uses.
	Containerd *Containerd
	// Host is its socket as a Docker host: unix://<Dir>/docker.sock.
	Host string
	// Client is a client of it for the test's own requests.
	Client *client.Client

	bin  string
	args []string
	// hostDirs are the directories outside Dir that dockerd makes whatever
	// its configuration says and that were not there before it.
	hostDirs []string
}

// StartDockerd starts a private dockerd as root, with the image Image
// imported, or stops the test when Debian's docker.io is missing. It is
// stopped when the test ends, after its containers are removed and any
// process it left is killed.
func StartDockerd(t testing.TB) *Dockerd {
	t.Helper()
	realtest.Root(t)
	bin := Bin(t, "dockerd", DockerPackages)
	Bin(t, "containerd", DockerPackages)
	Bin(t, "runc", DockerPackages)
	rootfs := RootfsTar(t)
	ctrd := StartContainerd(t)

	dir := t.TempDir()
	d, err := newDockerd(bin, dir, filepath.Join(dir, "root"), ctrd)
	if err != nil {
		t.Fatal(err)
	}
	d.startInTest(t)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	out, err := d.Client.ImageImport(ctx, image.ImportSource{Source: bytes.NewReader(rootfs), SourceName: "-"}, Image, image.ImportOptions{})
	if err == nil {
		_, err = io.Copy(io.Discard, out)
		out.Close()
	}
	if err != nil {
		t.Fatalf("importing %s: %v", Image, err)
	}
	t.Logf("image %s imported in %s", Image, time.Since(start).Round(time.Millisecond))
	return d
}

// LaunchDockerd starts a private dockerd and its private containerd, as
// StartDockerd does, outside a test and without importing Image: its
// files are in o.Dir (its containerd's in o.Dir/containerd), its data root
// is o.DataRoot, which may be kept across runs. It refuses a data root that
// a live process names (a dockerd of an earlier run). The caller holds the
// host lock (realtest.HostLock in a test, else flock
// /tmp/kubediskguard-host.lock) and calls Stop; when LaunchDockerd fails,
// it has stopped what it started.
func LaunchDockerd(o Options) (*Dockerd, error) {
	bin, err := lookBin("dockerd", DockerPackages)
	if err != nil {
		return nil, err
	}
	dataRoot := o.DataRoot
	if dataRoot == "" {
		dataRoot = filepath.Join(o.Dir, "root")
	}
	if dataRoot, err = filepath.Abs(dataRoot); err != nil {
		return nil, fmt.Errorf("dockerd data root: %w", err)
	}
	for _, p := range processes() {
		if bytes.Contains(p.cmdline, []byte(dataRoot+"\x00")) {
			return nil, fmt.Errorf("dockerd data root %s is in use by process %d (%s); stop it first", dataRoot, p.pid, bytes.ReplaceAll(bytes.TrimSpace(p.cmdline), []byte{0}, []byte{' '}))
		}
	}
	ctrdDir := filepath.Join(o.Dir, "containerd")
	if err := os.Mkdir(ctrdDir, 0o700); err != nil {
		return nil, fmt.Errorf("dockerd's containerd: %w", err)
	}
	ctrd, err := LaunchContainerd(Options{Dir: ctrdDir, Log: o.Log})
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(o.Dir, "dockerd")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, errors.Join(fmt.Errorf("dockerd: %w", err), ctrd.Stop())
	}
	d, err := newDockerd(bin, dir, dataRoot, ctrd)
	if err != nil {
		return nil, errors.Join(err, ctrd.Stop())
	}
	took, err := d.startAlone(o)
	if err != nil {
		return nil, errors.Join(err, ctrd.Stop())
	}
	d.logf("dockerd up in %s (pid %d, data root %s)", took.Round(time.Millisecond), d.cmd.Process.Pid, dataRoot)
	return d, nil
}

// newDockerd prepares a dockerd bin whose files are in dir but its data
// root, which uses ctrd: its configuration and a client; it does not
// start it.
func newDockerd(bin, dir, dataRoot string, ctrd *Containerd) (*Dockerd, error) {
	d := &Dockerd{
		daemon:     daemon{name: "dockerd", dir: dir, log: filepath.Join(dir, "dockerd.log")},
		Containerd: ctrd,
		Host:       "unix://" + filepath.Join(dir, "docker.sock"),
		bin:        bin,
		hostDirs:   missingDirs("/run/docker", "/run/docker/plugins"),
	}
	d.up, d.down = d.launch, d.shutdown
	if !strings.HasPrefix(dataRoot, dir+"/") {
		d.mountDirs = []string{dataRoot}
	}
	config := filepath.Join(dir, "daemon.json")
	settings := "{}\n"
	major, err := dockerdMajor(bin)
	if err != nil {
		return nil, err
	}
	if major > 0 && major < 23 {
		// Its identity key, else written to /etc/docker/key.json.
		settings = fmt.Sprintf("{%q: %q}\n", "deprecated-key-path", filepath.Join(dir, "key.json"))
	}
	if err := os.WriteFile(config, []byte(settings), 0o644); err != nil {
		return nil, fmt.Errorf("writing the dockerd configuration: %w", err)
	}
	d.args = []string{
		"--config-file", config,
		"--data-root", dataRoot,
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--containerd", ctrd.Socket,
		"-H", d.Host,
		"--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
	}
	c, err := client.NewClientWithOpts(client.WithHost(d.Host), client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("a client of dockerd: %w", err)
	}
	d.Client = c
	// The docker cgroup is where dockerd puts containers without a
	// cgroup parent (and BuildKit its build containers, below it).
	if err := d.cleanupCgroups("/docker"); err != nil {
		c.Close()
		return nil, err
	}
	return d, nil
}

// launch starts dockerd and waits until it answers.
func (d *Dockerd) launch() (time.Duration, error) {
	if d.running() {
		return 0, errors.New("dockerd is already running")
	}
	started := time.Now()
	if err := d.start(d.bin, d.args...); err != nil {
		return 0, err
	}
	return d.waitReady(started, func(ctx context.Context) error {
		_, err := d.Client.Ping(ctx)
		return err
	})
}

// Stop stops a dockerd that LaunchDockerd started, after its containers
// are removed, then its containerd, kills any process they left and undoes
// what they left on the host (mounts such as EXEC_ROOT/netns/default and
// under the data root, the docker cgroups, /run/docker). Its directory and
// data root stay.
func (d *Dockerd) Stop() error {
	return errors.Join(d.daemon.Stop(), d.Containerd.Stop())
}

// shutdown removes the containers, stops dockerd and cleans up after it.
func (d *Dockerd) shutdown() error {
	var errs []error
	if d.running() {
		errs = append(errs, d.removeContainers())
	}
	d.Client.Close()
	errs = append(errs, d.stop(), d.cleanupHost())
	removeEmptyDirs(d.hostDirs)
	return errors.Join(errs...)
}

// removeContainers force-removes every container.
func (d *Dockerd) removeContainers() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cs, err := d.Client.ContainerList(ctx, container.ListOptions{All: true})
	if err != nil {
		return fmt.Errorf("dockerd cleanup: listing containers: %w", err)
	}
	var errs []error
	for _, c := range cs {
		if err := d.Client.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true}); err != nil {
			errs = append(errs, fmt.Errorf("dockerd cleanup: removing container %s: %w", c.ID, err))
		}
	}
	return errors.Join(errs...)
}

// dockerdMajor returns dockerd's major version (20 for Debian 12's
// 20.10), 0 if unknown.
func dockerdMajor(bin string) (int, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return 0, fmt.Errorf("%s --version: %w", bin, err)
	}
	// Docker version 20.10.24+dfsg1, build 5d6db84
	_, v, _ := strings.Cut(string(out), "version ")
	major, _, _ := strings.Cut(v, ".")
	n, _ := strconv.Atoi(major)
	return n, nil
}
