// Package containerd is the applier's runtime.Runtime over containerd's API:
// the Kubernetes containers that containerd's CRI plugin created in one
// namespace (k8s.io), their cgroups from the OCI spec's linux.cgroupsPath,
// and their lifecycle from containerd's event stream.
package containerd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

const (
	// DefaultSocket is containerd's default gRPC socket.
	DefaultSocket = "/run/containerd/containerd.sock"
	// DefaultNamespace is the namespace of containerd's CRI plugin.
	DefaultNamespace = "k8s.io"
	// Name is the runtime's name in logs and metrics.
	Name = "containerd"
)

// Event topics that Watch subscribes to.
const (
	topicContainerCreate = "/containers/create"
	topicContainerDelete = "/containers/delete"
	topicTaskCreate      = "/tasks/create"
	topicTaskStart       = "/tasks/start"
	topicTaskExit        = "/tasks/exit"
	topicTaskDelete      = "/tasks/delete"
	// topicSubscribed prefixes the topic of the marker event that Watch
	// publishes to itself to learn that containerd has registered its
	// subscription; nothing else subscribes to it.
	topicSubscribed = "/kubediskguard/subscribed/"

	// The marker is published again after markerFirstDelay, then after
	// twice as long each time up to a second, until markerTimeout.
	markerFirstDelay = 10 * time.Millisecond
	markerTimeout    = 30 * time.Second
)

// Runtime is a connection to containerd, limited to one namespace. It is
// safe for concurrent use.
type Runtime struct {
	client    *client.Client
	socket    string
	namespace string
	h         *cgroup.Hierarchy
}

var _ runtime.Runtime = (*Runtime)(nil)

// New connects to containerd at socket, a path (DefaultSocket when empty;
// a unix:// prefix is allowed), for the containers of namespace
// (DefaultNamespace when empty), whose cgroups are in h. It fails unless
// containerd answers.
func New(ctx context.Context, socket, namespace string, h *cgroup.Hierarchy) (*Runtime, error) {
	socket = strings.TrimPrefix(socket, "unix://")
	if socket == "" {
		socket = DefaultSocket
	}
	if namespace == "" {
		namespace = DefaultNamespace
	}
	// The client would wait for a missing socket to appear.
	if _, err := os.Stat(socket); err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", socket, err)
	}
	c, err := client.New(socket, client.WithDefaultNamespace(namespace))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", socket, err)
	}
	if _, err := c.Version(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("containerd at %s: %w", socket, errgrpc.ToNative(err))
	}
	return &Runtime{client: c, socket: socket, namespace: namespace, h: h}, nil
}

// Name returns "containerd".
func (r *Runtime) Name() string { return Name }

// HasNamespace reports whether the runtime's namespace exists in
// containerd, that is whether anything (the CRI plugin) has used it.
func (r *Runtime) HasNamespace(ctx context.Context) (bool, error) {
	names, err := r.client.NamespaceService().List(ctx)
	if err != nil {
		return false, fmt.Errorf("containerd at %s: listing namespaces: %w", r.socket, err)
	}
	return slices.Contains(names, r.namespace), nil
}

// Close closes the connection.
func (r *Runtime) Close() error { return r.client.Close() }

// List returns the Kubernetes containers (CRI kind "container") of the
// namespace that have a running or paused task.
func (r *Runtime) List(ctx context.Context) ([]runtime.Container, error) {
	recs, err := r.client.ContainerService().List(ctx,
		fmt.Sprintf("labels.%q==%q", runtime.LabelContainerType, "container"))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: listing containers in namespace %s: %w", r.socket, r.namespace, err)
	}
	resp, err := r.client.TaskService().List(ctx, &tasksapi.ListTasksRequest{})
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: listing tasks in namespace %s: %w", r.socket, r.namespace, errgrpc.ToNative(err))
	}
	pids := make(map[string]int, len(resp.Tasks))
	for _, p := range resp.Tasks {
		if alive(p.Status) {
			pids[p.ID] = int(p.Pid)
		}
	}
	var out []runtime.Container
	for _, rec := range recs {
		pid, ok := pids[rec.ID]
		if !ok {
			continue
		}
		c, err := r.container(rec)
		if errors.Is(err, runtime.ErrNotKubernetes) {
			continue
		}
		if err != nil {
			return nil, err
		}
		c.PID = pid
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b runtime.Container) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Container returns the Kubernetes container id, with the PID of its task
// when the task is running or paused.
func (r *Runtime) Container(ctx context.Context, id string) (runtime.Container, error) {
	c, err := r.Identify(ctx, id)
	if err != nil {
		return runtime.Container{}, err
	}
	resp, err := r.client.TaskService().Get(ctx, &tasksapi.GetRequest{ContainerID: id})
	switch err := errgrpc.ToNative(err); {
	case errdefs.IsNotFound(err):
		// Created, not started, or its task was deleted.
	case err != nil:
		return runtime.Container{}, fmt.Errorf("containerd at %s: task of container %s: %w", r.socket, id, err)
	case alive(resp.Process.GetStatus()):
		c.PID = int(resp.Process.GetPid())
	}
	return c, nil
}

// Identify implements runtime.Runtime: the container record only.
func (r *Runtime) Identify(ctx context.Context, id string) (runtime.Container, error) {
	rec, err := r.client.ContainerService().Get(ctx, id)
	if errdefs.IsNotFound(err) {
		return runtime.Container{}, fmt.Errorf("containerd container %s in namespace %s: %w", id, r.namespace, runtime.ErrNotFound)
	}
	if err != nil {
		return runtime.Container{}, fmt.Errorf("containerd at %s: container %s: %w", r.socket, id, err)
	}
	return r.container(rec)
}

// alive reports whether a task in status s has its init process. A created
// task has it too: runc's init process waits in the container's cgroup
// until the task starts, so limits written then are in place before the
// container's program runs its first instruction.
func alive(s task.Status) bool {
	return s == task.Status_CREATED || s == task.Status_RUNNING || s == task.Status_PAUSED || s == task.Status_PAUSING
}

// container makes a runtime.Container, without its PID, from a container
// record: ErrNotKubernetes unless it has CRI labels of kind "container".
func (r *Runtime) container(rec containers.Container) (runtime.Container, error) {
	l := rec.Labels
	if l[runtime.LabelPodUID] == "" || l[runtime.LabelContainerType] != "container" {
		return runtime.Container{}, fmt.Errorf("containerd container %s (%s=%q): %w",
			rec.ID, runtime.LabelContainerType, l[runtime.LabelContainerType], runtime.ErrNotKubernetes)
	}
	c := runtime.FromLabels(rec.ID, l)
	if rec.Spec == nil {
		return c, nil
	}
	// The spec is JSON, whatever the type URL of its version says. Only
	// its cgroups path is read: decoding whole specs of every container at
	// each full reconcile would be garbage for nothing.
	var spec struct {
		Linux *struct {
			CgroupsPath string `json:"cgroupsPath"`
		} `json:"linux"`
	}
	if err := json.Unmarshal(rec.Spec.GetValue(), &spec); err != nil {
		return runtime.Container{}, fmt.Errorf("containerd container %s: decoding its OCI spec: %w", rec.ID, err)
	}
	if spec.Linux == nil || spec.Linux.CgroupsPath == "" {
		return c, nil
	}
	dir, err := r.h.SpecDir(spec.Linux.CgroupsPath)
	if err != nil {
		return runtime.Container{}, fmt.Errorf("containerd container %s: %w", rec.ID, err)
	}
	c.CgroupDir = dir
	return c, nil
}

// Watch streams the lifecycle events of the namespace's containers (all of
// them: Container tells which are Kubernetes containers):
// /containers/create is Created; /tasks/create and /tasks/start are Started
// with the init PID; /tasks/exit and /tasks/delete of the init process are
// Exited; /containers/delete is Deleted.
//
// containerd registers a subscription after the client has sent it, so
// Watch publishes a marker event to itself and calls subscribed when the
// marker comes back: from then on no event can be missed. Events that came
// before the marker are handled after subscribed.
func (r *Runtime) Watch(ctx context.Context, subscribed func(), handle func(runtime.Event)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	marker := topicSubscribed + hex.EncodeToString(b)
	filters := []string{fmt.Sprintf("namespace==%q,topic==%q", r.namespace, marker)}
	for _, t := range []string{topicContainerCreate, topicTaskCreate, topicTaskStart, topicTaskExit, topicTaskDelete, topicContainerDelete} {
		filters = append(filters, fmt.Sprintf("namespace==%q,topic==%q", r.namespace, t))
	}
	envelopes, errs := r.client.Subscribe(ctx, filters...)

	// The marker is published until it comes back, since a marker sent
	// before containerd registered the subscription is not delivered.
	retry := time.NewTimer(0)
	defer retry.Stop()
	delay := markerFirstDelay
	deadline := time.Now().Add(markerTimeout)
	var early []runtime.Event // events before the marker
	live := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-retry.C:
			if live {
				continue
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("containerd at %s: the subscription marker did not come back within %s", r.socket, markerTimeout)
			}
			if err := r.client.EventService().Publish(ctx, marker, &emptypb.Empty{}); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("containerd at %s: publishing the subscription marker: %w", r.socket, err)
			}
			retry.Reset(delay)
			delay = min(2*delay, time.Second)
		case err := <-errs:
			if ctx.Err() != nil {
				return nil
			}
			if err == nil {
				err = errors.New("stream closed")
			}
			return fmt.Errorf("containerd at %s: event stream: %w", r.socket, errgrpc.ToNative(err))
		case env := <-envelopes:
			if env.Topic == marker {
				if !live {
					live = true
					subscribed()
					for _, ev := range early {
						handle(ev)
					}
					early = nil
				}
				continue
			}
			ev, ok, err := decode(env.Topic, env.Event)
			if err != nil {
				return fmt.Errorf("containerd at %s: %w", r.socket, err)
			}
			switch {
			case !ok:
			case live:
				handle(ev)
			default:
				early = append(early, ev)
			}
		}
	}
}

// decode maps a containerd event to a runtime event; ok is false for
// events about exec processes.
func decode(topic string, payload typeurl.Any) (ev runtime.Event, ok bool, err error) {
	v, err := typeurl.UnmarshalAny(payload)
	if err != nil {
		return runtime.Event{}, false, fmt.Errorf("decoding event %s: %w", topic, err)
	}
	switch e := v.(type) {
	case *eventstypes.ContainerCreate:
		return runtime.Event{Kind: runtime.Created, ContainerID: e.ID}, true, nil
	case *eventstypes.TaskCreate:
		return runtime.Event{Kind: runtime.Started, ContainerID: e.ContainerID, PID: int(e.Pid)}, true, nil
	case *eventstypes.TaskStart:
		return runtime.Event{Kind: runtime.Started, ContainerID: e.ContainerID, PID: int(e.Pid)}, true, nil
	case *eventstypes.TaskExit:
		if e.ID != "" && e.ID != e.ContainerID {
			return runtime.Event{}, false, nil
		}
		return runtime.Event{Kind: runtime.Exited, ContainerID: e.ContainerID}, true, nil
	case *eventstypes.TaskDelete:
		if e.ID != "" && e.ID != e.ContainerID {
			return runtime.Event{}, false, nil
		}
		return runtime.Event{Kind: runtime.Exited, ContainerID: e.ContainerID}, true, nil
	case *eventstypes.ContainerDelete:
		return runtime.Event{Kind: runtime.Deleted, ContainerID: e.ID}, true, nil
	}
	return runtime.Event{}, false, fmt.Errorf("event %s: unexpected payload %T", topic, v)
}
