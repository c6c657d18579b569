package runtimetest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// Containerd is a private containerd: its root, state, sockets and the
// runc state of its containers are in Dir.
type Containerd struct {
	daemon
	// Socket is its gRPC socket.
	Socket string
	// Client is a client of it for the test's own requests.
	Client *client.Client
	// Build is the containerd it runs.
	Build ContainerdBuild

	config, runcRoot string
	started          bool // Start has run before
	shims            shimSockets
}

// ContainerdBuild is one containerd the tests run against: Debian's
// package (1.6) or containerd 2.x built from the Go module proxy
// (hack/tools/containerd, into $KDG_CONTAINERD2_DIR by make test-bins).
type ContainerdBuild struct {
	// Name names it in subtests, by runtime and version:
	// "containerd-1.6.20", "containerd-2.4.2".
	Name string
	// Version is the version containerd --version prints, without a
	// leading "v" or a packaging suffix: "1.6.20", "2.4.2".
	Version string
	// Dir holds its containerd and containerd-shim-runc-v2 (put first in
	// the daemon's PATH, so that containerd starts its own shim); "" is the
	// system's, found in PATH and /usr/bin.
	Dir string

	bin string
	// missing says why it cannot run and how tells how to get it.
	missing, how string
}

// Containerd2DirEnv names the directory of containerd 2.x's binaries; the
// Makefile exports it.
const Containerd2DirEnv = "KDG_CONTAINERD2_DIR"

// Containerds returns the containerds the runtime tests, the applier's
// integration tests and its benchmarks run against: Debian's and 2.x.
func Containerds() []ContainerdBuild {
	return []ContainerdBuild{SystemContainerd(), Containerd2()}
}

// SystemContainerd is Debian's containerd, with its runc shim.
var SystemContainerd = sync.OnceValue(func() ContainerdBuild {
	b := ContainerdBuild{Name: "containerd-system", how: ContainerdPackages}
	bin, err := lookBin("containerd", ContainerdPackages)
	if err == nil {
		_, err = lookBin("containerd-shim-runc-v2", ContainerdPackages)
	}
	if err != nil {
		b.missing = err.Error()
		return b
	}
	b.bin = bin
	b.identify()
	return b
})

// Containerd2 is containerd 2.x from $KDG_CONTAINERD2_DIR, with its own
// runc shim (runc itself is Debian's).
var Containerd2 = sync.OnceValue(func() ContainerdBuild {
	b := ContainerdBuild{Name: "containerd-2", Dir: os.Getenv(Containerd2DirEnv),
		how: "make test-bins (containerd 2.x from the Go module proxy into .cache/bin/containerd-VERSION; the Makefile exports " + Containerd2DirEnv + ")"}
	if b.Dir == "" {
		b.missing = "containerd 2.x: " + Containerd2DirEnv + " is not set"
		return b
	}
	for _, name := range []string{"containerd", "containerd-shim-runc-v2"} {
		if fi, err := os.Stat(filepath.Join(b.Dir, name)); err != nil || fi.Mode()&0o111 == 0 {
			b.missing = fmt.Sprintf("containerd 2.x: no %s in %s=%s", name, Containerd2DirEnv, b.Dir)
			return b
		}
	}
	b.bin = filepath.Join(b.Dir, "containerd")
	b.identify()
	return b
})

// identify sets the version and the name from containerd --version
// ("containerd github.com/containerd/containerd 1.6.20~ds1 ...",
// "containerd github.com/containerd/containerd/v2 v2.4.2 ...").
func (b *ContainerdBuild) identify() {
	out, err := exec.Command(b.bin, "--version").Output()
	f := strings.Fields(string(out))
	if err != nil || len(f) < 3 {
		b.missing = fmt.Sprintf("%s --version: %v %q", b.bin, err, out)
		return
	}
	v := strings.TrimPrefix(f[2], "v")
	if i := strings.IndexAny(v, "~+-"); i > 0 {
		v = v[:i]
	}
	b.Version, b.Name = v, "containerd-"+v
}

// Major returns the major version, 1 when unknown.
func (b ContainerdBuild) Major() int {
	maj, _, _ := strings.Cut(b.Version, ".")
	if n, err := strconv.Atoi(maj); err == nil {
		return n
	}
	return 1
}

// runner is a test or a benchmark that runs subtests of its own kind.
type runner[T testing.TB] interface {
	testing.TB
	Run(name string, f func(T)) bool
}

// EachContainerd runs f in a subtest per containerd of Containerds, named
// by it ("containerd-1.6.20"), with that containerd started privately; a
// containerd that is missing skips its subtest, or fails it under CI=true.
// The test holds the host lock across them, so that no other test takes
// the host between the two.
func EachContainerd[T runner[T]](t T, f func(t T, d *Containerd)) {
	t.Helper()
	realtest.Root(t)
	lockOnce(t)
	for _, b := range Containerds() {
		t.Run(b.Name, func(t T) { f(t, b.Start(t)) })
	}
}

// StartContainerd starts Debian's containerd privately, as Start does.
func StartContainerd(t testing.TB) *Containerd {
	t.Helper()
	return SystemContainerd().Start(t)
}

// Start starts a private containerd of this build as root, or stops the
// test when it, its runc shim or runc is missing. It is stopped when the
// test ends, after its containers are removed and any process it left is
// killed.
func (b ContainerdBuild) Start(t testing.TB) *Containerd {
	t.Helper()
	realtest.Root(t)
	if b.missing != "" {
		realtest.Missing(t, b.missing, b.how)
	}
	Bin(t, "runc", ContainerdPackages)
	lockOnce(t)

	d, err := newContainerd(b, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	d.startInTest(t)
	return d
}

// LaunchContainerd starts Debian's containerd privately outside a test, as
// Launch does.
func LaunchContainerd(o Options) (*Containerd, error) {
	return SystemContainerd().Launch(o)
}

// Launch starts a private containerd of this build, as Start does,
// outside a test: its files are in o.Dir. The caller holds the host lock
// (realtest.HostLock in a test, else flock /tmp/kubediskguard-host.lock)
// and calls Stop; when Launch fails, it has stopped what it started.
func (b ContainerdBuild) Launch(o Options) (*Containerd, error) {
	if b.missing != "" {
		return nil, fmt.Errorf("%s (get it with: %s)", b.missing, b.how)
	}
	if _, err := lookBin("runc", ContainerdPackages); err != nil {
		return nil, err
	}
	d, err := newContainerd(b, o.Dir)
	if err != nil {
		return nil, err
	}
	took, err := d.startAlone(o)
	if err != nil {
		return nil, err
	}
	d.logf("%s up in %s (pid %d)", b.Name, took.Round(time.Millisecond), d.cmd.Process.Pid)
	return d, nil
}

// newContainerd prepares a containerd of build b whose files are in dir:
// its configuration (version 2 for containerd 1.x, version 3 for 2.x) and
// a client; it does not start it.
func newContainerd(b ContainerdBuild, dir string) (*Containerd, error) {
	d := &Containerd{
		daemon:   daemon{name: b.Name, dir: dir, log: filepath.Join(dir, "containerd.log"), pathDir: b.Dir},
		Build:    b,
		Socket:   filepath.Join(dir, "containerd.sock"),
		config:   filepath.Join(dir, "config.toml"),
		runcRoot: filepath.Join(dir, "runc"),
		shims:    watchShimSockets(),
	}
	d.up, d.down = d.launch, d.shutdown
	// No CRI (the tests make containers as the CRI plugin would) and, on
	// 2.x, no NRI (it would listen on /var/run/nri); the opt plugin's
	// directory is private (it defaults to /opt/containerd).
	version, disabled, opt := 2, `"io.containerd.grpc.v1.cri"`, `"io.containerd.internal.v1.opt"`
	if b.Major() >= 2 {
		version = 3
		disabled = `"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.nri.v1.nri"`
	}
	config := fmt.Sprintf(`version = %[1]d
root = %[2]q
state = %[3]q
disabled_plugins = [%[4]s]

[grpc]
  address = %[5]q

[ttrpc]
  address = %[6]q

[plugins.%[7]s]
  path = %[8]q
`, version, filepath.Join(dir, "root"), filepath.Join(dir, "state"), disabled, d.Socket, d.Socket+".ttrpc", opt, filepath.Join(dir, "opt"))
	if err := os.WriteFile(d.config, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("writing the containerd configuration: %w", err)
	}
	c, err := client.New(d.Socket)
	if err != nil {
		return nil, fmt.Errorf("a client of containerd: %w", err)
	}
	d.Client = c
	return d, nil
}

// launch starts containerd and waits until it answers.
func (d *Containerd) launch() (time.Duration, error) {
	if d.running() {
		return 0, errors.New("containerd is already running")
	}
	started := time.Now()
	if err := d.start(d.Build.bin, "--config", d.config); err != nil {
		return 0, err
	}
	took, err := d.waitReady(started, func(ctx context.Context) error {
		// A new connection each time: a client that knew the previous
		// containerd waits out gRPC's reconnection backoff.
		c, err := client.New(d.Socket)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Version(ctx)
		return err
	})
	if err != nil {
		return 0, err
	}
	if d.started {
		// A restart: a fresh client, for the same reason as above.
		c, err := client.New(d.Socket)
		if err != nil {
			return 0, fmt.Errorf("a client of containerd: %w", err)
		}
		d.Client.Close()
		d.Client = c
	}
	d.started = true
	return took, nil
}

// shutdown removes the containers, stops containerd and cleans up after it.
func (d *Containerd) shutdown() error {
	var errs []error
	if d.running() {
		errs = append(errs, d.removeContainers())
	}
	d.Client.Close()
	errs = append(errs, d.stop(), d.cleanupHost())
	d.shims.cleanup()
	return errors.Join(errs...)
}

// Container is a container that a test made in a private containerd.
type Container struct {
	client.Container
	// Task is its task once started.
	Task client.Task
}

// ContainerSpec says what container to make: labels, the cgroups path of
// its OCI spec, and whether to start its task.
type ContainerSpec struct {
	Namespace   string
	ID          string
	Labels      map[string]string
	CgroupsPath string
	Rootfs      string
	Start       bool
	// Args is its process (default: busybox sleep 3600).
	Args []string
	// Mounts are added to its OCI spec (such as a bind mount of a host
	// directory).
	Mounts []specs.Mount
}

// NewContainer makes a container as containerd's CRI plugin would,
// without an image: its root filesystem is spec.Rootfs.
func (d *Containerd) NewContainer(t testing.TB, spec ContainerSpec) *Container {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), spec.Namespace)
	args := spec.Args
	if len(args) == 0 {
		args = []string{"/bin/busybox", "sleep", "3600"}
	}
	c, err := d.Client.NewContainer(ctx, spec.ID,
		client.WithRuntime("io.containerd.runc.v2", &options.Options{Root: d.runcRoot}),
		client.WithNewSpec(
			oci.WithRootFSPath(spec.Rootfs),
			oci.WithProcessArgs(args...),
			oci.WithCgroup(spec.CgroupsPath),
			oci.WithMounts(spec.Mounts),
		),
		client.WithContainerLabels(spec.Labels),
	)
	if err != nil {
		t.Fatalf("creating container %s: %v", spec.ID, err)
	}
	out := &Container{Container: c}
	if !spec.Start {
		return out
	}
	task, err := c.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatalf("creating the task of container %s: %v", spec.ID, err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("starting the task of container %s: %v", spec.ID, err)
	}
	out.Task = task
	return out
}

// removeContainers kills and deletes the tasks and containers of every
// namespace.
func (d *Containerd) removeContainers() error {
	// 200 containers take over 30 s to remove on a busy 2-core machine.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	nss, err := d.Client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("containerd cleanup: listing namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		ctx := namespaces.WithNamespace(ctx, ns)
		cs, err := d.Client.Containers(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("containerd cleanup: listing containers of %s: %w", ns, err))
			continue
		}
		for _, c := range cs {
			if task, err := c.Task(ctx, nil); err == nil {
				if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
					errs = append(errs, fmt.Errorf("containerd cleanup: deleting the task of %s: %w", c.ID(), err))
				}
			}
			if err := c.Delete(ctx); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("containerd cleanup: deleting container %s: %w", c.ID(), err))
			}
		}
	}
	return errors.Join(errs...)
}
