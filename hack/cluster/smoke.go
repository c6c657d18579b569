package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// Pod is a pod for this node: spec.nodeName set (no scheduler runs), the
// local busybox image with imagePullPolicy Never, no service-account token
// (no controller-manager makes one), and the host's network unless
// Config.PodNetwork: the default CNI config is loopback-only (it makes the
// node Ready) and containerd 1.6 fails a pod sandbox whose network gives no
// eth0 ("failed to find network info"), so only hostNetwork pods start then.
// command runs in container "main".
func (c *Cluster) Pod(namespace, name string, command ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{
			NodeName:                      c.NodeName,
			HostNetwork:                   !c.PodNetwork,
			AutomountServiceAccountToken:  ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To(int64(1)),
			Containers: []corev1.Container{{
				Name:            "main",
				Image:           BusyboxImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         command,
			}},
		},
	}
}

// WaitRunning waits until the pod is Running with all containers started
// and returns it.
func (c *Cluster) WaitRunning(ctx context.Context, namespace, name string, timeout time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := c.wait(ctx, "pod "+namespace+"/"+name+" Running", 0, timeout, func() error {
		p, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		pod = p
		if p.Status.Phase != corev1.PodRunning {
			return fmt.Errorf("phase %s %s", p.Status.Phase, containerWaitReasons(p))
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.State.Running == nil || cs.ContainerID == "" {
				return fmt.Errorf("container %s not running", cs.Name)
			}
		}
		return nil
	})
	return pod, err
}

func containerWaitReasons(p *corev1.Pod) string {
	var r []string
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			r = append(r, cs.Name+": "+w.Reason+" "+w.Message)
		}
	}
	return strings.Join(r, "; ")
}

// ContainerID is the runtime id of container name in pod (without "containerd://").
func ContainerID(pod *corev1.Pod, name string) string {
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == name {
			_, id, _ := strings.Cut(cs.ContainerID, "://")
			return id
		}
	}
	return ""
}

// BlkioCgroup is where the kubelet (cgroupfs driver) puts a BestEffort
// container in the v1 blkio hierarchy.
func BlkioCgroup(pod *corev1.Pod, containerID string) string {
	return filepath.Join(cgroupRoot, "blkio", "kubepods", "besteffort", "pod"+string(pod.UID), containerID)
}

// SmokeResult is what Smoke measured.
type SmokeResult struct {
	PodRunning time.Duration // create → Running
	Exec       time.Duration // kubectl exec round trip
	Cgroup     string
	PodIP      string
}

// Smoke proves the node works: a pod runs, kubectl exec reaches it (through
// the apiserver → kubelet TLS path) and its container is in the expected
// blkio cgroup. It deletes the pod afterwards.
func (c *Cluster) Smoke(ctx context.Context) (*SmokeResult, error) {
	res := &SmokeResult{}
	t := time.Now()
	pod := c.Pod("default", "kdg-smoke", "sleep", "3600")
	if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	defer c.Client.CoreV1().Pods("default").Delete(context.Background(), "kdg-smoke", metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
	p, err := c.WaitRunning(ctx, "default", "kdg-smoke", 60*time.Second)
	if err != nil {
		return nil, err
	}
	res.PodRunning = time.Since(t)
	res.PodIP = p.Status.PodIP
	t = time.Now()
	out, err := c.Kubectl(ctx, "exec", "-n", "default", "kdg-smoke", "--", "cat", "/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	res.Exec = time.Since(t)
	id := ContainerID(p, "main")
	want := strings.TrimPrefix(BlkioCgroup(p, id), cgroupRoot+"/blkio")
	found := ""
	for _, line := range strings.Split(string(out), "\n") {
		if parts := strings.SplitN(line, ":", 3); len(parts) == 3 && strings.Contains(","+parts[1]+",", ",blkio,") {
			found = parts[2]
		}
	}
	if found != want {
		return nil, fmt.Errorf("container's blkio cgroup is %q, want %q (exec output: %s)", found, want, out)
	}
	res.Cgroup = BlkioCgroup(p, id)
	if _, err := os.Stat(res.Cgroup); err != nil {
		return nil, fmt.Errorf("cgroup dir: %w", err)
	}
	return res, nil
}
