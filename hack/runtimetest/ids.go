package runtimetest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

// RandomHex returns n random bytes in hex: container IDs, unique names.
func RandomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// PodUID returns a random pod UID in the API server's form.
func PodUID(t testing.TB) string {
	u := RandomHex(t, 16)
	return fmt.Sprintf("%s-%s-%s-%s-%s", u[:8], u[8:12], u[12:16], u[16:20], u[20:])
}

// Pod is a Kubernetes pod as a node's container runtime sees it: the
// identity the kubelet puts in container labels, and its cgroupfs cgroup.
type Pod struct {
	UID, Namespace, Name string
	Cgroup               string // "/kubepods/besteffort/pod<uid>"
}

// Cleaner removes cgroups once its daemon has stopped (Containerd, Dockerd).
type Cleaner interface {
	CleanupCgroups(t testing.TB, paths ...string)
}

// NewPod returns a pod (a random UID when uid is "") whose cgroup d removes
// when the test ends.
func NewPod(t testing.TB, d Cleaner, uid, namespace, name string) Pod {
	t.Helper()
	if uid == "" {
		uid = PodUID(t)
	}
	p := Pod{UID: uid, Namespace: namespace, Name: name, Cgroup: "/kubepods/besteffort/pod" + uid}
	d.CleanupCgroups(t, p.Cgroup)
	return p
}

// CRILabels are the labels containerd's CRI plugin puts on the pod's
// container name, or on its sandbox when name is "".
func (p Pod) CRILabels(name string) map[string]string {
	return p.labels(name, runtime.LabelContainerType, "sandbox")
}

// DockerLabels are the labels cri-dockerd puts on the pod's container name,
// or on its sandbox when name is "".
func (p Pod) DockerLabels(name string) map[string]string {
	return p.labels(name, runtime.LabelDockerType, "podsandbox")
}

// labels are the pod's labels on its container name, whose kind is
// typeLabel=container, or on its sandbox (typeLabel=sandbox) when name is "".
func (p Pod) labels(name, typeLabel, sandbox string) map[string]string {
	l := map[string]string{
		runtime.LabelPodUID:       p.UID,
		runtime.LabelPodNamespace: p.Namespace,
		runtime.LabelPodName:      p.Name,
		typeLabel:                 "container",
	}
	if name == "" {
		l[typeLabel] = sandbox
	} else {
		l[runtime.LabelContainerName] = name
	}
	return l
}
