// Package runtime is the applier's view of a node's container runtime
// (containerd or Docker): the Kubernetes containers it runs, and a stream of
// their lifecycle events. The implementations live in the containerd and
// docker subpackages; the reconciler knows only this interface.
package runtime

import (
	"context"
	"errors"
)

// CRI labels that the kubelet puts on every container it creates, through
// containerd's CRI plugin or cri-dockerd.
const (
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodName       = "io.kubernetes.pod.name"
	LabelContainerName = "io.kubernetes.container.name"
	// LabelContainerType is "container" or "sandbox" (containerd's CRI plugin).
	LabelContainerType = "io.cri-containerd.kind"
	// LabelDockerType is "container" or "podsandbox" (dockershim / cri-dockerd).
	LabelDockerType = "io.kubernetes.docker.type"
)

// Container is a Kubernetes container as the runtime knows it.
type Container struct {
	// ID is the runtime's container ID.
	ID string
	// PodUID, PodNamespace and PodName identify its pod; Name is the
	// container's name in the pod spec.
	PodUID, PodNamespace, PodName, Name string
	// PID is its init process on the host, 0 when it is not running.
	PID int
	// CgroupDir is its absolute cgroup directory as the runtime's
	// configuration gives it (containerd: the OCI spec's
	// linux.cgroupsPath; Docker: HostConfig.CgroupParent and the ID),
	// under the applier's cgroup root. The reconciler prefers the cgroup
	// of the init process when PID is set.
	CgroupDir string
}

// FromLabels returns the container id of the pod that the kubelet's CRI
// labels name, without its PID or cgroup.
func FromLabels(id string, labels map[string]string) Container {
	return Container{
		ID:           id,
		PodUID:       labels[LabelPodUID],
		PodNamespace: labels[LabelPodNamespace],
		PodName:      labels[LabelPodName],
		Name:         labels[LabelContainerName],
	}
}

// EventKind is what happened to a container.
type EventKind uint8

const (
	// Created: the container exists; it may have no process yet.
	Created EventKind = iota + 1
	// Started: its init process exists (containerd: task created or
	// started; Docker: started). For containerd the task-create event
	// comes before the process runs the container's program.
	Started
	// Exited: its process is gone.
	Exited
	// Deleted: the container is gone.
	Deleted
)

// String returns the kind's name.
func (k EventKind) String() string {
	switch k {
	case Created:
		return "created"
	case Started:
		return "started"
	case Exited:
		return "exited"
	case Deleted:
		return "deleted"
	}
	return "unknown"
}

// Event is a lifecycle event of a container. PID is set on Started when
// the runtime's event carries it.
type Event struct {
	Kind        EventKind
	ContainerID string
	PID         int
}

// ErrNotKubernetes is returned by Container for a container that is not a
// Kubernetes container (no CRI labels) or is a pod sandbox.
var ErrNotKubernetes = errors.New("not a Kubernetes container")

// ErrNotFound is returned by Container for a container that does not exist.
var ErrNotFound = errors.New("container not found")

// Runtime is a connection to a container runtime.
type Runtime interface {
	// Name is "containerd" or "docker", for logs and metrics.
	Name() string
	// List returns the Kubernetes containers (not sandboxes) that have a
	// running process.
	List(ctx context.Context) ([]Container, error)
	// Container inspects one container; ErrNotFound and
	// ErrNotKubernetes are checkable with errors.Is.
	Container(ctx context.Context, id string) (Container, error)
	// Identify is Container without the PID, for when an event gave it:
	// containerd answers it from its metadata store, without asking the
	// task's shim, which is busy while it starts the task.
	Identify(ctx context.Context, id string) (Container, error)
	// Watch streams lifecycle events to handle, in order, until ctx is
	// done (it returns nil) or the stream breaks (it returns why; the
	// caller reconnects by calling Watch again). subscribed is called once
	// the stream is open, so that a full reconcile started from it cannot
	// miss an event.
	Watch(ctx context.Context, subscribed func(), handle func(Event)) error
	// Close releases the connection.
	Close() error
}
