// Package docker is the applier's runtime.Runtime over Docker's Engine API:
// the Kubernetes containers that the kubelet created through dockershim or
// cri-dockerd, their cgroups from HostConfig.CgroupParent and the daemon's
// cgroup driver, and their lifecycle from Docker's event stream.
package docker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

const (
	// DefaultHost is Docker's default socket.
	DefaultHost = "unix:///var/run/docker.sock"
	// Name is the runtime's name in logs and metrics.
	Name = "docker"
)

// Runtime is a connection to a Docker daemon. It is safe for concurrent use.
type Runtime struct {
	client *client.Client
	host   string
	driver cgroup.Driver
	h      *cgroup.Hierarchy
}

var _ runtime.Runtime = (*Runtime)(nil)

// New connects to the Docker daemon at host (DefaultHost when empty; a
// plain socket path is taken as unix://path), whose containers' cgroups
// are in h. It asks the daemon for its cgroup driver, so it fails unless
// the daemon answers.
func New(ctx context.Context, host string, h *cgroup.Hierarchy) (*Runtime, error) {
	switch {
	case host == "":
		host = DefaultHost
	case strings.HasPrefix(host, "/"):
		host = "unix://" + host
	}
	c, err := client.NewClientWithOpts(client.WithHost(host), client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker at %s: %w", host, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("docker at %s: %w", host, err)
	}
	driver, err := cgroup.ParseDriver(info.CgroupDriver)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("docker at %s: %w", host, err)
	}
	return &Runtime{client: c, host: host, driver: driver, h: h}, nil
}

// Name returns "docker".
func (r *Runtime) Name() string { return Name }

// Driver returns the daemon's cgroup driver.
func (r *Runtime) Driver() cgroup.Driver { return r.driver }

// Close closes the connection.
func (r *Runtime) Close() error { return r.client.Close() }

// List returns the Kubernetes containers (not pod sandboxes) that are
// running or paused.
func (r *Runtime) List(ctx context.Context) ([]runtime.Container, error) {
	summaries, err := r.client.ContainerList(ctx, container.ListOptions{Filters: filters.NewArgs(
		filters.Arg("label", runtime.LabelDockerType+"=container"),
		filters.Arg("status", "running"),
		filters.Arg("status", "paused"),
	)})
	if err != nil {
		return nil, fmt.Errorf("docker at %s: listing containers: %w", r.host, err)
	}
	out := make([]runtime.Container, 0, len(summaries))
	for _, s := range summaries {
		c, err := r.Container(ctx, s.ID)
		switch {
		case errors.Is(err, runtime.ErrNotFound), errors.Is(err, runtime.ErrNotKubernetes):
			continue // removed since, or a container that only looks like one
		case err != nil:
			return nil, err
		case c.PID != 0:
			out = append(out, c)
		}
	}
	return out, nil
}

// Identify implements runtime.Runtime: it is Container, since an inspect
// gives the PID anyway.
func (r *Runtime) Identify(ctx context.Context, id string) (runtime.Container, error) {
	return r.Container(ctx, id)
}

// Container inspects the Kubernetes container id (a full or unique
// short ID, or a name); the result carries the full ID, and the PID of its
// init process when it is running or paused.
func (r *Runtime) Container(ctx context.Context, id string) (runtime.Container, error) {
	info, err := r.client.ContainerInspect(ctx, id)
	if cerrdefs.IsNotFound(err) {
		return runtime.Container{}, fmt.Errorf("docker container %s: %w", id, runtime.ErrNotFound)
	}
	if err != nil {
		return runtime.Container{}, fmt.Errorf("docker at %s: inspecting container %s: %w", r.host, id, err)
	}
	var l map[string]string
	if info.Config != nil {
		l = info.Config.Labels
	}
	if l[runtime.LabelPodUID] == "" || l[runtime.LabelDockerType] != "container" {
		return runtime.Container{}, fmt.Errorf("docker container %s (%s=%q): %w",
			info.ID, runtime.LabelDockerType, l[runtime.LabelDockerType], runtime.ErrNotKubernetes)
	}
	var parent string
	if info.HostConfig != nil {
		parent = info.HostConfig.CgroupParent
	}
	dir, err := r.h.DockerDir(parent, info.ID, r.driver)
	if err != nil {
		return runtime.Container{}, err
	}
	c := runtime.FromLabels(info.ID, l)
	c.CgroupDir = dir
	if s := info.State; s != nil && (s.Running || s.Paused) {
		c.PID = s.Pid
	}
	return c, nil
}

// Watch streams the lifecycle events of all containers (Container tells
// which are Kubernetes containers): create is Created, start is Started
// (without a PID: Docker's event has none), die is Exited, destroy is
// Deleted.
//
// Docker registers a subscription only after it answered the request, so
// Watch asks for the events since just before the request too: the daemon
// replays those from its buffer, and no event between the request and
// subscribed is missed.
func (r *Runtime) Watch(ctx context.Context, subscribed func(), handle func(runtime.Event)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	since := time.Now()
	messages, errs := r.client.Events(ctx, events.ListOptions{
		Since: fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
		Filters: filters.NewArgs(
			filters.Arg("type", string(events.ContainerEventType)),
			filters.Arg("event", string(events.ActionCreate)),
			filters.Arg("event", string(events.ActionStart)),
			filters.Arg("event", string(events.ActionDie)),
			filters.Arg("event", string(events.ActionDestroy)),
		),
	})
	// Events returns once the daemon answered, or failed to; a failure
	// may come just after it returned, and then subscribed was called in
	// vain, which is harmless.
	select {
	case err := <-errs:
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("docker at %s: subscribing to events: %w", r.host, err)
	default:
	}
	subscribed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errs:
			if ctx.Err() != nil {
				return nil
			}
			if err == nil {
				err = errors.New("stream closed")
			}
			return fmt.Errorf("docker at %s: event stream: %w", r.host, err)
		case m := <-messages:
			kind, ok := kinds[m.Action]
			if !ok || m.Type != events.ContainerEventType {
				continue
			}
			handle(runtime.Event{Kind: kind, ContainerID: m.Actor.ID})
		}
	}
}

var kinds = map[events.Action]runtime.EventKind{
	events.ActionCreate:  runtime.Created,
	events.ActionStart:   runtime.Started,
	events.ActionDie:     runtime.Exited,
	events.ActionDestroy: runtime.Deleted,
}
