package runtimetest

import (
	"bytes"
	"context"
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
// socket are in Dir. It uses a private containerd of its own, as Debian's
// docker.service uses the system's containerd, has no bridge network and
// leaves iptables alone.
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
	CleanupDirs(t, "/run/docker", "/run/docker/plugins")

	dir := t.TempDir()
	d := &Dockerd{
		daemon:     daemon{name: "dockerd", dir: dir, log: filepath.Join(dir, "dockerd.log")},
		Containerd: ctrd,
		Host:       "unix://" + filepath.Join(dir, "docker.sock"),
		bin:        bin,
	}
	config := filepath.Join(dir, "daemon.json")
	settings := "{}\n"
	if major := dockerdMajor(t, bin); major > 0 && major < 23 {
		// Its identity key, else written to /etc/docker/key.json.
		settings = fmt.Sprintf("{%q: %q}\n", "deprecated-key-path", filepath.Join(dir, "key.json"))
	}
	if err := os.WriteFile(config, []byte(settings), 0o644); err != nil {
		t.Fatal(err)
	}
	d.args = []string{
		"--config-file", config,
		"--data-root", filepath.Join(dir, "root"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--containerd", ctrd.Socket,
		"-H", d.Host,
		"--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
	}
	c, err := client.NewClientWithOpts(client.WithHost(d.Host), client.WithAPIVersionNegotiation())
	if err != nil {
		t.Fatal(err)
	}
	d.Client = c
	// The docker cgroup is where dockerd puts containers without a
	// cgroup parent.
	d.CleanupCgroups(t, "/docker")
	t.Cleanup(func() {
		if d.running() {
			d.removeContainers(t)
		}
		c.Close()
		d.stop(t)
		d.cleanupHost(t)
		if t.Failed() {
			t.Log(d.logTail())
		}
	})
	d.Start(t)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	out, err := c.ImageImport(ctx, image.ImportSource{Source: bytes.NewReader(rootfs), SourceName: "-"}, Image, image.ImportOptions{})
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

// Start starts dockerd on its directories, as after a crash or a restart,
// and waits until it answers.
func (d *Dockerd) Start(t testing.TB) time.Duration {
	t.Helper()
	if d.running() {
		t.Fatal("dockerd is already running")
	}
	started := time.Now()
	d.start(t, d.bin, d.args...)
	took := d.waitReady(t, started, func(ctx context.Context) error {
		_, err := d.Client.Ping(ctx)
		return err
	})
	t.Logf("dockerd up in %s (pid %d)", took.Round(time.Millisecond), d.cmd.Process.Pid)
	return took
}

// removeContainers force-removes every container.
func (d *Dockerd) removeContainers(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cs, err := d.Client.ContainerList(ctx, container.ListOptions{All: true})
	if err != nil {
		t.Errorf("dockerd cleanup: listing containers: %v", err)
		return
	}
	for _, c := range cs {
		if err := d.Client.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true}); err != nil {
			t.Errorf("dockerd cleanup: removing container %s: %v", c.ID, err)
		}
	}
}

// dockerdMajor returns dockerd's major version (20 for Debian 12's
// 20.10), 0 if unknown.
func dockerdMajor(t testing.TB, bin string) int {
	t.Helper()
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatalf("%s --version: %v", bin, err)
	}
	// Docker version 20.10.24+dfsg1, build 5d6db84
	_, v, _ := strings.Cut(string(out), "version ")
	major, _, _ := strings.Cut(v, ".")
	n, _ := strconv.Atoi(major)
	return n
}
