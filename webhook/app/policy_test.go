package app_test

// Integration tests of the policy controller (webhook/policy) in the binary's
// wiring: the package's webhook (its controller leads the Lease in
// kube-system) and, for the tests that must see which controller acted,
// webhooks of their own (policyInstance) in namespaces the package's webhook
// excludes.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/app"
	"github.com/kubediskguard/kubediskguard/webhook/policy"
)

// Namespaces the package's webhook excludes (EXCLUDE_NAMESPACES), so that
// only a test's own webhooks act on them: admission leaves their pods
// unstamped, and every stamp there is a write of a test's controller.
const (
	leaderNS = "kdg-policy-leader"
	rateNS   = "kdg-policy-rate"
	benchNS  = "kdg-policy-bench"
	rbacNS   = "kdg-policy-rbac"
	lostNS   = "kdg-policy-lost"
)

var isolatedNamespaces = []string{leaderNS, rateNS, benchNS, rbacNS, lostNS}

// policyReach is how soon a namespace change must reach its pods' stamps.
const policyReach = 10 * time.Second

var (
	at500 = limits.Limits{ReadIOPS: 500, WriteIOPS: 500} // the webhook's default
	none  = limits.Resolved{}
)

// eventually polls f every 50 ms until it returns nil, failing the test with
// f's last error after timeout.
func eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	var last error
	err := wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		last = f()
		return last == nil, nil
	})
	if err != nil {
		t.Fatalf("%s: not within %s: %v", what, timeout, last)
	}
}

// stampOf reads a pod's stamp from the API server: ok false when it has none.
func stampOf(cs kubernetes.Interface, ns, name string) (string, bool, error) {
	p, err := cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return "", false, err
	}
	v, ok := p.Annotations[limits.ResolvedAnnotation]
	return v, ok, nil
}

// waitStamps waits until every pod named in want carries that stamp (a nil
// value: no stamp at all).
func waitStamps(t testing.TB, cs kubernetes.Interface, ns string, timeout time.Duration, want map[string]limits.Resolved) {
	t.Helper()
	eventually(t, timeout, "stamps of namespace "+ns, func() error {
		for name, r := range want {
			v, ok, err := stampOf(cs, ns, name)
			switch {
			case err != nil:
				return err
			case r == nil && ok:
				return fmt.Errorf("pod %s still stamped %s", name, v)
			case r != nil && (!ok || v != r.Encode()):
				return fmt.Errorf("pod %s stamped %q (present %v), want %s", name, v, ok, r.Encode())
			}
		}
		return nil
	})
}

// setNamespace applies change to a namespace's labels and annotations, as
// kubectl label/annotate would.
func setNamespace(t testing.TB, cs kubernetes.Interface, name string, change func(ns *corev1.Namespace)) {
	t.Helper()
	ctx := context.Background()
	ns, err := cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	if ns.Annotations == nil {
		ns.Annotations = map[string]string{}
	}
	change(ns)
	if _, err := cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func optIn(ns *corev1.Namespace)  { ns.Labels[limits.EnabledLabel] = "true" }
func optOut(ns *corev1.Namespace) { delete(ns.Labels, limits.EnabledLabel) }
func annotate(kv ...string) func(*corev1.Namespace) {
	return func(ns *corev1.Namespace) {
		for i := 0; i+1 < len(kv); i += 2 {
			ns.Annotations[kv[i]] = kv[i+1]
		}
	}
}

// namespaceEvent waits for an Event with reason on the namespace and returns
// its message.
func namespaceEvent(t testing.TB, cs kubernetes.Interface, ns, reason string) string {
	t.Helper()
	var msg string
	eventually(t, policyReach, "Event "+reason+" on namespace "+ns, func() error {
		// Events of a cluster-scoped object are in the default namespace.
		list, err := cs.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.kind=Namespace,involvedObject.name=" + ns + ",reason=" + reason,
		})
		if err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return errors.New("none yet")
		}
		msg = list.Items[len(list.Items)-1].Message
		return nil
	})
	return msg
}

func TestOptingANamespaceInStampsItsRunningPods(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, false, nil)
	createPod(t, cs, ns, testPod("plain", nil))
	createPod(t, cs, ns, testPod("override", map[string]string{limits.Prefix + "iops": "300"}))
	createPod(t, cs, ns, testPod("meshed", nil, "app", "istio-proxy"))
	excluded := testPod("excluded", nil)
	excluded.Labels = map[string]string{excludeLabel: "true"}
	createPod(t, cs, ns, excluded)
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{"plain": nil, "override": nil, "meshed": nil, "excluded": nil})
	before := p.scrapeMetrics(t)

	setNamespace(t, cs, ns, optIn)
	start := time.Now()
	// Exclusions apply as at admission: istio-proxy gets no entry, the
	// selector's pod an empty stamp.
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{
		"plain":    {"app": at500},
		"override": {"app": {ReadIOPS: 300, WriteIOPS: 300}},
		"meshed":   {"app": at500},
		"excluded": none,
	})
	t.Logf("4 running pods stamped %s after the opt-in", time.Since(start).Round(time.Millisecond))
	containsAll(t, "namespace Event", namespaceEvent(t, cs, ns, policy.ReasonResolved), "pods re-resolved: 4 (stamped 4, cleared 0, unchanged 0")

	after := p.scrapeMetrics(t)
	// The gauge is exported; its value is not asserted: client-go's
	// leader-election metrics are one process-wide series per lease name,
	// which another test's manager stopping in this test process sets to 0
	// (the stamps above already prove this manager's controller leads).
	if _, ok := metricValue(after, `leader_election_master_status{name="`+app.LeaseName+`"}`); !ok {
		t.Errorf("leader_election_master_status of %s is not exported", app.LeaseName)
	}
	for _, series := range []string{`kubediskguard_webhook_policy_pods_total{result="stamped"}`, `kubediskguard_webhook_policy_pass_duration_seconds_count`, `controller_runtime_reconcile_total{controller="policy",result="success"}`} {
		was, _ := metricValue(before, series)
		v, _ := metricValue(after, series)
		if v < was+1 {
			t.Errorf("metric %s = %v, was %v: want it up", series, v, was)
		}
	}
}

func TestNamespaceDefaultsAndCeilingsReachRunningPods(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	createPod(t, cs, ns, testPod("plain", nil))
	createPod(t, cs, ns, testPod("override", map[string]string{limits.Prefix + "write-iops": "900"}))
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{
		"plain": {"app": at500}, "override": {"app": {ReadIOPS: 500, WriteIOPS: 900}},
	})

	setNamespace(t, cs, ns, annotate(limits.Prefix+"iops", "200", limits.Prefix+"write-bps", "10Mi"))
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{
		"plain":    {"app": {ReadIOPS: 200, WriteIOPS: 200, WriteBPS: 10 * Mi}},
		"override": {"app": {ReadIOPS: 200, WriteIOPS: 900, WriteBPS: 10 * Mi}},
	})
	setNamespace(t, cs, ns, annotate(limits.MaxIOPSAnnotation, "150"))
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{
		"plain":    {"app": {ReadIOPS: 150, WriteIOPS: 150, WriteBPS: 10 * Mi}},
		"override": {"app": {ReadIOPS: 150, WriteIOPS: 150, WriteBPS: 10 * Mi}},
	})
	// A pod's own update still goes through the webhook: it cannot forge
	// its stamp back above the ceiling.
	pod, err := cs.CoreV1().Pods(ns).Get(context.Background(), "plain", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Annotations[limits.ResolvedAnnotation] = limits.Resolved{"app": {}}.Encode()
	if pod, err = cs.CoreV1().Pods(ns).Update(context.Background(), pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolved(t, pod, limits.Resolved{"app": {ReadIOPS: 150, WriteIOPS: 150, WriteBPS: 10 * Mi}})
}

func TestOptingANamespaceOutClearsItsPodsStamps(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{limits.Prefix + "iops": "100"})
	createPod(t, cs, ns, testPod("a", nil))
	createPod(t, cs, ns, testPod("b", nil, "app", "worker"))
	done := createPod(t, cs, ns, testPod("done", nil))
	done.Status.Phase = corev1.PodSucceeded
	if _, err := cs.CoreV1().Pods(ns).UpdateStatus(context.Background(), done, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	at100 := limits.Limits{ReadIOPS: 100, WriteIOPS: 100}
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{"a": {"app": at100}, "b": {"app": at100, "worker": at100}})

	setNamespace(t, cs, ns, optOut)
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{"a": nil, "b": nil})
	containsAll(t, "namespace Event", namespaceEvent(t, cs, ns, policy.ReasonResolved),
		"pods re-resolved: 3 (stamped 0, cleared 2, unchanged 0, skipped 1")
	// A finished pod needs no change.
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{"done": {"app": at100}})

	// The webhook no longer sees the namespace's pods: a stamp written on
	// one now is the controller's to remove.
	pod, err := cs.CoreV1().Pods(ns).Get(context.Background(), "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Annotations = map[string]string{limits.ResolvedAnnotation: limits.Resolved{"app": at100}.Encode()}
	if pod, err = cs.CoreV1().Pods(ns).Update(context.Background(), pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, ok := pod.Annotations[limits.ResolvedAnnotation]; !ok {
		t.Fatal("the update's stamp was not stored: nothing to remove")
	}
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{"a": nil})
}

// withoutWebhookConfiguration deletes the webhook configuration, as in a
// cluster where KubeDiskGuard's webhook is not installed yet, until the
// test ends.
func withoutWebhookConfiguration(t *testing.T, cs kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	mwcs := cs.AdmissionregistrationV1().MutatingWebhookConfigurations()
	mwc, err := mwcs.Get(ctx, "kubediskguard", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := mwcs.Delete(ctx, mwc.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		restored := &admissionregistrationv1.MutatingWebhookConfiguration{
			ObjectMeta: metav1.ObjectMeta{Name: mwc.Name, Labels: mwc.Labels, Annotations: mwc.Annotations},
			Webhooks:   mwc.Webhooks,
		}
		if _, err := mwcs.Create(ctx, restored, metav1.CreateOptions{}); err != nil {
			t.Errorf("restoring the webhook configuration: %v", err)
		}
	})
}

func TestPodsAdmittedWithoutTheWebhookAreFoundAndStamped(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, map[string]string{limits.Prefix + "write-iops": "70"})
	withoutWebhookConfiguration(t, cs)
	// The API server stores them as given: unstamped, or with a forged stamp.
	forged := limits.Resolved{"app": {}}.Encode()
	createPod(t, cs, ns, testPod("unstamped", nil))
	createPod(t, cs, ns, testPod("forged", map[string]string{limits.ResolvedAnnotation: forged}))
	bad := createPod(t, cs, ns, testPod("bad", map[string]string{limits.Prefix + "read-iops": "lots"}))

	// With no webhook to intercept the writes, what lands is the
	// controller's own resolution: the webhook's, to the byte.
	want := limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 70}}
	waitStamps(t, cs, ns, policyReach, map[string]limits.Resolved{"unstamped": want, "forged": want})

	// A pod whose own annotations are invalid is reported, on the pod and
	// on the namespace, and left as it is.
	eventually(t, policyReach, "Event "+policy.ReasonNotResolved+" on pod bad", func() error {
		list, err := cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.name=bad,reason=" + policy.ReasonNotResolved,
		})
		if err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return errors.New("none yet")
		}
		if m := list.Items[0].Message; !strings.Contains(m, `metadata.annotations[kubediskguard.io/read-iops]: Invalid value: "lots"`) {
			return fmt.Errorf("the Event does not name the annotation: %s", m)
		}
		return nil
	})
	containsAll(t, "namespace Event", namespaceEvent(t, cs, ns, policy.ReasonResolveFailed), "invalid 1", "invalid annotations on pod bad")
	if _, ok, err := stampOf(cs, ns, bad.Name); err != nil || ok {
		t.Errorf("the invalid pod was stamped (%v) or unreadable: %v", ok, err)
	}
}

func TestExcludedNamespacesArePassedOverUnchanged(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ctx := context.Background()
	// The webhook configuration never sends kube-system's pods: this one is
	// stored with the stamp it came with, and the controller must not touch it.
	forged := limits.Resolved{"app": {}}.Encode()
	pod := createPod(t, cs, "kube-system", testPod("forged-system", map[string]string{limits.ResolvedAnnotation: forged}))
	t.Cleanup(func() { _ = cs.CoreV1().Pods("kube-system").Delete(ctx, pod.Name, metav1.DeleteOptions{}) })
	plain := createPod(t, cs, "kube-system", testPod("plain-system", nil))
	t.Cleanup(func() { _ = cs.CoreV1().Pods("kube-system").Delete(ctx, plain.Name, metav1.DeleteOptions{}) })
	list, err := cs.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}

	series := `kubediskguard_webhook_policy_pods_total{result="unchanged"}`
	was, _ := metricValue(p.scrapeMetrics(t), series)
	setNamespace(t, cs, "kube-system", optIn)
	t.Cleanup(func() { setNamespace(t, cs, "kube-system", optOut) })
	// The controller's pass over kube-system counts its pods unchanged.
	eventually(t, policyReach, "a pass over kube-system's pods", func() error {
		if v, _ := metricValue(p.scrapeMetrics(t), series); v < was+float64(len(list.Items)) {
			return fmt.Errorf("%s = %v, was %v: want it up by %d", series, v, was, len(list.Items))
		}
		return nil
	})
	waitStamps(t, cs, "kube-system", 0, map[string]limits.Resolved{"plain-system": nil})
	if v, ok, err := stampOf(cs, "kube-system", pod.Name); err != nil || v != forged || !ok {
		t.Errorf("kube-system's pod's stamp changed to %q (present %v, %v), want it left at %s", v, ok, err, forged)
	}
}

// policyRun is a webhook a test runs beside the package's one: its log and
// the pod writes its client made.
type policyRun struct {
	name   string
	port   string // the webhook's HTTPS port
	log    *lockedBuffer
	stop   context.CancelFunc
	exited chan error

	mu     sync.Mutex
	writes map[string][]time.Time // pod writes (PATCH, PUT) by namespace
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) line(prefix, args string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(&l.b, "%s %s\n", prefix, args)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

var podWrite = regexp.MustCompile(`^/api/v1/namespaces/([^/]+)/pods/[^/]+$`)

// wrap counts pod writes on their way to the API server.
func (r *policyRun) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripper(func(req *http.Request) (*http.Response, error) {
		if m := podWrite.FindStringSubmatch(req.URL.Path); m != nil && (req.Method == http.MethodPatch || req.Method == http.MethodPut) {
			r.mu.Lock()
			r.writes[m[1]] = append(r.writes[m[1]], time.Now())
			r.mu.Unlock()
		}
		return rt.RoundTrip(req)
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// writesIn returns the times of the run's pod writes in namespace ns.
func (r *policyRun) writesIn(ns string) []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.writes[ns]...)
}

// leads reports whether the run's policy controller has started (it starts
// on the Lease holder only).
func (r *policyRun) leads() bool { return strings.Contains(r.log.String(), "Starting Controller") }

// startPolicyRun runs the webhook binary's Run with args on top of a free
// port and probe, no metrics endpoint, and a log of its own at V(1).
func startPolicyRun(t testing.TB, p *plane, name string, args ...string) *policyRun {
	t.Helper()
	return startPolicyRunAs(t, p, p.cfg, name, args...)
}

// startPolicyRunAs is startPolicyRun with the API server reached as cfg says.
func startPolicyRunAs(t testing.TB, p *plane, as *rest.Config, name string, args ...string) *policyRun {
	t.Helper()
	return startPolicyRunWith(t, p, as, name, func(*app.Options) {}, args...)
}

// startPolicyRunWith is startPolicyRunAs with the parsed options changed by
// change before the run starts.
func startPolicyRunWith(t testing.TB, p *plane, as *rest.Config, name string, change func(*app.Options), args ...string) *policyRun {
	t.Helper()
	r := &policyRun{name: name, log: &lockedBuffer{}, exited: make(chan error, 1), writes: map[string][]time.Time{}}
	port, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	probe, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	_, portNum, _ := strings.Cut(port, ":")
	o, err := app.ParseOptions(append([]string{"--cert-dir=" + p.env.WebhookInstallOptions.LocalServingCertDir, "--port=" + portNum,
		"--metrics-bind-address=0", "--health-probe-bind-address=" + probe}, args...), func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	change(o)
	r.port = portNum
	cfg := rest.CopyConfig(as)
	cfg.Wrap(r.wrap)
	log := funcr.New(r.log.line, funcr.Options{Verbosity: 1})
	ctx, cancel := context.WithCancel(logf.IntoContext(context.Background(), logr.Logger(log).WithName(name)))
	r.stop = cancel
	go func() { r.exited <- app.Run(ctx, o, cfg) }()
	t.Cleanup(func() { r.halt(t) })
	eventually(t, 30*time.Second, name+" ready", func() error {
		select {
		case err := <-r.exited:
			r.exited <- err
			t.Fatalf("%s exited: %v\n%s", name, err, r.log)
		default:
		}
		resp, err := http.Get("http://" + probe + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	})
	return r
}

// halt stops the run and waits for it to exit (idempotent).
func (r *policyRun) halt(t testing.TB) {
	r.stop()
	select {
	case err := <-r.exited:
		r.exited <- err
	case <-time.After(30 * time.Second):
		t.Errorf("%s did not stop within 30s", r.name)
	}
}

// isolatedNamespace makes (or, on a rerun in the same API server, resets)
// one of the namespaces the package's webhook excludes, not opted in, with
// no pods; its pods are removed at the end.
func isolatedNamespace(t testing.TB, cs kubernetes.Interface, name string) {
	t.Helper()
	ctx := context.Background()
	_, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		setNamespace(t, cs, name, func(ns *corev1.Namespace) { optOut(ns); ns.Annotations = nil })
		err = nil
	}
	if err != nil {
		t.Fatal(err)
	}
	removePods := func() {
		// Pods bound to no node are deleted at once.
		if err := cs.CoreV1().Pods(name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			t.Errorf("deleting the pods of %s: %v", name, err)
		}
	}
	removePods()
	t.Cleanup(func() {
		removePods()
		setNamespace(t, cs, name, optOut)
	})
}

// leaseNamespace makes a namespace for a test's Lease.
func (p *plane) leaseNamespace(t testing.TB) string {
	t.Helper()
	cs, _ := p.clientset(t)
	ns, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "kdg-lease-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

func TestOnlyTheLeaderRunsThePolicyControllerAndAnotherTakesOver(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ctx := context.Background()
	isolatedNamespace(t, cs, leaderNS)
	for _, name := range []string{"a", "b"} {
		createPod(t, cs, leaderNS, testPod(name, nil))
	}
	lease := p.leaseNamespace(t)
	runs := []*policyRun{
		startPolicyRun(t, p, "first", "--leader-election-namespace="+lease),
		startPolicyRun(t, p, "second", "--leader-election-namespace="+lease),
	}
	var leader, follower *policyRun
	eventually(t, 30*time.Second, "one of two webhooks leading", func() error {
		switch {
		case runs[0].leads() && runs[1].leads():
			t.Fatalf("both webhooks run the policy controller:\n%s\n%s", runs[0].log, runs[1].log)
		case runs[0].leads():
			leader, follower = runs[0], runs[1]
		case runs[1].leads():
			leader, follower = runs[1], runs[0]
		default:
			return errors.New("neither leads yet")
		}
		return nil
	})
	l, err := cs.CoordinationV1().Leases(lease).Get(ctx, app.LeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s leads; Lease %s/%s held by %s", leader.name, lease, l.Name, *l.Spec.HolderIdentity)

	setNamespace(t, cs, leaderNS, optIn)
	waitStamps(t, cs, leaderNS, policyReach, map[string]limits.Resolved{"a": {"app": at500}, "b": {"app": at500}})
	if n := len(leader.writesIn(leaderNS)); n != 2 {
		t.Errorf("the leader made %d pod writes, want 2 (one per pod); its log:\n%s", n, leader.log)
	}
	// Both were up the whole time: only the leader acted.
	if n := len(follower.writesIn(leaderNS)); n != 0 || follower.leads() {
		t.Fatalf("the follower made %d pod writes (leads: %v):\n%s", n, follower.leads(), follower.log)
	}

	// The leader stops, hands the Lease over, and the other one takes over.
	leader.halt(t)
	eventually(t, 30*time.Second, follower.name+" taking over", func() error {
		if !follower.leads() {
			return errors.New("not yet")
		}
		return nil
	})
	setNamespace(t, cs, leaderNS, annotate(limits.Prefix+"iops", "123"))
	at123 := limits.Limits{ReadIOPS: 123, WriteIOPS: 123}
	waitStamps(t, cs, leaderNS, policyReach, map[string]limits.Resolved{"a": {"app": at123}, "b": {"app": at123}})
	if n := len(follower.writesIn(leaderNS)); n != 2 {
		t.Errorf("the new leader made %d pod writes, want 2; its log:\n%s", n, follower.log)
	}
}

func TestPolicyWritesAreRateLimited(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	isolatedNamespace(t, cs, rateNS)
	const pods, rate = 20, 5
	want := map[string]limits.Resolved{}
	for i := range pods {
		name := fmt.Sprintf("p%02d", i)
		createPod(t, cs, rateNS, testPod(name, nil))
		want[name] = limits.Resolved{"app": at500}
	}
	r := startPolicyRun(t, p, "limited", "--leader-election-namespace="+p.leaseNamespace(t), fmt.Sprintf("--policy-writes-per-second=%d", rate))
	eventually(t, 30*time.Second, "the limited webhook leading", func() error {
		if !r.leads() {
			return errors.New("not yet")
		}
		return nil
	})

	waitSeries := `kubediskguard_webhook_policy_rate_limit_wait_seconds_total`
	waitedBefore, _ := metricValue(p.scrapeMetrics(t), waitSeries)
	setNamespace(t, cs, rateNS, optIn)
	waitStamps(t, cs, rateNS, 30*time.Second, want)
	writes := r.writesIn(rateNS)
	if len(writes) != pods {
		t.Fatalf("%d pod writes for %d pods, want one each", len(writes), pods)
	}
	// A burst of one second's worth, then one write every 1/rate seconds.
	took := writes[len(writes)-1].Sub(writes[0])
	minimum := time.Duration(pods-rate) * time.Second / rate
	t.Logf("%d writes at %d/s took %s (at least %s)", pods, rate, took.Round(time.Millisecond), minimum)
	if took < minimum-100*time.Millisecond {
		t.Errorf("%d writes took %s, want at least %s at %d/s", pods, took, minimum, rate)
	}
	// In any one second: the burst (rate) and rate more at most.
	for i, w := range writes {
		var inSecond int
		for _, x := range writes[i:] {
			if x.Sub(w) < time.Second {
				inSecond++
			}
		}
		if inSecond > 2*rate {
			t.Fatalf("%d writes within one second from write %d, want at most %d", inSecond, i, 2*rate)
		}
	}
	containsAll(t, "namespace Event", namespaceEvent(t, cs, rateNS, policy.ReasonResolved), fmt.Sprintf("pods re-resolved: %d (stamped %d,", pods, pods))
	// The waits show in the metric (the registry is the process's: this
	// webhook's series are the package's one's).
	waited, _ := metricValue(p.scrapeMetrics(t), waitSeries)
	t.Logf("%s went up by %.2f s", waitSeries, waited-waitedBefore)
	if waited-waitedBefore < minimum.Seconds()/2 {
		t.Errorf("%s went up by %.2f s for %s of rate-limited writes", waitSeries, waited-waitedBefore, minimum)
	}
}

func TestTheManifestsRBACIsAllThePolicyControllerNeeds(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ctx := context.Background()
	// The webhook's RBAC as manifests/ grants it, in its namespace.
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: systemNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join("..", "..", "manifests", "webhook", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		obj, _, err := clientgoscheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("decoding rbac.yaml: %v", err)
		}
		rbac := cs.RbacV1()
		switch o := obj.(type) {
		case *rbacv1.ClusterRole:
			_, err = rbac.ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			_, err = rbac.ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.Role:
			_, err = rbac.Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.RoleBinding:
			_, err = rbac.RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		default:
			t.Fatalf("rbac.yaml holds a %T", obj)
		}
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	sa, err := p.env.AddUser(envtest.User{
		Name:   "system:serviceaccount:" + systemNamespace + ":kubediskguard-webhook",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + systemNamespace, "system:authenticated"},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}

	isolatedNamespace(t, cs, rbacNS)
	createPod(t, cs, rbacNS, testPod("a", nil))
	// As it runs in its pod: the Lease in its own namespace.
	r := startPolicyRunAs(t, p, sa.Config(), "rbac", "--leader-election-namespace="+systemNamespace)
	eventually(t, 30*time.Second, "the webhook leading as its ServiceAccount", func() error {
		if !r.leads() {
			return errors.New("not yet")
		}
		return nil
	})
	setNamespace(t, cs, rbacNS, optIn)
	waitStamps(t, cs, rbacNS, policyReach, map[string]limits.Resolved{"a": {"app": at500}})
	containsAll(t, "namespace Event", namespaceEvent(t, cs, rbacNS, policy.ReasonResolved), "pods re-resolved: 1 (stamped 1,")
	if l := r.log.String(); strings.Contains(l, "forbidden") {
		t.Errorf("the webhook was refused something as its ServiceAccount:\n%s", l)
	}
}

// systemNamespace is the namespace manifests/ installs into.
const systemNamespace = "kubediskguard-system"

func TestTheWebhookHasTheLastWordOnAControllerWrite(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ns := p.namespace(t, true, nil)
	createPod(t, cs, ns, testPod("a", nil))
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{"a": {"app": at500}})
	// A controller whose settings differ from the serving webhook's (as a
	// replica mid-rollout): its write goes through the webhook, which stamps
	// its own resolution; the controller sees it and reports it.
	r := startPolicyRun(t, p, "other-defaults", "--leader-election-namespace="+p.leaseNamespace(t), "--container-iops-limit=600")
	msg := namespaceEvent(t, cs, ns, policy.ReasonResolveFailed)
	containsAll(t, "namespace Event", msg, "failed 1", `first failure: pod a: the stored stamp differs from the one written: stored "{\"app\":{\"readIOPS\":500`)
	if n := len(r.writesIn(ns)); n == 0 {
		t.Errorf("the controller made no write in %s", ns)
	}
	waitStamps(t, cs, ns, 0, map[string]limits.Resolved{"a": {"app": at500}})
}
