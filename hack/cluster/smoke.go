package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
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
	err := c.wait(ctx, "pod "+namespace+"/"+name+" Running", Proc{}, timeout, func() error {
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
	if err != nil {
		err = fmt.Errorf("%w%s", err, c.podEvents(namespace, name))
	}
	return pod, err
}

// DeletePod deletes the pod (a 1 s grace period, not a forced delete: the
// object stays until the kubelet has stopped its containers) and waits
// until it is gone, PodTimeout at most. So what comes next does not start
// pods beside one the node is still tearing down: under emulation a
// container's stop can take minutes and hold the runtime up.
func (c *Cluster) DeletePod(ctx context.Context, namespace, name string) error {
	pods := c.Client.CoreV1().Pods(namespace)
	err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(1))})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return Poll(ctx, "pod "+namespace+"/"+name+" gone", 200*time.Millisecond, c.PodTimeout(), func() error {
		_, err := pods.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err == nil {
			return errors.New("still there")
		}
		return err
	})
}

// WaitServiceAccount waits until the namespace's `default` ServiceAccount
// exists in a Full cluster (the v2 node always is): until the
// controller-manager has made it, the ServiceAccount admission plugin
// refuses every pod of the namespace. Without Full there is nothing to
// wait for.
func (c *Cluster) WaitServiceAccount(ctx context.Context, namespace string) error {
	if !c.Full {
		return nil
	}
	return Poll(ctx, "ServiceAccount "+namespace+"/default", 200*time.Millisecond, c.PodTimeout(), func() error {
		_, err := c.Client.CoreV1().ServiceAccounts(namespace).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// podEvents is the pod's last events, for an error saying why it is not
// Running ("" when there are none or they cannot be read).
func (c *Cluster) podEvents(namespace, name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs, err := c.Client.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil || len(evs.Items) == 0 {
		return ""
	}
	items := evs.Items
	slices.SortFunc(items, func(a, b corev1.Event) int { return eventTime(a).Compare(eventTime(b)) })
	if len(items) > 10 {
		items = items[len(items)-10:]
	}
	var b strings.Builder
	b.WriteString("; its events:")
	for _, e := range items {
		fmt.Fprintf(&b, "\n  %s %s %s (x%d): %s", eventTime(e).Format(time.TimeOnly), e.Type, e.Reason, max(e.Count, 1), e.Message)
	}
	return b.String()
}

func eventTime(e corev1.Event) time.Time {
	if !e.LastTimestamp.IsZero() {
		return e.LastTimestamp.Time
	}
	return e.EventTime.Time
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

// ContainerCgroup is the on-node cgroup directory, in the IO hierarchy, of
// container name of pod (which must have its status), as the node's layout
// places it.
func (c *Cluster) ContainerCgroup(pod *corev1.Pod, name string) (string, error) {
	id := ContainerID(pod, name)
	if id == "" {
		return "", fmt.Errorf("pod %s/%s has no container %q with an ID in its status", pod.Namespace, pod.Name, name)
	}
	return c.Node.Layout().ContainerCgroup(pod, id)
}

// TaskPID is the on-node PID of the main process of the container id, from
// the node's containerd.
func TaskPID(ctx context.Context, n Node, id string) (int, error) {
	out, err := n.Ctr(ctx, "tasks", "ls")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("containerd has no task %s:\n%s", id, out)
}

// PodTimeout is how long a pod may take from create to Running on the
// cluster's node: 60 s on the host, scaled to the node kind (Slowed).
func (c *Cluster) PodTimeout() time.Duration { return Slowed(c.State.Node, 60*time.Second) }

// ReadyTimeout is how long a process started on the cluster's node (the
// webhook, the applier) may take to become ready: 60 s on the host, scaled
// to the node kind (Slowed).
func (c *Cluster) ReadyTimeout() time.Duration { return Slowed(c.State.Node, 60*time.Second) }

// SmokeResult is what Smoke measured.
type SmokeResult struct {
	PodRunning time.Duration // create → Running
	Exec       time.Duration // kubectl exec round trip
	Cgroup     string
	PodIP      string
	Service    time.Duration // Full: Deployment created → its Service answers
}

// Smoke proves the node works: a pod runs, kubectl exec reaches it (through
// the apiserver → kubelet TLS path) and its container's main process is in
// the cgroup the node's layout names (the IO hierarchy's). It deletes the pod afterwards.
func (c *Cluster) Smoke(ctx context.Context) (*SmokeResult, error) {
	res := &SmokeResult{}
	t := time.Now()
	pod := c.Pod("default", "kdg-smoke", "sleep", "3600")
	if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	defer c.Client.CoreV1().Pods("default").Delete(context.Background(), "kdg-smoke", metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
	p, err := c.WaitRunning(ctx, "default", "kdg-smoke", c.PodTimeout())
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
	l := c.Node.Layout()
	if res.Cgroup, err = l.ContainerCgroup(p, id); err != nil {
		return nil, err
	}
	// On cgroup v1 the container shares the node's cgroup namespace: it
	// sees its own cgroup path.
	if l.Cgroup == cgroup.V1 {
		want := strings.TrimPrefix(res.Cgroup, l.IODir())
		if found, err := cgroup.ParseProcCgroup(string(out), l.Cgroup); err != nil || found != want {
			return nil, fmt.Errorf("container's blkio cgroup is %q (%v), want %q (exec output: %s)", found, err, want, out)
		}
	}
	// Whatever the layout: the container's main process is in the cgroup
	// the layout names.
	pid, err := TaskPID(ctx, c.Node, id)
	if err != nil {
		return nil, err
	}
	procs, err := c.Node.ReadFile(ctx, path.Join(res.Cgroup, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("the container's cgroup: %w", err)
	}
	if !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(pid)) {
		return nil, fmt.Errorf("the container's main process %d is not in %s (it holds %q)", pid, res.Cgroup, procs)
	}
	if c.Full {
		t = time.Now()
		if err := c.smokeFull(ctx); err != nil {
			return nil, err
		}
		res.Service = time.Since(t)
	}
	return res, nil
}

// smokeFull proves what Config.Full adds: a Deployment's pod is scheduled
// (kube-scheduler) and made (kube-controller-manager) with a ServiceAccount
// token; its Service answers on its ClusterIP from the node (kube-proxy), and the
// pod reaches the apiserver through the `kubernetes` Service.
func (c *Cluster) smokeFull(ctx context.Context) error {
	const name, ns, body = "kdg-smoke-web", "default", "kdg smoke"
	labels := map[string]string{"app": name}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: ptr.To(int64(1)),
					Containers: []corev1.Container{{
						Name: "web", Image: BusyboxImage, ImagePullPolicy: corev1.PullNever,
						Command: []string{"sh", "-c", "mkdir /tmp/www && echo " + body + " >/tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"},
					}},
				},
			},
		},
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	deps, svcs := c.Client.AppsV1().Deployments(ns), c.Client.CoreV1().Services(ns)
	if _, err := deps.Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		return err
	}
	defer deps.Delete(context.Background(), name, metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationForeground)})
	svc, err := svcs.Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	defer svcs.Delete(context.Background(), name, metav1.DeleteOptions{})

	// From the node's network (the host reaches a VM's ClusterIPs only so),
	// a new connection for each try (Node.HTTPGet). The wait holds the
	// Deployment's pod start: a pod's bound, scaled to the node kind.
	addr := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	if err := c.wait(ctx, "Service "+name+" answering on "+addr, Proc{}, c.PodTimeout(), func() error {
		status, b, err := c.Node.HTTPGet(ctx, addr, "/")
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(b)) != body {
			return fmt.Errorf("status %d: %q", status, b)
		}
		return nil
	}); err != nil {
		return err
	}
	pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
	if err != nil || len(pods.Items) == 0 {
		return fmt.Errorf("the Deployment's pod: %v (%d pods)", err, len(pods.Items))
	}
	// Plain HTTP to the apiserver's TLS port: its "400 Bad Request" proves
	// the path through the Service without a TLS client in busybox.
	out, _ := c.Kubectl(ctx, "exec", "-n", ns, pods.Items[0].Name, "--", "sh", "-c",
		`cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT 2>&1`)
	if lines := strings.SplitN(string(out), "\n", 2); len(lines) < 2 || lines[0] != ns || !strings.Contains(lines[1], "400") {
		return fmt.Errorf("in the Deployment's pod, want the ServiceAccount namespace %q and the apiserver's 400 through the kubernetes Service, got %q", ns, out)
	}
	return nil
}
