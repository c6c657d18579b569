// Package connect opens the node's container runtime as the applier's
// CONTAINER_RUNTIME and CONTAINER_SOCKET_PATH settings name it, finding it
// when the setting is "auto".
package connect

import (
	"context"
	"fmt"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/applier/runtime/containerd"
	"github.com/kubediskguard/kubediskguard/applier/runtime/docker"
)

// Kinds of runtime, as CONTAINER_RUNTIME names them.
const (
	Auto       = "auto"
	Containerd = containerd.Name
	Docker     = docker.Name
)

// probeTimeout bounds each attempt of Auto to talk to a socket.
const probeTimeout = 5 * time.Second

// Runtime connects to the runtime of kind (Auto, Containerd or Docker) at
// socket, or at the runtime's default socket when socket is empty;
// namespace is containerd's (empty is containerd.DefaultNamespace).
//
// Auto tries containerd, then Docker, on socket when it is set. Otherwise
// it tries containerd.DefaultSocket, then docker.DefaultHost: a containerd
// that answers is taken if it has the namespace, or if Docker does not
// answer (on a Docker node containerd often answers too, serving Docker
// in its own namespace, not Kubernetes).
func Runtime(ctx context.Context, kind, socket, namespace string, h *cgroup.Hierarchy) (runtime.Runtime, error) {
	return open(ctx, kind, socket, namespace, h, containerd.DefaultSocket, docker.DefaultHost)
}

// open is Runtime with the default sockets as parameters, for tests.
func open(ctx context.Context, kind, socket, namespace string, h *cgroup.Hierarchy, containerdSocket, dockerHost string) (runtime.Runtime, error) {
	switch kind {
	case Containerd:
		return containerd.New(ctx, socket, namespace, h)
	case Docker:
		return docker.New(ctx, socket, h)
	case Auto:
	default:
		return nil, fmt.Errorf("container runtime %q: want %s, %s or %s", kind, Auto, Containerd, Docker)
	}
	if socket != "" {
		containerdSocket, dockerHost = socket, socket
	}

	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	c, cerr := containerd.New(pctx, containerdSocket, namespace, h)
	cancel()
	if cerr == nil {
		if socket != "" {
			return c, nil
		}
		if has, err := c.HasNamespace(ctx); err == nil && has {
			return c, nil
		}
	}
	pctx, cancel = context.WithTimeout(ctx, probeTimeout)
	d, derr := docker.New(pctx, dockerHost, h)
	cancel()
	switch {
	case derr == nil:
		if c != nil {
			c.Close()
		}
		return d, nil
	case cerr == nil:
		return c, nil
	}
	return nil, fmt.Errorf("no container runtime answers (tried containerd at %s, then docker at %s): %w; %w",
		containerdSocket, dockerHost, cerr, derr)
}
