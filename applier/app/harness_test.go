package app_test

// The harness of the integration tests and benchmarks: a real kube-apiserver
// and etcd (envtest, once for the package), a private containerd or dockerd
// per test (runtimetest), pods made through the API as the webhook would
// have stamped them, containers made as the kubelet would, and the applier
// run by app.Run with options from app.ParseOptions, as the binary runs it.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/kubediskguard/kubediskguard/applier/app"
	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

const nodeName = "test-node"

// plane is the package's API server.
type plane struct {
	env        *envtest.Environment
	cfg        *rest.Config
	cs         kubernetes.Interface
	kubeconfig string
}

var (
	planeOnce sync.Once
	shared    *plane
	planeErr  error
)

func TestMain(m *testing.M) {
	before := rootThrottles()
	code := m.Run()
	if after := rootThrottles(); after != before {
		// The applier must never limit the host's root cgroup (where every
		// exited process lands); a test run that did so fails.
		fmt.Fprintf(os.Stderr, "the root cgroup's throttle files changed during the tests:\nbefore:\n%s\nafter:\n%s\n", before, after)
		code = 1
	}
	if shared != nil {
		if err := shared.env.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping envtest:", err)
		}
		os.RemoveAll(filepath.Dir(shared.kubeconfig))
	}
	os.Exit(code)
}

// rootThrottles returns the root blkio cgroup's throttle files.
func rootThrottles() string {
	var b strings.Builder
	for _, d := range limits.Dimensions {
		f := filepath.Join(cgroup.DefaultRoot, "blkio", cgroup.V1File(d))
		content, _ := os.ReadFile(f)
		fmt.Fprintf(&b, "%s: %q\n", f, content)
	}
	return b.String()
}

// controlPlane starts, once for the package, a kube-apiserver and etcd.
func controlPlane(t testing.TB) *plane {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs a real kube-apiserver, containerd and the kernel's blkio throttle (run without -short)")
	}
	realtest.Root(t)
	assets := realtest.KubeAssets(t, "kube-apiserver", "etcd")
	planeOnce.Do(func() { shared, planeErr = startPlane(assets) })
	if planeErr != nil {
		t.Fatalf("starting the control plane: %v", planeErr)
	}
	return shared
}

func startPlane(assets string) (*plane, error) {
	realtest.Log()
	p := &plane{env: &envtest.Environment{BinaryAssetsDirectory: assets}}
	cfg, err := p.env.Start()
	if err != nil {
		return nil, fmt.Errorf("starting envtest: %w", err)
	}
	p.cfg = cfg
	if p.cs, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	user, err := p.env.AddUser(envtest.User{Name: "applier", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return nil, err
	}
	kc, err := user.KubeConfig()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kubediskguard-applier-kubeconfig-")
	if err != nil {
		return nil, err
	}
	p.kubeconfig = filepath.Join(dir, "kubeconfig") // removed by TestMain
	return p, os.WriteFile(p.kubeconfig, kc, 0o600)
}

// namespace creates a namespace for the test and deletes it at the end.
func (p *plane) namespace(t testing.TB) string {
	t.Helper()
	ns := "t-" + runtimetest.RandomHex(t, 5)
	if _, err := p.cs.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.cs.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	return ns
}

// createPod creates a pod bound to the test node with the resolved limits
// annotation (none when res is nil), as the webhook would have stamped it.
func (p *plane) createPod(t testing.TB, ns, name string, res limits.Resolved, containers ...string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			NodeName:                     nodeName,
			AutomountServiceAccountToken: ptr.To(false),
		},
	}
	if res != nil {
		pod.Annotations = map[string]string{limits.ResolvedAnnotation: res.Encode()}
	}
	for _, c := range containers {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: c, Image: runtimetest.Image})
	}
	out, err := p.cs.CoreV1().Pods(ns).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// setLimits replaces the pod's resolved annotation (removes it when res is
// nil), as the webhook does on an UPDATE.
func (p *plane) setLimits(t testing.TB, pod *corev1.Pod, res limits.Resolved) {
	t.Helper()
	patch := `{"metadata":{"annotations":{"` + limits.ResolvedAnnotation + `":null}}}`
	if res != nil {
		patch = fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, limits.ResolvedAnnotation, res.Encode())
	}
	if _, err := p.cs.CoreV1().Pods(pod.Namespace).Patch(context.Background(), pod.Name,
		types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// events returns the Events on the pod.
func (p *plane) events(t testing.TB, pod *corev1.Pod) []corev1.Event {
	t.Helper()
	list, err := p.cs.CoreV1().Events(pod.Namespace).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + pod.Name,
	})
	if err != nil {
		t.Fatal(err)
	}
	return list.Items
}

// applier is an applier run in the test process by app.Run.
type applier struct {
	metrics, probe string
	cancel         context.CancelFunc
	done           chan error
	started        time.Time
	stopped        bool
}

// startApplier runs app.Run with the options that args (and no
// environment) give, plus --node-name, metrics and probe on free loopback
// ports. It is stopped when the test ends, and must not have exited before.
func startApplier(t testing.TB, p *plane, args ...string) *applier {
	t.Helper()
	a := &applier{metrics: freeAddr(t), probe: freeAddr(t), done: make(chan error, 1)}
	all := append([]string{
		"--node-name", nodeName,
		"--metrics-bind-address", a.metrics,
		"--health-probe-bind-address", a.probe,
	}, args...)
	o, err := app.ParseOptions(all, noEnv)
	if err != nil {
		t.Fatalf("app.ParseOptions(%q): %v", all, err)
	}
	ctx, cancel := context.WithCancel(ctrllog.IntoContext(context.Background(), ctrllog.Log.WithName("applier")))
	a.cancel = cancel
	a.started = time.Now()
	go func() { a.done <- app.Run(ctx, o, p.cfg) }()
	t.Cleanup(func() { a.stop(t) })
	return a
}

// stop stops the applier, which must not have exited before.
func (a *applier) stop(t testing.TB) {
	t.Helper()
	if a.stopped {
		return
	}
	a.stopped = true
	a.alive(t)
	a.cancel()
	select {
	case err := <-a.done:
		if err != nil {
			t.Errorf("app.Run returned %v on shutdown", err)
		}
	case <-time.After(20 * time.Second):
		t.Error("app.Run did not return within 20s of its context's end")
	}
}

func noEnv(string) (string, bool) { return "", false }

// alive fails the test if the applier has exited.
func (a *applier) alive(t testing.TB) {
	t.Helper()
	select {
	case err := <-a.done:
		a.done <- err
		t.Fatalf("the applier exited: %v", err)
	default:
	}
}

// waitReady waits until /readyz answers 200 and returns how long since start.
func (a *applier) waitReady(t testing.TB, timeout time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		a.alive(t)
		code, body := httpGet("http://" + a.probe + "/readyz")
		if code == http.StatusOK {
			return time.Since(a.started)
		}
		last = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not 200 within %s; last answer: %s", timeout, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scrape returns the applier's metrics, each sample line as
// "name{labels}" → value.
func (a *applier) scrape(t testing.TB) map[string]float64 {
	t.Helper()
	code, body := httpGet("http://" + a.metrics + "/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	out := map[string]float64{}
	s := bufio.NewScanner(strings.NewReader(body))
	for s.Scan() {
		line := s.Text()
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	return out
}

// fullReconciles counts the applier's full passes by trigger.
const fullReconciles = "kubediskguard_applier_full_reconciles_total"

// noPeriodicPass fails the test if the applier's periodic full pass
// (CHECK_INTERVAL) ran: what the test proved must have come from events,
// the start or a reconnect.
func (a *applier) noPeriodicPass(t testing.TB) {
	t.Helper()
	m := a.scrape(t)
	if _, ok := m[fullReconciles+`{trigger="interval"}`]; !ok {
		t.Fatalf("no %s{trigger=\"interval\"} sample", fullReconciles)
	}
	if v := sample(m, fullReconciles, "trigger", "interval"); v != 0 {
		t.Errorf("%s{trigger=interval} = %v: the periodic full pass ran, and may have done what the test credits to events", fullReconciles, v)
	}
	t.Logf("full passes: start %v, reconnect %v, interval %v", sample(m, fullReconciles, "trigger", "start"),
		sample(m, fullReconciles, "trigger", "reconnect"), sample(m, fullReconciles, "trigger", "interval"))
}

func httpGet(url string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// disk is the data disk of the tests: a directory on the root filesystem,
// with files made outside any throttled cgroup, and the whole disk that
// holds it.
type disk struct {
	dir string
	dev device.Device
	h   *cgroup.Hierarchy
}

func newDisk(t testing.TB) *disk {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "kubediskguard-data-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing the test's data dir: %v", err)
		}
	})
	devs, err := (&device.Resolver{}).DataDevices(dir, "")
	if err != nil {
		t.Fatalf("the disk holding %s: %v", dir, err)
	}
	return &disk{dir: dir, dev: devs[0], h: runtimetest.Hierarchy(t)}
}

// file makes a file of size bytes in the data directory, on the disk.
func (d *disk) file(t testing.TB, name string, size int) {
	t.Helper()
	f, err := os.Create(filepath.Join(d.dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for n := 0; n < size; n += len(buf) {
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// mount is the bind mount of the data directory at /data in a container.
func (d *disk) mount() specs.Mount {
	return specs.Mount{Destination: "/data", Type: "bind", Source: d.dir, Options: []string{"rbind", "rw"}}
}

// readLoop is a container process reading file with 4 KiB direct IO for ever.
func readLoop(file string) []string {
	return []string{"/bin/sh", "-c", "while :; do dd if=/data/" + file + " of=/dev/null bs=4k iflag=direct 2>/dev/null; done"}
}

// writeLoop is a container process writing over file (16 MiB) with 4 KiB
// direct IO for ever.
func writeLoop(file string) []string {
	return []string{"/bin/sh", "-c", "while :; do dd if=/dev/zero of=/data/" + file + " bs=4k count=4096 oflag=direct conv=notrunc 2>/dev/null; done"}
}

// throttle returns the line of the disk in the cgroup's v1 file of the
// dimension ("" when none), or an error when the cgroup is gone.
func (d *disk) throttle(dir string, dim limits.Dimension) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, cgroup.V1File(dim)))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, d.dev.String()+" ") {
			return line, nil
		}
	}
	return "", nil
}

// waitThrottle waits until the cgroup's file of dim holds want ("" for no
// limit on the disk) and returns how long that took.
func (d *disk) waitThrottle(t testing.TB, dir string, dim limits.Dimension, want uint64, timeout time.Duration) time.Duration {
	t.Helper()
	line := ""
	if want > 0 {
		line = fmt.Sprintf("%s %d", d.dev, want)
	}
	start := time.Now()
	var got string
	var err error
	for time.Since(start) < timeout {
		if got, err = d.throttle(dir, dim); err == nil && got == line {
			return time.Since(start)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("%s of %s: want %q within %s, have %q (%v)", cgroup.V1File(dim), dir, line, timeout, got, err)
	return 0
}

// ops returns the read or write IOs that the cgroup completed on the disk.
func (d *disk) ops(t testing.TB, dir string, read bool) uint64 {
	t.Helper()
	st, err := d.h.Stats(dir, []device.Device{d.dev})
	if err != nil {
		t.Fatal(err)
	}
	if read {
		return st[d.dev].ReadIOs
	}
	return st[d.dev].WriteIOs
}

// measure is a container's IO rate on the disk, sampled from its cgroup.
type measure struct {
	dir  string
	read bool
	ops0 uint64
	t0   time.Time
}

func (d *disk) startMeasure(t testing.TB, dir string, read bool) *measure {
	return &measure{dir: dir, read: read, ops0: d.ops(t, dir, read), t0: time.Now()}
}

// rate returns the IOs per second since startMeasure.
func (d *disk) rate(t testing.TB, m *measure) float64 {
	ops := d.ops(t, m.dir, m.read)
	return float64(ops-m.ops0) / time.Since(m.t0).Seconds()
}

// checkLimited checks a limited container's rate r, measured since m
// started, against its limit: from 80 % of it up to tolerance over it. A
// throttle never lets more through than its limit, but other work on the
// host can take the disk from it: a rate below the band is logged and
// measured once more, over measureFor; a rate above it fails at once, as
// does a second below it. The last rate measured is returned.
func (d *disk) checkLimited(t testing.TB, what string, m *measure, r, limit float64) float64 {
	t.Helper()
	dir := "read"
	if !m.read {
		dir = "write"
	}
	r = onceMoreIfBelow(t, fmt.Sprintf("%s: %.1f %s IO/s", what, r, dir), r, 0.8*limit, func() float64 {
		m = d.startMeasure(t, m.dir, m.read)
		time.Sleep(measureFor)
		r := d.rate(t, m)
		t.Logf("%s: %.1f %s IO/s over %s", what, r, dir, measureFor)
		return r
	})
	if r > limit*tolerance || r < 0.8*limit {
		t.Errorf("%s: %.1f %s IO/s, want %.0f..%.0f", what, r, dir, 0.8*limit, limit*tolerance)
	}
	return r
}

// onceMoreIfBelow is the throttle checks' rule for host contention: a rate
// r below floor, the bottom of its limit's band, is measured once more
// (again) and that rate is judged; one above the band fails at once (the
// caller's check).
func onceMoreIfBelow(t testing.TB, what string, r, floor float64, again func() float64) float64 {
	t.Helper()
	if r >= floor {
		return r
	}
	t.Logf("%s, below %.0f, the band of its limit (host contention, load %s); measuring once more", what, floor, realtest.LoadAverage())
	return again()
}

// kpod is a pod in the API and on the node.
type kpod struct {
	*corev1.Pod
	node runtimetest.Pod
}

// onNode gives the pod's node side, whose cgroup is removed when the test ends.
func onNode(t testing.TB, d runtimetest.Cleaner, pod *corev1.Pod) kpod {
	t.Helper()
	return kpod{Pod: pod, node: runtimetest.NewPod(t, d, string(pod.UID), pod.Namespace, pod.Name)}
}

// ctrContainer is a container in the private containerd and its blkio cgroup.
type ctrContainer struct {
	*runtimetest.Container
	dir string
}

// run makes (and starts, if start) the pod's container name in containerd
// as the kubelet would, running args with the data disk at /data.
func run(t testing.TB, d *runtimetest.Containerd, dk *disk, rootfs string, p kpod, name string, args []string, start bool) ctrContainer {
	t.Helper()
	id := runtimetest.RandomHex(t, 32)
	c := d.NewContainer(t, runtimetest.ContainerSpec{
		Namespace: "k8s.io", ID: id, Labels: p.node.CRILabels(name),
		CgroupsPath: p.node.Cgroup + "/" + id, Rootfs: rootfs, Start: start,
		Args: args, Mounts: []specs.Mount{dk.mount()},
	})
	return ctrContainer{Container: c, dir: dk.h.Join(p.node.Cgroup + "/" + id)}
}

// k8sCtx is a context in containerd's k8s.io namespace.
func k8sCtx() context.Context {
	return namespaces.WithNamespace(context.Background(), "k8s.io")
}

// eventually retries f every 50ms until it returns nil or timeout passes.
func eventually(t testing.TB, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var errNotYet = errors.New("not yet")

func hasEvent(evs []corev1.Event, reason string) bool {
	for _, ev := range evs {
		if ev.Reason == reason {
			return true
		}
	}
	return false
}

// sample returns the value of the metric name whose labels include the
// label/value pairs (the first such sample; 0 when none).
func sample(m map[string]float64, name string, labels ...string) float64 {
	for k, v := range m {
		series, rest, _ := strings.Cut(k, "{")
		if series != name {
			continue
		}
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			if !strings.Contains(rest, fmt.Sprintf("%s=%q", labels[i], labels[i+1])) {
				match = false
				break
			}
		}
		if match {
			return v
		}
	}
	return 0
}
