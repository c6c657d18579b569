package runtimetest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

	bin, config, runcRoot string
	started               bool // Start has run before
	shims                 shimSockets
}

// StartContainerd starts a private containerd as root, or stops the test
// when containerd, its runc shim or runc is missing. It is stopped when
// the test ends, after its containers are removed and any process it left
// is killed.
func StartContainerd(t testing.TB) *Containerd {
	t.Helper()
	realtest.Root(t)
	bin := Bin(t, "containerd", ContainerdPackages)
	Bin(t, "containerd-shim-runc-v2", ContainerdPackages)
	Bin(t, "runc", ContainerdPackages)
	lockOnce(t)

	d, err := newContainerd(bin, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	d.startInTest(t)
	return d
}

// LaunchContainerd starts a private containerd, as StartContainerd does,
// outside a test: its files are in o.Dir. The caller holds the host lock
// (realtest.HostLock in a test, else flock /tmp/kubediskguard-host.lock)
// and calls Stop; when LaunchContainerd fails, it has stopped what it
// started.
func LaunchContainerd(o Options) (*Containerd, error) {
	bin, err := lookBin("containerd", ContainerdPackages)
	if err != nil {
		return nil, err
	}
	for _, name := range []string{"containerd-shim-runc-v2", "runc"} {
		if _, err := lookBin(name, ContainerdPackages); err != nil {
			return nil, err
		}
	}
	d, err := newContainerd(bin, o.Dir)
	if err != nil {
		return nil, err
	}
	took, err := d.startAlone(o)
	if err != nil {
		return nil, err
	}
	d.logf("containerd up in %s (pid %d)", took.Round(time.Millisecond), d.cmd.Process.Pid)
	return d, nil
}

// newContainerd prepares a containerd bin whose files are in dir: its
// configuration and a client; it does not start it.
func newContainerd(bin, dir string) (*Containerd, error) {
	d := &Containerd{
		daemon:   daemon{name: "containerd", dir: dir, log: filepath.Join(dir, "containerd.log")},
		Socket:   filepath.Join(dir, "containerd.sock"),
		bin:      bin,
		config:   filepath.Join(dir, "config.toml"),
		runcRoot: filepath.Join(dir, "runc"),
		shims:    watchShimSockets(),
	}
	d.up, d.down = d.launch, d.shutdown
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), d.Socket, d.Socket+".ttrpc", filepath.Join(dir, "opt"))
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
	if err := d.start(d.bin, "--config", d.config); err != nil {
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
