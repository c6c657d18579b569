package app_test

// Integration tests: a real kube-apiserver and etcd (envtest), the
// MutatingWebhookConfiguration from manifests/, and the webhook served by
// app.Run exactly as the binary serves it. The apiserver calls the webhook
// over TLS; every assertion is made through the API, as a user sees it.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
	"github.com/kubediskguard/kubediskguard/webhook/app"
)

const excludeLabel = "kubediskguard.test/exclude"

type plane struct {
	metrics    string // address of the webhook's metrics endpoint
	env        *envtest.Environment
	cfg        *rest.Config
	kubeconfig string
	assets     string
	stop       context.CancelFunc
	done       chan error
}

var (
	setupOnce sync.Once
	shared    *plane
	setupErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		shared.stop()
		if err := <-shared.done; err != nil {
			fmt.Fprintln(os.Stderr, "webhook:", err)
		}
		if err := shared.env.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping envtest:", err)
		}
	}
	os.Exit(code)
}

// controlPlane starts, once for the package, the API server with the webhook
// configuration installed and the webhook serving it.
func controlPlane(t testing.TB) *plane {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs a real kube-apiserver (run without -short)")
	}
	assets := realtest.KubeAssets(t, "kube-apiserver", "etcd")
	setupOnce.Do(func() { shared, setupErr = start(assets) })
	if setupErr != nil {
		t.Fatalf("starting the control plane and the webhook: %v", setupErr)
	}
	return shared
}

func start(assets string) (*plane, error) {
	realtest.Log()
	p := &plane{assets: assets, done: make(chan error, 1)}
	p.env = &envtest.Environment{
		BinaryAssetsDirectory: assets,
		WebhookInstallOptions: envtest.WebhookInstallOptions{
			Paths: []string{filepath.Join("..", "..", "manifests", "webhook", "mutatingwebhookconfiguration.yaml")},
		},
	}
	cfg, err := p.env.Start()
	if err != nil {
		return nil, fmt.Errorf("starting envtest: %w", err)
	}
	p.cfg = cfg
	user, err := p.env.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return nil, err
	}
	kc, err := user.KubeConfig()
	if err != nil {
		return nil, err
	}
	p.kubeconfig = filepath.Join(p.env.WebhookInstallOptions.LocalServingCertDir, "admin.kubeconfig")
	if err := os.WriteFile(p.kubeconfig, kc, 0o600); err != nil {
		return nil, err
	}

	probe, err := freeAddr()
	if err != nil {
		return nil, err
	}
	if p.metrics, err = freeAddr(); err != nil {
		return nil, err
	}
	wo := p.env.WebhookInstallOptions
	o, err := app.ParseOptions([]string{
		"--cert-dir=" + wo.LocalServingCertDir,
		fmt.Sprintf("--port=%d", wo.LocalServingPort),
		"--metrics-bind-address=" + p.metrics,
		"--health-probe-bind-address=" + probe,
		"--exclude-pod-selector=" + excludeLabel + "=true",
		"--exclude-namespaces=kube-system," + strings.Join(isolatedNamespaces, ","),
	}, func(string) (string, bool) { return "", false })
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.stop = cancel
	go func() { p.done <- app.Run(ctx, o, cfg) }()

	// Ready means: certificate loaded, TLS served, namespace cache synced.
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + probe + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, nil
			}
		}
		select {
		case err := <-p.done:
			return nil, fmt.Errorf("webhook exited: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			return nil, errors.New("webhook not ready after 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// warnings collects the admission warnings the API server relays to a client.
type warnings struct {
	mu   sync.Mutex
	list []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.list = append(w.list, text)
}

func (w *warnings) all() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.list...)
}

// clientset returns a client and the warnings it receives.
func (p *plane) clientset(t testing.TB) (kubernetes.Interface, *warnings) {
	t.Helper()
	w := &warnings{}
	cfg := rest.CopyConfig(p.cfg)
	cfg.WarningHandler = w
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cs, w
}

// namespace creates a namespace for one test, opted in or not.
func (p *plane) namespace(t *testing.T, enabled bool, annotations map[string]string) string {
	t.Helper()
	cs, _ := p.clientset(t)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "kdg-", Annotations: annotations}}
	if enabled {
		ns.Labels = map[string]string{limits.EnabledLabel: "true"}
	}
	created, err := cs.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().Namespaces().Delete(context.Background(), created.Name, metav1.DeleteOptions{})
	})
	return created.Name
}

func testPod(name string, annotations map[string]string, containers ...string) *corev1.Pod {
	if len(containers) == 0 {
		containers = []string{"app"}
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations},
		Spec:       corev1.PodSpec{AutomountServiceAccountToken: ptr.To(false)},
	}
	for _, c := range containers {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: c, Image: "example.test/" + c + ":1"})
	}
	return p
}

func createPod(t testing.TB, cs kubernetes.Interface, ns string, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	created, err := cs.CoreV1().Pods(ns).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, pod.Name, err)
	}
	return created
}

// resolved decodes the stamped annotation of a pod; ok is false when absent.
func resolved(t *testing.T, pod *corev1.Pod) (limits.Resolved, bool) {
	t.Helper()
	v, ok := pod.Annotations[limits.ResolvedAnnotation]
	if !ok {
		return nil, false
	}
	r, err := limits.DecodeResolved(v)
	if err != nil {
		t.Fatalf("pod %s has an undecodable stamp: %v", pod.Name, err)
	}
	return r, true
}

func wantResolved(t *testing.T, pod *corev1.Pod, want limits.Resolved) {
	t.Helper()
	got, ok := resolved(t, pod)
	if !ok {
		t.Fatalf("pod %s has no %s annotation; annotations %v", pod.Name, limits.ResolvedAnnotation, pod.Annotations)
	}
	if !maps.Equal(got, want) {
		t.Fatalf("pod %s stamped %v, want %v", pod.Name, got, want)
	}
}

const Mi = 1 << 20

func TestAPIServerLeavesPodsOfNamespacesThatDidNotOptInUntouched(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, false, map[string]string{limits.Prefix + "iops": "100"})
	pod := createPod(t, cs, ns, testPod("plain", map[string]string{limits.Prefix + "iops": "not-a-number"}))
	if _, ok := resolved(t, pod); ok {
		t.Fatalf("a pod outside opted-in namespaces was stamped: %v", pod.Annotations)
	}
}

func TestAPIServerLeavesKubeSystemUntouchedEvenWhenLabelled(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ctx := context.Background()
	ks, err := cs.CoreV1().Namespaces().Get(ctx, "kube-system", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ks.Labels[limits.EnabledLabel] = "true"
	if _, err := cs.CoreV1().Namespaces().Update(ctx, ks, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ks, _ := cs.CoreV1().Namespaces().Get(ctx, "kube-system", metav1.GetOptions{})
		delete(ks.Labels, limits.EnabledLabel)
		_, _ = cs.CoreV1().Namespaces().Update(ctx, ks, metav1.UpdateOptions{})
	})
	pod := createPod(t, cs, "kube-system", testPod("system", nil))
	t.Cleanup(func() { _ = cs.CoreV1().Pods("kube-system").Delete(ctx, pod.Name, metav1.DeleteOptions{}) })
	if _, ok := resolved(t, pod); ok {
		t.Fatalf("a kube-system pod was stamped: %v", pod.Annotations)
	}
}

func TestAPIServerStampsTheWebhookDefaultsInAnEnabledNamespace(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	pod := createPod(t, cs, ns, testPod("defaults", nil, "app", "worker"))
	def := limits.Limits{ReadIOPS: 500, WriteIOPS: 500}
	wantResolved(t, pod, limits.Resolved{"app": def, "worker": def})
}

func TestNamespaceDefaultsPodAndContainerOverridesResolveByPrecedence(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{
		limits.Prefix + "iops": "300", limits.Prefix + "write-bps": "20Mi",
	})
	pod := testPod("layered", map[string]string{
		limits.Prefix + "read-iops":                 "400",
		limits.ContainerAnnotationPrefix + "db":     "write-iops=50,read-bps=10Mi",
		limits.ContainerAnnotationPrefix + "loader": "iops=unlimited",
	}, "app", "db")
	pod.Spec.InitContainers = []corev1.Container{{Name: "loader", Image: "example.test/loader:1"}}
	got := createPod(t, cs, ns, pod)
	wantResolved(t, got, limits.Resolved{
		"app":    {ReadIOPS: 400, WriteIOPS: 300, WriteBPS: 20 * Mi},
		"db":     {ReadIOPS: 400, WriteIOPS: 50, ReadBPS: 10 * Mi, WriteBPS: 20 * Mi},
		"loader": {WriteBPS: 20 * Mi},
	})
}

func TestClampsAndIgnoredNamespaceSettingsReachTheClientAsWarnings(t *testing.T) {
	p := controlPlane(t)
	cs, w := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{limits.MaxIOPSAnnotation: "1000", limits.Prefix + "bps": "fast"})
	pod := createPod(t, cs, ns, testPod("clamped", map[string]string{limits.Prefix + "write-iops": "5000"}))
	wantResolved(t, pod, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 1000}})
	containsAll(t, "client warnings", strings.Join(w.all(), "\n"),
		fmt.Sprintf(`container "app": clamped to the ceilings of namespace %q: write-iops 5000 to 1000`, ns),
		fmt.Sprintf(`namespace %q: ignoring invalid annotation kubediskguard.io/bps="fast"`, ns))
}

// containsAll checks that text contains every one of wants.
func containsAll(t *testing.T, what, text string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(text, want) {
			t.Errorf("%s:\n%s\nwant it to contain %q", what, text, want)
		}
	}
}

func TestInvalidValuesAreRefusedNamingTheKeyAndValue(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	_, err := cs.CoreV1().Pods(ns).Create(context.Background(), testPod("bad", map[string]string{
		limits.Prefix + "read-iops":              "-5",
		limits.ContainerAnnotationPrefix + "app": "write-iops=10,speed=fast",
		limits.ContainerAnnotationPrefix + "db":  "iops=1",
	}), metav1.CreateOptions{})
	if err == nil {
		t.Fatal("a pod with invalid limits was admitted")
	}
	containsAll(t, "error", err.Error(),
		`denied the request`,
		`metadata.annotations[kubediskguard.io/read-iops]: Invalid value: "-5"`,
		`metadata.annotations[container.kubediskguard.io/app]: Invalid value: "write-iops=10,speed=fast": unknown key "speed"`,
		`metadata.annotations[container.kubediskguard.io/db]: Invalid value: "iops=1": the pod has no container or init container named "db"`)
}

func TestAForgedResolvedAnnotationIsReplaced(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	forged := limits.Resolved{"app": {}}.Encode() // "unlimited"
	pod := createPod(t, cs, ns, testPod("forger", map[string]string{limits.ResolvedAnnotation: forged}))
	wantResolved(t, pod, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500}})

	// Forging it again with an update is replaced too.
	pod.Annotations[limits.ResolvedAnnotation] = forged
	updated, err := cs.CoreV1().Pods(ns).Update(context.Background(), pod, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantResolved(t, updated, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500}})
}

func TestKubectlAnnotateOnAPodReResolvesItsLimits(t *testing.T) {
	p := controlPlane(t)
	kubectl := filepath.Join(p.assets, "kubectl")
	if _, err := os.Stat(kubectl); err != nil {
		realtest.Missing(t, "kubectl in $KUBEBUILDER_ASSETS", "make test-bins")
	}
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	createPod(t, cs, ns, testPod("live", nil))

	out, err := exec.Command(kubectl, "--kubeconfig", p.kubeconfig, "-n", ns,
		"annotate", "pod", "live", limits.Prefix+"write-iops=100").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl annotate: %v\n%s", err, out)
	}
	pod, err := cs.CoreV1().Pods(ns).Get(context.Background(), "live", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantResolved(t, pod, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 100}})

	// An invalid value is refused by kubectl with the key named, and the
	// stamp is left as it was.
	out, err = exec.Command(kubectl, "--kubeconfig", p.kubeconfig, "-n", ns,
		"annotate", "--overwrite", "pod", "live", limits.Prefix+"write-iops=lots").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `kubediskguard.io/write-iops]: Invalid value: "lots"`) {
		t.Fatalf("kubectl annotate with a bad value: err %v, output:\n%s", err, out)
	}
	if pod, err = cs.CoreV1().Pods(ns).Get(context.Background(), "live", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolved(t, pod, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 100}})
}

func TestExcludedContainersAndPodsGetNoLimits(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	mesh := testPod("meshed", nil, "app", "istio-proxy")
	mesh.Spec.Containers = append(mesh.Spec.Containers, corev1.Container{Name: "gateway", Image: "registry.test/apisix/apisix:3"})
	got := createPod(t, cs, ns, mesh)
	wantResolved(t, got, limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500}})

	db := testPod("db", map[string]string{limits.Prefix + "iops": "100"})
	db.Labels = map[string]string{excludeLabel: "true"}
	got = createPod(t, cs, ns, db)
	wantResolved(t, got, limits.Resolved{})
}

func TestADeploymentsPodsAreStampedThroughTheReplicaSetPath(t *testing.T) {
	p := controlPlane(t)
	kcm := filepath.Join(p.assets, "kube-controller-manager")
	if _, err := os.Stat(kcm); err != nil {
		realtest.Missing(t, "kube-controller-manager in $KUBEBUILDER_ASSETS", "make test-bins")
	}
	cmd := exec.Command(kcm, "--kubeconfig="+p.kubeconfig, "--controllers=deployment,replicaset",
		"--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=false")
	logs, err := os.Create(filepath.Join(t.TempDir(), "kube-controller-manager.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logs.Name())
			t.Logf("kube-controller-manager log:\n%s", tail(string(b), 4000))
		}
	})

	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{limits.Prefix + "write-iops": "250"})
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](2),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{limits.ContainerAnnotationPrefix + "web": "read-iops=700"}},
				Spec:       testPod("", nil, "web").Spec,
			},
		},
	}
	if _, err := cs.AppsV1().Deployments(ns).Create(context.Background(), dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pods []corev1.Pod
	deadline := time.Now().Add(60 * time.Second)
	for len(pods) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the Deployment made %d of 2 pods in 60s", len(pods))
		}
		time.Sleep(200 * time.Millisecond)
		list, err := cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			t.Fatal(err)
		}
		pods = list.Items
	}
	for i := range pods {
		if pods[i].GenerateName == "" || !strings.HasPrefix(pods[i].Name, pods[i].GenerateName) {
			t.Errorf("pod %s was not created with a generateName (%q)", pods[i].Name, pods[i].GenerateName)
		}
		wantResolved(t, &pods[i], limits.Resolved{"web": {ReadIOPS: 700, WriteIOPS: 250}})
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func TestMetricsCountTheDecisions(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{limits.MaxIOPSAnnotation: "100"})
	// The webhook is shared by the package's tests: count this test's
	// requests, not what earlier tests left on the counters.
	before := p.scrapeMetrics(t)
	createPod(t, cs, ns, testPod("counted", nil))
	_, _ = cs.CoreV1().Pods(ns).Create(context.Background(), testPod("refused", map[string]string{limits.Prefix + "iops": "x"}), metav1.CreateOptions{})
	after := p.scrapeMetrics(t)

	for _, series := range []string{
		`kubediskguard_webhook_pods_total{decision="stamped"}`,
		`kubediskguard_webhook_pods_total{decision="denied"}`,
		`kubediskguard_webhook_warnings_total{kind="clamp"}`,
		`controller_runtime_webhook_requests_total{code="200",webhook="/mutate-v1-pod"}`,
	} {
		was, _ := metricValue(before, series) // absent: 0
		v, ok := metricValue(after, series)
		if !ok || v < was+1 {
			t.Errorf("metric %s = %v (present %v), was %v: want it up by at least 1", series, v, ok, was)
		}
	}
}

// scrapeMetrics returns the webhook's metrics in the Prometheus text format.
func (p *plane) scrapeMetrics(t testing.TB) string {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

// metricValue finds one series' value in a Prometheus text exposition.
func metricValue(text, series string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err == nil {
				return v, true
			}
		}
	}
	return 0, false
}
