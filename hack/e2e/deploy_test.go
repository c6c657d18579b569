package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	certutil "k8s.io/client-go/util/cert"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubediskguard/kubediskguard/hack/certmanager"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/images"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// What manifests/ deploys, by name.
const (
	systemNS    = "kubediskguard-system"
	webhookName = "kubediskguard-webhook" // Deployment, Service, Certificate
	mwcName     = "kubediskguard"         // MutatingWebhookConfiguration
	applierName = "kubediskguard-applier" // DaemonSet
	servingCert = "kubediskguard-webhook"
	servingTLS  = "kubediskguard-webhook-tls"
	caSecret    = "kubediskguard-ca"
	webhookDNS  = webhookName + "." + systemNS + ".svc"
)

// TestDeployment is what a platform team does, on the real single-node
// cluster with controller-manager, scheduler and kube-proxy (cluster.Full),
// on either node kind (KDG_NODE; the v2 node's run them in the VM):
// the images built from Dockerfile.webhook and Dockerfile.applier with
// docker build and imported into the node's containerd; cert-manager's own
// controllers and CA injector (hack/certmanager) with its CRDs; then
// `kubectl apply -k` of an overlay that only points the DaemonSet at this
// node's containerd socket and data directory. The webhook Deployment and
// applier DaemonSet run as pods, and every check of TestE2E runs through
// them; then a forced renewal of the serving certificate is served without
// a restart.
//
//	make build test-bins && KUBEBUILDER_ASSETS=$PWD/.cache/bin/k8s-v1.36.3 go test -count=1 -v -run TestDeployment ./hack/e2e/
func TestDeployment(t *testing.T) {
	if testing.Short() {
		t.Skip("builds images and runs a real cluster; not with -short")
	}
	realtest.Root(t)
	realtest.HostLock(t) // dockerd, one kubelet, kubepods cgroups
	e, d := setUpDeployment(t)

	t.Run("CertManagerIssuedAndInjected", d.testIssued)
	e.runChecks(t)
	t.Run("RenewedCertificateServedWithoutRestart", d.testRenewal)
}

// deployed is KubeDiskGuard as manifests/ deploys it: the guard of
// TestDeployment.
type deployed struct {
	e        *env
	cl       client.Client // with cert-manager's types
	certMgr  *certmanager.Process
	settings []string // set on the DaemonSet on top of the overlay's
	paused   bool     // the DaemonSet's pods are kept off the node
}

func setUpDeployment(t *testing.T) (*env, *deployed) {
	assets := realtest.KubeAssets(t, "etcd", "kube-apiserver", "kubelet", "kubectl",
		"kube-controller-manager", "kube-scheduler", "kube-proxy", certmanager.Binary)
	kind := nodeKind(t)
	cfg := cluster.Config{Node: kind, BinDir: assets, Log: testWriter{t}, Full: true}
	for _, m := range cfg.Missing() {
		realtest.Missing(t, m, "make host-deps test-bins")
	}
	for _, b := range []struct{ bin, how string }{
		{"dockerd", "apt-get install docker.io"},
		{"/usr/bin/docker", "apt-get install docker.io"},
	} {
		if _, err := exec.LookPath(b.bin); err != nil {
			realtest.Missing(t, b.bin, b.how+" (make host-deps)")
		}
	}
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/var/tmp", "kdg-deploy-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{dir: dir, f: figuresFor(kind)}
	for _, sub := range []string{"logs", "overlay"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Dir = filepath.Join(dir, "cluster")
	d := &deployed{e: e}
	e.g = d
	interrupt := onInterrupt(t, dir, cfg.Dir)
	t.Cleanup(func() { e.tearDown(t) })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	start := time.Now()
	built, err := images.Build(ctx, images.Options{RepoRoot: root, Log: testWriter{t}})
	if err != nil {
		t.Fatalf("building the images: %v", err)
	}
	t.Logf("images built in %s: %s (%s), %s (%s)", time.Since(start).Round(time.Second),
		built.Webhook.Tag, built.Webhook.ID, built.Applier.Tag, built.Applier.ID)

	if e.c, err = cluster.Up(ctx, cfg); err != nil {
		t.Fatalf("cluster up: %v", err)
	}
	t.Logf("node %s: %s; data disk %s at %s", e.c.NodeName, e.c.Node.Layout(), e.c.Node.DataDisk(), e.c.Node.DataDir())
	e.checkFio(ctx, t)
	for _, img := range []images.Image{built.Webhook, built.Applier} {
		if err := e.c.Node.ImportImage(ctx, img.Tar); err != nil {
			t.Fatalf("importing %s into the node's containerd: %v", img.Tag, err)
		}
	}
	rc, err := clientcmd.BuildConfigFromFlags("", e.c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := cmapi.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if d.cl, err = client.New(rc, client.Options{Scheme: scheme}); err != nil {
		t.Fatal(err)
	}

	crds, err := certmanager.CRDDir()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certmanager.InstallCRDs(ctx, rc, crds); err != nil {
		t.Fatalf("installing cert-manager's CRDs: %v", err)
	}
	if d.certMgr, err = certmanager.Start(ctx, assets, e.c.Kubeconfig, filepath.Join(dir, "logs", "cert-manager.log")); err != nil {
		t.Fatalf("starting cert-manager: %v", err)
	}
	interrupt.Push(d.certMgr.Proc.Stop) // before the cluster's Down

	overlay, err := writeOverlay(filepath.Join(dir, "overlay"), filepath.Join(root, "manifests"), e.c.Node.ContainerdSocket(), e.c.Node.DataDir())
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if out, err := e.c.Kubectl(ctx, "apply", "-k", overlay); err != nil {
		t.Fatalf("kubectl apply -k %s: %v", overlay, err)
	} else {
		t.Logf("kubectl apply -k %s:\n%s", overlay, out)
	}
	if err := d.waitWebhook(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := d.waitApplier(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("webhook Deployment (2 pods) and applier DaemonSet ready %s after kubectl apply", time.Since(start).Round(time.Millisecond))
	if err := e.prepare(ctx); err != nil {
		t.Fatal(err)
	}
	return e, d
}

// writeOverlay writes what a platform team would for this node: the base,
// with the DaemonSet's containerd and data hostPaths pointed at the node's
// (the folder of the kubelet's containerd's socket; the data disk's mount
// point, shared as systemd mounts it: HostToContainer needs that), and the periodic check every 5 s as TestE2E runs the
// applier. Kustomize refuses an absolute path to the base: it is made
// relative.
func writeOverlay(dir, base, containerdSocket, data string) (string, error) {
	rel, err := filepath.Rel(dir, base)
	if err != nil {
		return "", err
	}
	if filepath.Base(containerdSocket) != "containerd.sock" {
		return "", fmt.Errorf("containerd socket %s: the DaemonSet expects containerd.sock in the mounted folder", containerdSocket)
	}
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %s
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: %s
        namespace: %s
      spec:
        template:
          spec:
            containers:
              - name: applier
                env:
                  - name: CHECK_INTERVAL
                    value: "%s"
            volumes:
              - name: containerd
                hostPath:
                  path: %s
              - name: data
                hostPath:
                  path: %s
`, rel, applierName, systemNS, checkInterval, filepath.Dir(containerdSocket), data)
	return dir, os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644)
}

func (d *deployed) kubectl(ctx context.Context, args ...string) error {
	_, err := d.e.c.Kubectl(ctx, append([]string{"-n", systemNS}, args...)...)
	return err
}

// waitWebhook waits until the webhook Deployment has replicas ready pods
// of its current template (0: no pod left at all).
func (d *deployed) waitWebhook(ctx context.Context, replicas int32) error {
	return cluster.Poll(ctx, fmt.Sprintf("webhook Deployment with %d ready pods", replicas), 200*time.Millisecond, d.e.f.slowed(3*time.Minute), func() error {
		dep := &appsv1.Deployment{}
		if err := d.cl.Get(ctx, client.ObjectKey{Namespace: systemNS, Name: webhookName}, dep); err != nil {
			return err
		}
		s := dep.Status
		if replicas == 0 {
			// Terminating pods too: they serve until they exit, and
			// kube-proxy sends to serving terminating endpoints when
			// there are no others.
			return d.noPods(ctx, webhookName)
		}
		if s.ObservedGeneration < dep.Generation || s.UpdatedReplicas != replicas || s.ReadyReplicas != replicas || s.Replicas != replicas {
			return fmt.Errorf("status %+v (generation %d)", s, dep.Generation)
		}
		// As the apiserver calls it: from the node, through the Service,
		// once kube-proxy has its ready endpoints.
		svc := &corev1.Service{}
		if err := d.cl.Get(ctx, client.ObjectKey{Namespace: systemNS, Name: webhookName}, svc); err != nil {
			return err
		}
		if _, err := d.e.c.Node.TLSPeer(ctx, net.JoinHostPort(svc.Spec.ClusterIP, "443"), webhookDNS); err != nil {
			return fmt.Errorf("the webhook's Service: %w", err)
		}
		return nil
	})
}

// waitApplier waits until the DaemonSet's pod of its current template is
// ready on the node (its /readyz: the first full reconcile has run).
func (d *deployed) waitApplier(ctx context.Context) error {
	return cluster.Poll(ctx, "applier DaemonSet ready", 200*time.Millisecond, d.e.f.slowed(3*time.Minute), func() error {
		ds := &appsv1.DaemonSet{}
		if err := d.cl.Get(ctx, client.ObjectKey{Namespace: systemNS, Name: applierName}, ds); err != nil {
			return err
		}
		s := ds.Status
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != 1 || s.UpdatedNumberScheduled != 1 || s.NumberReady != 1 || s.NumberAvailable != 1 {
			return fmt.Errorf("status %+v (generation %d)", s, ds.Generation)
		}
		pods, err := d.pods(ctx, applierName)
		if err != nil {
			return err
		}
		if len(pods) != 1 {
			return fmt.Errorf("%d applier pods", len(pods))
		}
		return nil
	})
}

// pods lists the pods of app.kubernetes.io/name=name that are not being
// deleted.
func (d *deployed) pods(ctx context.Context, name string) ([]corev1.Pod, error) {
	list := &corev1.PodList{}
	if err := d.cl.List(ctx, list, client.InNamespace(systemNS), client.MatchingLabels{"app.kubernetes.io/name": name}); err != nil {
		return nil, err
	}
	var out []corev1.Pod
	for _, p := range list.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// StopWebhook scales the Deployment to 0 and waits until its pods are gone.
func (d *deployed) StopWebhook(ctx context.Context) error {
	if err := d.kubectl(ctx, "scale", "deployment", webhookName, "--replicas=0"); err != nil {
		return err
	}
	return d.waitWebhook(ctx, 0)
}

// StartWebhook scales it back to the manifest's 2 replicas.
func (d *deployed) StartWebhook(ctx context.Context) error {
	if err := d.kubectl(ctx, "scale", "deployment", webhookName, "--replicas=2"); err != nil {
		return err
	}
	return d.waitWebhook(ctx, 2)
}

// pauseSelector keeps the DaemonSet's pods off every node while set.
const pauseSelector = `{"spec":{"template":{"spec":{"nodeSelector":{"kubediskguard.io/e2e-paused":"true"}}}}}`

// StopApplier keeps the DaemonSet's pod off the node. A crash is a SIGKILL
// of the applier's process on the node first (as the OOM killer would);
// the DaemonSet controller then deletes the pod before the kubelet's
// restart of the container matters.
func (d *deployed) StopApplier(ctx context.Context, crash bool) error {
	if crash {
		pods, err := d.pods(ctx, applierName)
		if err != nil {
			return err
		}
		for _, p := range pods {
			pid, err := cluster.TaskPID(ctx, d.e.c.Node, cluster.ContainerID(&p, "applier"))
			if err != nil {
				return err
			}
			if err := cluster.Signal(ctx, d.e.c.Node, pid, "KILL"); err != nil {
				return fmt.Errorf("killing the applier (pid %d): %w", pid, err)
			}
		}
	}
	if err := d.kubectl(ctx, "patch", "daemonset", applierName, "--type=strategic", "-p", pauseSelector); err != nil {
		return err
	}
	d.paused = true
	return cluster.Poll(ctx, "applier pods gone", 200*time.Millisecond, d.e.f.slowed(2*time.Minute), func() error { return d.noPods(ctx, applierName) })
}

// noPods: no pod of app.kubernetes.io/name=name is left, terminating or not.
func (d *deployed) noPods(ctx context.Context, name string) error {
	list := &corev1.PodList{}
	if err := d.cl.List(ctx, list, client.InNamespace(systemNS), client.MatchingLabels{"app.kubernetes.io/name": name}); err != nil {
		return err
	}
	if n := len(list.Items); n > 0 {
		return fmt.Errorf("%d pods left", n)
	}
	return nil
}

// StartApplier sets settings as the DaemonSet's environment on top of the
// overlay's (removing the previous start's), lets its pod back on the
// node, and waits until the new pod is ready.
func (d *deployed) StartApplier(ctx context.Context, settings ...string) error {
	var args []string
	for _, s := range d.settings {
		key, _, _ := strings.Cut(s, "=")
		if !slices.ContainsFunc(settings, func(n string) bool { return strings.HasPrefix(n, key+"=") }) {
			args = append(args, key+"-")
		}
	}
	args = append(args, settings...)
	if len(args) > 0 {
		if err := d.kubectl(ctx, append([]string{"set", "env", "daemonset/" + applierName, "--containers=applier"}, args...)...); err != nil {
			return err
		}
	}
	d.settings = settings
	if d.paused {
		if err := d.kubectl(ctx, "patch", "daemonset", applierName, "--type=json", "-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]`); err != nil {
			return err
		}
		d.paused = false
	}
	return d.waitApplier(ctx)
}

func (d *deployed) ApplierAsSetUp() bool { return !d.paused && len(d.settings) == 0 }

// ApplierLog is the log of the DaemonSet's pod on the node.
func (d *deployed) ApplierLog(ctx context.Context) (string, error) {
	out, err := d.e.c.Kubectl(ctx, "-n", systemNS, "logs", "daemonset/"+applierName, "--tail=-1")
	return string(out), err
}

func (d *deployed) Close(t testing.TB) {
	if t.Failed() && d.e.c != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, args := range [][]string{
			{"get", "all,certificates,issuers,secrets,events", "-o", "wide"},
			{"logs", "deployment/" + webhookName, "--tail=30"},
			{"logs", "daemonset/" + applierName, "--tail=30"},
		} {
			out, _ := d.e.c.Kubectl(ctx, append([]string{"-n", systemNS}, args...)...)
			t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
		}
		if d.certMgr != nil {
			t.Logf("cert-manager:\n%s", kdg.Tail(d.certMgr.Log, 30))
		}
	}
	if d.certMgr != nil {
		if err := d.certMgr.Stop(); err != nil {
			t.Errorf("stopping cert-manager: %v", err)
		}
	}
}

// testIssued: cert-manager issued the CA and the serving certificate (the
// Service's DNS names, signed by that CA), injected the CA into the
// MutatingWebhookConfiguration, and both webhook pods serve that
// certificate; the apiserver's calls succeed (a pod in an opted-in
// namespace is stamped).
func (d *deployed) testIssued(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), d.e.f.slowed(2*time.Minute))
	defer cancel()
	ca := d.caCertificate(ctx, t)
	leaf, crt := d.servingCertificate(ctx, t, 1)
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: webhookDNS, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("the serving certificate does not verify for %s against the CA cert-manager issued: %v", webhookDNS, err)
	}
	if !slices.Equal(sortedCopy(leaf.DNSNames), sortedCopy(crt.Spec.DNSNames)) {
		t.Errorf("serving certificate DNS names %v, the Certificate asks for %v", leaf.DNSNames, crt.Spec.DNSNames)
	}
	t.Logf("serving certificate serial %s for %v, issued by %q, revision %d", leaf.SerialNumber, leaf.DNSNames, leaf.Issuer.CommonName, revision(crt))

	mwc := &admissionv1.MutatingWebhookConfiguration{}
	if err := d.cl.Get(ctx, client.ObjectKey{Name: mwcName}, mwc); err != nil {
		t.Fatal(err)
	}
	for _, w := range mwc.Webhooks {
		got, err := certutil.ParseCertsPEM(w.ClientConfig.CABundle)
		if err != nil || len(got) != 1 || !got[0].Equal(ca) {
			t.Errorf("webhook %s: caBundle holds %d certificates (%v), want exactly the CA cert-manager issued (injected by its cainjector)", w.Name, len(got), err)
		}
		if w.ClientConfig.Service == nil || w.ClientConfig.URL != nil {
			t.Errorf("webhook %s: clientConfig %+v, want the Service (as the manifest says)", w.Name, w.ClientConfig)
		}
	}
	for ip, served := range d.servedCertificates(ctx, t) {
		if !served.Equal(leaf) {
			t.Errorf("webhook pod %s serves serial %s, the Secret holds %s", ip, served.SerialNumber, leaf.SerialNumber)
		}
	}
	d.admitted(ctx, t, "after-issue")
}

// testRenewal: a renewal forced as `cmctl renew` does gives a new
// certificate (rotationPolicy Always: a new key too); the kubelet updates
// the mounted Secret and both webhook pods serve the new certificate
// without a restart (same pods, same restart counts); the apiserver's calls
// still succeed.
func (d *deployed) testRenewal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), d.e.f.slowed(4*time.Minute))
	defer cancel()
	old, crt := d.servingCertificate(ctx, t, 1)
	before, err := d.pods(ctx, webhookName)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := certmanager.Renew(ctx, d.cl, systemNS, servingCert); err != nil {
		t.Fatal(err)
	}
	renewed, _ := d.servingCertificate(ctx, t, revision(crt)+1)
	if renewed.SerialNumber.Cmp(old.SerialNumber) == 0 {
		t.Fatalf("revision %d has the old certificate's serial %s", revision(crt)+1, old.SerialNumber)
	}
	t.Logf("renewed %s after the renew request: serial %s → %s", time.Since(start).Round(time.Millisecond), old.SerialNumber, renewed.SerialNumber)
	if bytes.Equal(old.RawSubjectPublicKeyInfo, renewed.RawSubjectPublicKeyInfo) {
		t.Errorf("the renewed certificate has the old key; the Certificate's rotationPolicy is Always")
	}
	if err := cluster.Poll(ctx, "both webhook pods serving the renewed certificate", 200*time.Millisecond, d.e.f.slowed(3*time.Minute), func() error {
		for ip, served := range d.servedCertificates(ctx, t) {
			if !served.Equal(renewed) {
				return fmt.Errorf("pod %s serves serial %s", ip, served.SerialNumber)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("both webhook pods serve the renewed certificate %s after the renew request", time.Since(start).Round(time.Millisecond))
	after, err := d.pods(ctx, webhookName)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(podRestarts(before)) != fmt.Sprint(podRestarts(after)) {
		t.Errorf("webhook pods and restart counts changed across the renewal: before %v, after %v", podRestarts(before), podRestarts(after))
	}
	d.admitted(ctx, t, "after-renewal")
}

// admitted creates a pod in the opted-in namespace: the apiserver calls the
// webhook through its Service and the pod comes back stamped.
func (d *deployed) admitted(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	pods := d.e.c.Client.CoreV1().Pods(optedIn)
	p, err := pods.Create(ctx, d.e.c.Pod(optedIn, name, "sleep", "inf"), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err != nil {
		t.Fatalf("a pod in %s was refused: %v", optedIn, err)
	}
	if p.Annotations["kubediskguard.io/limits"] == "" {
		t.Errorf("a pod in %s was admitted without kubediskguard.io/limits: %v", optedIn, p.Annotations)
	}
}

// podRestarts is "name/uid:restarts" of each pod, sorted.
func podRestarts(pods []corev1.Pod) []string {
	var out []string
	for _, p := range pods {
		var n int32
		for _, cs := range p.Status.ContainerStatuses {
			n += cs.RestartCount
		}
		out = append(out, fmt.Sprintf("%s/%s:%d", p.Name, p.UID, n))
	}
	slices.Sort(out)
	return out
}

func (d *deployed) caCertificate(ctx context.Context, t *testing.T) *x509.Certificate {
	t.Helper()
	certs := d.secretCerts(ctx, t, caSecret)
	if len(certs) != 1 || !certs[0].IsCA {
		t.Fatalf("Secret %s: want one CA certificate in tls.crt, got %d", caSecret, len(certs))
	}
	return certs[0]
}

// servingCertificate is the leaf in the serving Secret once cert-manager
// issued revision minRevision or later and no issuance is under way.
func (d *deployed) servingCertificate(ctx context.Context, t *testing.T, minRevision int) (*x509.Certificate, *cmapi.Certificate) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	crt, err := certmanager.WaitIssued(wctx, d.cl, systemNS, servingCert, minRevision)
	if err != nil {
		t.Fatal(err)
	}
	return d.secretCerts(ctx, t, servingTLS)[0], crt
}

// secretCerts are the certificates in the tls.crt of Secret name (at least
// one: it fails the test otherwise).
func (d *deployed) secretCerts(ctx context.Context, t *testing.T, name string) []*x509.Certificate {
	t.Helper()
	s := &corev1.Secret{}
	if err := d.cl.Get(ctx, client.ObjectKey{Namespace: systemNS, Name: name}, s); err != nil {
		t.Fatal(err)
	}
	certs, err := certutil.ParseCertsPEM(s.Data[corev1.TLSCertKey])
	if err != nil {
		t.Fatalf("Secret %s: %v", name, err)
	}
	return certs
}

// servedCertificates dials each webhook pod from the node (pod IP, port
// 9443, SNI the Service's name, as the apiserver does) and returns the certificate it
// presents, by pod IP.
func (d *deployed) servedCertificates(ctx context.Context, t *testing.T) map[string]*x509.Certificate {
	t.Helper()
	pods, err := d.pods(ctx, webhookName)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*x509.Certificate{}
	for _, p := range pods {
		addr := net.JoinHostPort(p.Status.PodIP, "9443")
		crt, err := d.e.c.Node.TLSPeer(ctx, addr, webhookDNS)
		if err != nil {
			t.Fatalf("TLS to webhook pod %s at %s: %v", p.Name, addr, err)
		}
		out[p.Status.PodIP] = crt
	}
	if len(out) != 2 {
		t.Fatalf("%d webhook pods, want 2", len(out))
	}
	return out
}

func revision(crt *cmapi.Certificate) int {
	if crt.Status.Revision == nil {
		return 0
	}
	return *crt.Status.Revision
}

func sortedCopy(s []string) []string {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}
