package manifests

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	applierapp "github.com/kubediskguard/kubediskguard/applier/app"
	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime/containerd"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
	webhookapp "github.com/kubediskguard/kubediskguard/webhook/app"
	"github.com/kubediskguard/kubediskguard/webhook/mutate"
)

// Names the rest of the project relies on.
const (
	namespace    = "kubediskguard-system"
	webhookName  = "kubediskguard-webhook" // Deployment, Service, ServiceAccount, serving Certificate
	applierName  = "kubediskguard-applier" // DaemonSet, ServiceAccount
	injectCAFrom = "cert-manager.io/inject-ca-from"
	metadataName = "kubernetes.io/metadata.name"
	enabledLabel = "kubediskguard.io/enabled"
	nonrootUID   = 65532 // distroless "nonroot", Dockerfile.webhook's USER
)

// rule is one permission: API group, resource, verb.
type rule struct{ group, resource, verb string }

// wantRBAC is every permission each ServiceAccount holds, and why the code
// needs it. A grant missing here is a permission denied at run time; an extra
// grant is a privilege nothing uses.
var wantRBAC = map[string][]rule{
	// webhook/app and webhook/mutate: an informer cache of namespace metadata
	// (list, watch) and a direct read of a namespace the cache does not hold
	// yet (get). webhook/policy: an informer over pods (list, watch), the
	// merge patch of a pod's stamp (patch), Events on namespaces and pods
	// through client-go's recorder (create, patch), as leader election's on
	// its Lease; controller-runtime's leader election with client-go's lease
	// lock (get, create, update; the Role in the webhook's namespace).
	webhookName: {
		{"", "namespaces", "get"}, {"", "namespaces", "list"}, {"", "namespaces", "watch"},
		{"", "pods", "list"}, {"", "pods", "watch"}, {"", "pods", "patch"},
		{"", "events", "create"}, {"", "events", "patch"},
		{"coordination.k8s.io", "leases", "get"}, {"coordination.k8s.io", "leases", "create"}, {"coordination.k8s.io", "leases", "update"},
	},
	// applier/pods: an informer over the node's pods and one over the
	// opted-in namespaces (list, watch; lookups go to their stores, never
	// get). applier/kube's EventSink behind client-go's event recorder,
	// which only creates events and patches repeats.
	applierName: {
		{"", "pods", "list"}, {"", "pods", "watch"},
		{"", "namespaces", "list"}, {"", "namespaces", "watch"},
		{"", "events", "create"}, {"", "events", "patch"},
	},
}

// objects is the rendered base, by kind.
type objects struct {
	namespaces      []*corev1.Namespace
	serviceAccounts []*corev1.ServiceAccount
	services        []*corev1.Service
	clusterRoles    []*rbacv1.ClusterRole
	clusterBindings []*rbacv1.ClusterRoleBinding
	roles           []*rbacv1.Role
	roleBindings    []*rbacv1.RoleBinding
	deployments     []*appsv1.Deployment
	daemonSets      []*appsv1.DaemonSet
	pdbs            []*policyv1.PodDisruptionBudget
	webhookConfigs  []*admissionregistrationv1.MutatingWebhookConfiguration
	issuers         []*cmapi.Issuer
	certificates    []*cmapi.Certificate
	// namespaced are the objects of namespaced kinds.
	namespaced []runtime.Object
}

func scheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := cmapi.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// decodeAll decodes every YAML document of r strictly: an unknown kind, an
// unknown field or a duplicate field is an error.
func decodeAll(s *runtime.Scheme, r io.Reader) ([]runtime.Object, error) {
	codec := json.NewSerializerWithOptions(json.DefaultMetaFactory, s, s, json.SerializerOptions{Yaml: true, Strict: true})
	docs := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var out []runtime.Object
	for i := 0; ; i++ {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, gvk, err := codec.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d (%v): %w\n%s", i, gvk, err, doc)
		}
		out = append(out, obj)
	}
}

// render runs the pinned kubectl's kustomize on this directory (the base)
// and decodes every object.
func render(t *testing.T) *objects { return renderDir(t, ".") }

// renderDir is render of the kustomization in dir.
func renderDir(t *testing.T, dir string) *objects {
	t.Helper()
	kubectl := filepath.Join(realtest.KubeAssets(t, "kubectl"), "kubectl")
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(kubectl, "kustomize", dir)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl kustomize manifests/%s: %v\n%s", dir, err, stderr.String())
	}
	objs, err := decodeAll(scheme(t), &stdout)
	if err != nil {
		t.Fatalf("decoding the rendered base: %v", err)
	}
	o := &objects{}
	seen := map[string]bool{}
	for _, obj := range objs {
		m, err := metaOf(obj)
		if err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("%T %s/%s", obj, m.GetNamespace(), m.GetName())
		if seen[key] {
			t.Errorf("%s twice", key)
		}
		seen[key] = true
		switch obj.(type) {
		case *corev1.Namespace, *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding, *admissionregistrationv1.MutatingWebhookConfiguration:
		default:
			o.namespaced = append(o.namespaced, obj)
		}
		switch v := obj.(type) {
		case *corev1.Namespace:
			o.namespaces = append(o.namespaces, v)
		case *corev1.ServiceAccount:
			o.serviceAccounts = append(o.serviceAccounts, v)
		case *corev1.Service:
			o.services = append(o.services, v)
		case *rbacv1.ClusterRole:
			o.clusterRoles = append(o.clusterRoles, v)
		case *rbacv1.ClusterRoleBinding:
			o.clusterBindings = append(o.clusterBindings, v)
		case *rbacv1.Role:
			o.roles = append(o.roles, v)
		case *rbacv1.RoleBinding:
			o.roleBindings = append(o.roleBindings, v)
		case *appsv1.Deployment:
			o.deployments = append(o.deployments, v)
		case *appsv1.DaemonSet:
			o.daemonSets = append(o.daemonSets, v)
		case *policyv1.PodDisruptionBudget:
			o.pdbs = append(o.pdbs, v)
		case *admissionregistrationv1.MutatingWebhookConfiguration:
			o.webhookConfigs = append(o.webhookConfigs, v)
		case *cmapi.Issuer:
			o.issuers = append(o.issuers, v)
		case *cmapi.Certificate:
			o.certificates = append(o.certificates, v)
		default:
			t.Errorf("unexpected object %s: add it to this test and check what it must agree with", key)
		}
	}
	return o
}

func metaOf(obj runtime.Object) (metav1.Object, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return nil, fmt.Errorf("%T has no object metadata", obj)
	}
	return m, nil
}

func one[T metav1.Object](t *testing.T, kind string, list []T, name string) T {
	t.Helper()
	var found []T
	for _, x := range list {
		if x.GetName() == name {
			found = append(found, x)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want exactly one %s %q, found %d", kind, name, len(found))
	}
	return found[0]
}

func TestStrictDecodingRejectsUnknownFields(t *testing.T) {
	// The invariant tests below are only as good as the decoding: a
	// misspelt field must fail here, not be dropped silently.
	for name, doc := range map[string]string{
		"a misspelt Deployment field":   "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 2\n",
		"a misspelt Certificate field":  "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: x}\nspec:\n  dnsName: [a]\n  secretName: s\n  issuerRef: {name: i}\n",
		"a kind nobody registered":      "apiVersion: example.com/v1\nkind: Thing\nmetadata: {name: x}\n",
		"a duplicated field":            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  type: ClusterIP\n  type: NodePort\n",
		"a misspelt webhook rule field": "apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\nmetadata: {name: x}\nwebhooks:\n- name: a.b.c\n  rule: []\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := decodeAll(scheme(t), strings.NewReader(doc)); err == nil {
				t.Errorf("decoded without an error:\n%s", doc)
			}
		})
	}
}

// kustomizations are the directories users apply: the base, and the
// one-shot reset of an uninstall.
var kustomizations = []string{".", resetDir}

func TestEveryManifestFileIsInTheKustomization(t *testing.T) {
	resources := map[string][]string{} // by directory
	for _, dir := range kustomizations {
		b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var k struct {
			Resources []string `json:"resources"`
		}
		if err := yaml.Unmarshal(b, &k); err != nil {
			t.Fatal(err)
		}
		resources[dir] = k.Resources
	}
	err := filepath.WalkDir(".", func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".yaml") || filepath.Base(p) == "kustomization.yaml" {
			return err
		}
		// The file belongs to the kustomization of its own directory if it
		// has one, else to the base's.
		dir, rel := ".", p
		if _, ok := resources[filepath.Dir(p)]; ok {
			dir, rel = filepath.Dir(p), filepath.Base(p)
		}
		if !slices.Contains(resources[dir], filepath.ToSlash(rel)) {
			t.Errorf("%s is not listed in %s: kubectl apply -k would leave it out", p, filepath.Join(dir, "kustomization.yaml"))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEverythingLivesInTheKubeDiskGuardNamespace(t *testing.T) {
	o := render(t)
	one(t, "Namespace", o.namespaces, namespace)
	for _, obj := range o.namespaced {
		if m := obj.(metav1.Object); m.GetNamespace() != namespace {
			t.Errorf("%s %s is in namespace %q, want %q", obj.GetObjectKind().GroupVersionKind().Kind, m.GetName(), m.GetNamespace(), namespace)
		}
	}
}

// container returns the pod's only container.
func container(t *testing.T, kind string, spec *corev1.PodSpec) *corev1.Container {
	t.Helper()
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", kind, len(spec.Containers))
	}
	c := &spec.Containers[0]
	if len(c.Command) != 0 {
		t.Errorf("%s: command %q overrides the image's entrypoint; pass flags in args", kind, c.Command)
	}
	return c
}

// lookupEnv reads a container's environment as the process would see it; a
// value from the downward API reads as a placeholder naming its field.
func lookupEnv(c *corev1.Container) func(string) (string, bool) {
	return func(name string) (string, bool) {
		for _, e := range c.Env {
			if e.Name != name {
				continue
			}
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
				return "<" + e.ValueFrom.FieldRef.FieldPath + ">", true
			}
			return e.Value, true
		}
		return "", false
	}
}

// addrPort is the port of a bind address such as ":8080".
func addrPort(t *testing.T, flag, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", flag, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s %q: %v", flag, addr, err)
	}
	return int32(n)
}

// containerPort resolves a numeric or named port of c.
func containerPort(t *testing.T, c *corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, p.StrVal)
	return 0
}

// checkServing checks the probes and the metrics port against the
// component's --health-probe-bind-address and --metrics-bind-address.
func checkServing(t *testing.T, kind string, c *corev1.Container, healthAddr, metricsAddr string) {
	t.Helper()
	health := addrPort(t, "--health-probe-bind-address", healthAddr)
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: no HTTP %s probe", kind, p.name)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s: %s probe path %q, want %q", kind, p.name, p.probe.HTTPGet.Path, p.path)
		}
		if got := containerPort(t, c, p.probe.HTTPGet.Port); got != health {
			t.Errorf("%s: %s probe port %d, but --health-probe-bind-address is %q", kind, p.name, got, healthAddr)
		}
		if p.probe.HTTPGet.Scheme != "" && p.probe.HTTPGet.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s: %s probe scheme %s, want HTTP", kind, p.name, p.probe.HTTPGet.Scheme)
		}
	}
	if got := containerPort(t, c, intstr.FromString("metrics")); got != addrPort(t, "--metrics-bind-address", metricsAddr) {
		t.Errorf("%s: port \"metrics\" is %d, but --metrics-bind-address is %q", kind, got, metricsAddr)
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[r]; !ok {
			t.Errorf("%s: no %s request", kind, r)
		}
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Errorf("%s: no memory limit", kind)
	}
}

// mountOf returns the mount of c that holds path (the deepest) and its volume.
func mountOf(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, p string) (*corev1.VolumeMount, *corev1.Volume) {
	t.Helper()
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		mp := path.Clean(m.MountPath)
		if p == mp || strings.HasPrefix(p, mp+"/") {
			if best == nil || len(mp) > len(path.Clean(best.MountPath)) {
				best = &c.VolumeMounts[i]
			}
		}
	}
	if best == nil {
		t.Fatalf("container %s mounts nothing at %s", c.Name, p)
	}
	for i, v := range spec.Volumes {
		if v.Name == best.Name {
			return best, &spec.Volumes[i]
		}
	}
	t.Fatalf("container %s mounts volume %q, which the pod does not have", c.Name, best.Name)
	return nil, nil
}

// hostPathOf is the host path that container path p shows, through a hostPath
// volume.
func hostPathOf(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, p string) (string, *corev1.VolumeMount) {
	t.Helper()
	m, v := mountOf(t, spec, c, p)
	if v.HostPath == nil {
		t.Fatalf("%s is on volume %q, which is not a hostPath", p, v.Name)
	}
	rest := strings.TrimPrefix(p, path.Clean(m.MountPath))
	return path.Join(v.HostPath.Path, m.SubPath, rest), m
}

func TestTheWebhookCertificateServiceAndConfigurationAgree(t *testing.T) {
	o := render(t)
	d := one(t, "Deployment", o.deployments, webhookName)
	svc := one(t, "Service", o.services, webhookName)
	c := container(t, "webhook Deployment", &d.Spec.Template.Spec)
	opts, err := webhookapp.ParseOptions(c.Args, lookupEnv(c))
	if err != nil {
		t.Fatalf("the webhook would not start with the Deployment's args and env: %v", err)
	}

	// The apiserver calls the Service, the Service reaches --port.
	if len(o.webhookConfigs) != 1 {
		t.Fatalf("%d MutatingWebhookConfigurations, want 1", len(o.webhookConfigs))
	}
	cfg := o.webhookConfigs[0]
	if len(cfg.Webhooks) != 1 {
		t.Fatalf("%d webhooks, want 1", len(cfg.Webhooks))
	}
	w := cfg.Webhooks[0]
	ref := w.ClientConfig.Service
	if ref == nil || w.ClientConfig.URL != nil {
		t.Fatalf("webhook %s: clientConfig must name a Service and no URL", w.Name)
	}
	if ref.Name != svc.Name || ref.Namespace != svc.Namespace {
		t.Errorf("webhook calls Service %s/%s, the Service is %s/%s", ref.Namespace, ref.Name, svc.Namespace, svc.Name)
	}
	if ref.Path == nil || *ref.Path != mutate.Path {
		t.Errorf("webhook path %v, the server serves %s", ref.Path, mutate.Path)
	}
	callPort := int32(443)
	if ref.Port != nil {
		callPort = *ref.Port
	}
	var sp *corev1.ServicePort
	for i := range svc.Spec.Ports {
		if svc.Spec.Ports[i].Port == callPort {
			sp = &svc.Spec.Ports[i]
		}
	}
	if sp == nil {
		t.Fatalf("webhook calls port %d, the Service has no such port", callPort)
	}
	if got := containerPort(t, c, sp.TargetPort); int(got) != opts.Port {
		t.Errorf("Service port %d goes to container port %d, the webhook listens on --port %d", sp.Port, got, opts.Port)
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) || len(svc.Spec.Selector) == 0 {
		t.Errorf("Service selector %v does not select the webhook pods %v", svc.Spec.Selector, d.Spec.Template.Labels)
	}

	// cert-manager: the injected CA is the serving Certificate's, which is
	// for the Service's names and lands in the Secret mounted at --cert-dir.
	inject := cfg.Annotations[injectCAFrom]
	certNS, certName, _ := strings.Cut(inject, "/")
	if certNS != namespace || certName != webhookName {
		t.Errorf("%s is %q, want %s/%s", injectCAFrom, inject, namespace, webhookName)
	}
	cert := one(t, "Certificate", o.certificates, certName)
	if cert.Namespace != certNS {
		t.Errorf("%s names namespace %s, the Certificate is in %s", injectCAFrom, certNS, cert.Namespace)
	}
	wantDNS := []string{svc.Name + "." + svc.Namespace + ".svc", svc.Name + "." + svc.Namespace + ".svc.cluster.local"}
	if got := slices.Sorted(slices.Values(cert.Spec.DNSNames)); !slices.Equal(got, wantDNS) {
		t.Errorf("Certificate DNS names %v, want the Service's %v", cert.Spec.DNSNames, wantDNS)
	}
	if !slices.Contains(cert.Spec.Usages, cmapi.UsageServerAuth) {
		t.Errorf("Certificate usages %v lack %q", cert.Spec.Usages, cmapi.UsageServerAuth)
	}
	m, v := mountOf(t, &d.Spec.Template.Spec, c, path.Clean(opts.CertDir)+"/tls.crt")
	if path.Clean(m.MountPath) != path.Clean(opts.CertDir) || v.Secret == nil {
		t.Fatalf("--cert-dir %s is not a Secret volume's mount point (found %s from volume %s)", opts.CertDir, m.MountPath, v.Name)
	}
	if v.Secret.SecretName != cert.Spec.SecretName {
		t.Errorf("--cert-dir %s shows Secret %q, the Certificate writes %q", opts.CertDir, v.Secret.SecretName, cert.Spec.SecretName)
	}
	if len(v.Secret.Items) != 0 || m.SubPath != "" {
		t.Errorf("the serving Secret is mounted with items or a subPath: the kubelet would not update it on renewal")
	}
	if v.Secret.Optional != nil && *v.Secret.Optional {
		t.Errorf("the serving Secret is optional: the webhook would start without a certificate")
	}

	// The issuer chain: serving Certificate <- CA Issuer <- CA Certificate
	// (isCA) <- self-signed Issuer, all namespaced Issuers in this namespace.
	issuer := func(ref string, kind string, group string) *cmapi.Issuer {
		t.Helper()
		if (kind != "" && kind != "Issuer") || (group != "" && group != "cert-manager.io") {
			t.Fatalf("issuerRef %s is a %s.%s, want an Issuer.cert-manager.io", ref, kind, group)
		}
		return one(t, "Issuer", o.issuers, ref)
	}
	caIssuer := issuer(cert.Spec.IssuerRef.Name, cert.Spec.IssuerRef.Kind, cert.Spec.IssuerRef.Group)
	if caIssuer.Spec.CA == nil {
		t.Fatalf("the serving Certificate's Issuer %s is not a CA Issuer", caIssuer.Name)
	}
	var caCert *cmapi.Certificate
	for _, x := range o.certificates {
		if x.Spec.SecretName == caIssuer.Spec.CA.SecretName {
			caCert = x
		}
	}
	if caCert == nil {
		t.Fatalf("no Certificate writes the CA Issuer's Secret %q", caIssuer.Spec.CA.SecretName)
	}
	if !caCert.Spec.IsCA {
		t.Errorf("Certificate %s signs the serving certificate but is not isCA", caCert.Name)
	}
	root := issuer(caCert.Spec.IssuerRef.Name, caCert.Spec.IssuerRef.Kind, caCert.Spec.IssuerRef.Group)
	if root.Spec.SelfSigned == nil {
		t.Errorf("the CA Certificate's Issuer %s is not self-signed", root.Name)
	}
	if caCert.Spec.SecretName == cert.Spec.SecretName {
		t.Errorf("the CA and the serving certificate share Secret %q", cert.Spec.SecretName)
	}
}

func TestTheWebhookConfigurationAdmitsWhatTheSpecSays(t *testing.T) {
	o := render(t)
	if len(o.webhookConfigs) != 1 || len(o.webhookConfigs[0].Webhooks) != 1 {
		t.Fatal("want one MutatingWebhookConfiguration with one webhook")
	}
	w := o.webhookConfigs[0].Webhooks[0]
	if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Fail {
		t.Errorf("failurePolicy %v, want Fail: a pod must not start without its limits", w.FailurePolicy)
	}
	if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
		t.Errorf("sideEffects %v, want None", w.SideEffects)
	}
	if w.ReinvocationPolicy == nil || *w.ReinvocationPolicy != admissionregistrationv1.IfNeededReinvocationPolicy {
		t.Errorf("reinvocationPolicy %v, want IfNeeded", w.ReinvocationPolicy)
	}
	if w.TimeoutSeconds == nil || *w.TimeoutSeconds > 10 {
		t.Errorf("timeoutSeconds %v, want a short one (at most 10)", w.TimeoutSeconds)
	}
	if !slices.Contains(w.AdmissionReviewVersions, "v1") {
		t.Errorf("admissionReviewVersions %v lack v1", w.AdmissionReviewVersions)
	}
	if len(w.Rules) != 1 {
		t.Fatalf("%d rules, want 1", len(w.Rules))
	}
	r := w.Rules[0]
	ops := slices.Sorted(slices.Values(r.Operations))
	if !slices.Equal(ops, []admissionregistrationv1.OperationType{admissionregistrationv1.Create, admissionregistrationv1.Update}) ||
		!slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.APIVersions, []string{"v1"}) || !slices.Equal(r.Resources, []string{"pods"}) {
		t.Errorf("rule %+v, want CREATE and UPDATE of core v1 pods (no subresources)", r)
	}

	sel, err := metav1.LabelSelectorAsSelector(w.NamespaceSelector)
	if err != nil || w.NamespaceSelector == nil {
		t.Fatalf("namespaceSelector %v: %v", w.NamespaceSelector, err)
	}
	for name, tc := range map[string]struct {
		labels labels.Set
		want   bool
	}{
		"an opted-in namespace":            {labels.Set{metadataName: "shop", enabledLabel: "true"}, true},
		"a namespace that did not opt in":  {labels.Set{metadataName: "shop"}, false},
		"a namespace that opted out":       {labels.Set{metadataName: "shop", enabledLabel: "false"}, false},
		"kube-system, even opted in":       {labels.Set{metadataName: "kube-system", enabledLabel: "true"}, false},
		"the webhook's own, even opted in": {labels.Set{metadataName: namespace, enabledLabel: "true"}, false},
	} {
		if got := sel.Matches(tc.labels); got != tc.want {
			t.Errorf("%s (%v): sent to the webhook = %v, want %v", name, tc.labels, got, tc.want)
		}
	}
	if w.ObjectSelector != nil && len(w.ObjectSelector.MatchLabels)+len(w.ObjectSelector.MatchExpressions) > 0 {
		t.Errorf("objectSelector %v: a pod could skip the webhook by its own labels", w.ObjectSelector)
	}
}

func TestTheWebhookDeploymentIsHighlyAvailableAndLockedDown(t *testing.T) {
	o := render(t)
	d := one(t, "Deployment", o.deployments, webhookName)
	spec := &d.Spec.Template.Spec
	c := container(t, "webhook Deployment", spec)
	opts, err := webhookapp.ParseOptions(c.Args, lookupEnv(c))
	if err != nil {
		t.Fatalf("the webhook would not start with the Deployment's args and env: %v", err)
	}
	checkServing(t, "webhook", c, opts.HealthProbeAddress, opts.MetricsBindAddress)

	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Errorf("replicas %v, want at least 2", d.Spec.Replicas)
	}
	podLabels := labels.Set(d.Spec.Template.Labels)
	anti := spec.Affinity
	var terms []corev1.PodAffinityTerm
	if anti != nil && anti.PodAntiAffinity != nil {
		terms = append(terms, anti.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution...)
		for _, p := range anti.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
			terms = append(terms, p.PodAffinityTerm)
		}
	}
	spread := false
	for _, term := range terms {
		sel, err := metav1.LabelSelectorAsSelector(term.LabelSelector)
		if err == nil && term.TopologyKey == corev1.LabelHostname && sel.Matches(podLabels) {
			spread = true
		}
	}
	if !spread {
		t.Errorf("no pod anti-affinity on %s that selects the webhook's own pods", corev1.LabelHostname)
	}
	var pdb *policyv1.PodDisruptionBudget
	for _, p := range o.pdbs {
		if sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector); err == nil && sel.Matches(podLabels) {
			pdb = p
		}
	}
	switch {
	case pdb == nil:
		t.Error("no PodDisruptionBudget selects the webhook pods")
	case pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() < 1 || pdb.Spec.MinAvailable.IntValue() >= int(*d.Spec.Replicas):
		t.Errorf("PodDisruptionBudget minAvailable %v: want at least 1 and fewer than the replicas, or drains block", pdb.Spec.MinAvailable)
	}

	psc := spec.SecurityContext
	sc := c.SecurityContext
	if psc == nil || sc == nil {
		t.Fatal("webhook: no pod or container securityContext")
	}
	if nonRoot := firstBool(sc.RunAsNonRoot, psc.RunAsNonRoot); !nonRoot {
		t.Error("webhook: runAsNonRoot is not set")
	}
	uid := firstInt(sc.RunAsUser, psc.RunAsUser)
	if uid != nonrootUID {
		t.Errorf("webhook: runAsUser %d, want %d (the image's USER)", uid, nonrootUID)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("webhook: seccompProfile %v, want RuntimeDefault", seccomp)
	}
	if !firstBool(sc.ReadOnlyRootFilesystem) {
		t.Error("webhook: readOnlyRootFilesystem is not true")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("webhook: allowPrivilegeEscalation is not false")
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
		t.Errorf("webhook: capabilities %v, want drop ALL and add none", sc.Capabilities)
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Error("webhook: shares a host namespace")
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			t.Errorf("webhook: hostPath volume %s", v.Name)
		}
	}
}

func firstBool(bs ...*bool) bool {
	for _, b := range bs {
		if b != nil {
			return *b
		}
	}
	return false
}

func firstInt(is ...*int64) int64 {
	for _, i := range is {
		if i != nil {
			return *i
		}
	}
	return -1
}

func TestTheApplierDaemonSetMountsWhatItsConfigurationPointsAt(t *testing.T) {
	o := render(t)
	ds := one(t, "DaemonSet", o.daemonSets, applierName)
	spec := &ds.Spec.Template.Spec
	c := container(t, "applier DaemonSet", spec)
	opts, err := applierapp.ParseOptions(c.Args, lookupEnv(c))
	if err != nil {
		t.Fatalf("the applier would not start with the DaemonSet's args and env: %v", err)
	}
	checkServing(t, "applier", c, opts.HealthProbeAddress, opts.MetricsBindAddress)

	// NODE_NAME from the downward API.
	var nodeName *corev1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == "NODE_NAME" {
			nodeName = &c.Env[i]
		}
	}
	if nodeName == nil || nodeName.ValueFrom == nil || nodeName.ValueFrom.FieldRef == nil || nodeName.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME is %+v, want the downward API's spec.nodeName", nodeName)
	}

	writable := map[string]bool{} // mount names that may be read-write

	// CGROUP_ROOT: the host's cgroupfs, writable (throttle files).
	host, m := hostPathOf(t, spec, c, opts.CgroupRoot)
	if host != cgroup.DefaultRoot {
		t.Errorf("--cgroup-root %s shows host %s, want the host's %s", opts.CgroupRoot, host, cgroup.DefaultRoot)
	}
	if m.ReadOnly {
		t.Errorf("--cgroup-root %s is mounted read-only; the applier writes throttle files there", opts.CgroupRoot)
	}
	writable[m.Name] = true

	// PROC_ROOT: the host's /proc, read-only, instead of hostPID.
	if spec.HostPID {
		t.Errorf("hostPID is set; the read-only host /proc at --proc-root is enough and keeps host processes out of the applier's PID namespace")
	}
	host, m = hostPathOf(t, spec, c, opts.ProcRoot)
	if host != "/proc" || path.Clean(m.MountPath) != path.Clean(opts.ProcRoot) {
		t.Errorf("--proc-root %s shows host %s (mount %s), want the host's /proc itself", opts.ProcRoot, host, m.MountPath)
	}
	if !m.ReadOnly {
		t.Errorf("--proc-root %s is mounted read-write", opts.ProcRoot)
	}

	// The runtime socket: the host's, through a read-only directory mount.
	if opts.ContainerRuntime != "containerd" || opts.SocketPath == "" {
		t.Fatalf("runtime %q socket %q: the base targets containerd with an explicit socket", opts.ContainerRuntime, opts.SocketPath)
	}
	host, m = hostPathOf(t, spec, c, opts.SocketPath)
	if host != containerd.DefaultSocket {
		t.Errorf("--container-socket-path %s shows host %s, want containerd's %s", opts.SocketPath, host, containerd.DefaultSocket)
	}
	if !m.ReadOnly {
		t.Errorf("the runtime socket's directory %s is mounted read-write", m.MountPath)
	}

	// DATA_MOUNT: the host's data mount at the same path, read-only, seeing
	// mounts made after the applier started.
	if opts.DataDevices != "" {
		t.Errorf("DATA_DEVICES %q: the base resolves the disk from DATA_MOUNT", opts.DataDevices)
	}
	host, m = hostPathOf(t, spec, c, opts.DataMount)
	if host != opts.DataMount || path.Clean(m.MountPath) != path.Clean(opts.DataMount) {
		t.Errorf("--data-mount %s shows host %s through mount %s; want the host's %s at the same path", opts.DataMount, host, m.MountPath, opts.DataMount)
	}
	if !m.ReadOnly {
		t.Errorf("--data-mount %s is mounted read-write", opts.DataMount)
	}
	if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Errorf("--data-mount %s propagation %v, want HostToContainer", opts.DataMount, m.MountPropagation)
	}

	// Nothing else from the host, and nothing writable but the cgroupfs.
	mounted := map[string]bool{}
	for _, vm := range c.VolumeMounts {
		mounted[vm.Name] = true
		if !vm.ReadOnly && !writable[vm.Name] {
			t.Errorf("mount %s at %s is read-write", vm.Name, vm.MountPath)
		}
		if vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("mount %s propagates mounts back to the host", vm.Name)
		}
	}
	for _, v := range spec.Volumes {
		if !mounted[v.Name] {
			t.Errorf("volume %s is not mounted", v.Name)
		}
	}
	if len(spec.Volumes) != 4 {
		t.Errorf("%d volumes, want 4 (cgroupfs, /proc, runtime socket, data mount)", len(spec.Volumes))
	}
	if spec.HostNetwork || spec.HostIPC {
		t.Error("applier: shares the host's network or IPC namespace")
	}

	// Every node, not evicted first.
	tolerateAll := false
	for _, tol := range spec.Tolerations {
		if tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == "" {
			tolerateAll = true
		}
	}
	if !tolerateAll {
		t.Errorf("tolerations %v: want one with operator Exists and no key, to run on every node", spec.Tolerations)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	if sc := c.SecurityContext; sc == nil || !firstBool(sc.ReadOnlyRootFilesystem) {
		t.Error("applier: readOnlyRootFilesystem is not true")
	}
}

func TestRBACGrantsExactlyWhatTheCodeUses(t *testing.T) {
	o := render(t)
	roles := map[string][]rbacv1.PolicyRule{}
	for _, r := range o.clusterRoles {
		roles["ClusterRole/"+r.Name] = r.Rules
	}
	for _, r := range o.roles {
		roles["Role/"+r.Namespace+"/"+r.Name] = r.Rules
	}
	type binding struct {
		role     string
		subjects []rbacv1.Subject
	}
	var bindings []binding
	for _, b := range o.clusterBindings {
		bindings = append(bindings, binding{"ClusterRole/" + b.RoleRef.Name, b.Subjects})
	}
	for _, b := range o.roleBindings {
		role := "ClusterRole/" + b.RoleRef.Name
		if b.RoleRef.Kind == "Role" {
			role = "Role/" + b.Namespace + "/" + b.RoleRef.Name
		}
		bindings = append(bindings, binding{role, b.Subjects})
	}

	got := map[string][]rule{}
	for _, b := range bindings {
		rules, ok := roles[b.role]
		if !ok {
			t.Errorf("a binding refers to %s, which the base does not define", b.role)
			continue
		}
		for _, s := range b.subjects {
			if s.Kind != rbacv1.ServiceAccountKind || s.Namespace != namespace {
				t.Errorf("%s is bound to %s %s/%s, not to one of the base's ServiceAccounts", b.role, s.Kind, s.Namespace, s.Name)
				continue
			}
			for _, pr := range rules {
				if len(pr.NonResourceURLs) > 0 || len(pr.ResourceNames) > 0 {
					t.Errorf("%s: rule %+v: non-resource URLs or resource names are not expected", b.role, pr)
				}
				for _, g := range pr.APIGroups {
					for _, r := range pr.Resources {
						for _, v := range pr.Verbs {
							got[s.Name] = append(got[s.Name], rule{g, r, v})
						}
					}
				}
			}
		}
	}
	for _, sa := range o.serviceAccounts {
		if _, ok := wantRBAC[sa.Name]; !ok {
			t.Errorf("ServiceAccount %s is not in wantRBAC: write down what it needs", sa.Name)
		}
	}
	for sa, want := range wantRBAC {
		one(t, "ServiceAccount", o.serviceAccounts, sa)
		g := sortRules(got[sa])
		w := sortRules(want)
		if !slices.Equal(g, w) {
			t.Errorf("ServiceAccount %s is granted\n  %v\nthe code uses\n  %v", sa, g, w)
		}
	}
	d := one(t, "Deployment", o.deployments, webhookName)
	ds := one(t, "DaemonSet", o.daemonSets, applierName)
	for _, w := range []struct {
		kind, sa string
		spec     corev1.PodSpec
	}{{"webhook Deployment", webhookName, d.Spec.Template.Spec}, {"applier DaemonSet", applierName, ds.Spec.Template.Spec}} {
		if w.spec.ServiceAccountName != w.sa {
			t.Errorf("%s runs as ServiceAccount %q, want %q", w.kind, w.spec.ServiceAccountName, w.sa)
		}
		if w.spec.AutomountServiceAccountToken != nil && !*w.spec.AutomountServiceAccountToken {
			t.Errorf("%s does not mount its token, but talks to the API", w.kind)
		}
	}
}

func sortRules(rs []rule) []rule {
	out := slices.Clone(rs)
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.group != b.group {
			return a.group < b.group
		}
		if a.resource != b.resource {
			return a.resource < b.resource
		}
		return a.verb < b.verb
	})
	return slices.Compact(out)
}

// What manifests/reset deploys.
const (
	resetDir       = "reset"
	resetNamespace = "kubediskguard-reset"
	resetName      = "kubediskguard-reset" // DaemonSet
)

// TestTheResetDaemonSetClearsWhatTheApplierLimits: the one-shot reset of an
// uninstall runs `kubediskguard-applier reset --wait` on every node, with
// the applier's image and the applier DaemonSet's data disk settings and
// host paths (so it clears the same devices in the same cgroups), Ready
// only once done, and nothing the reset does not need: no runtime socket,
// no API token, no writable mount but the cgroupfs. It lives in its own
// namespace so that it can run after the base is deleted.
func TestTheResetDaemonSetClearsWhatTheApplierLimits(t *testing.T) {
	base, reset := render(t), renderDir(t, resetDir)
	applierDS := one(t, "DaemonSet", base.daemonSets, applierName)
	ac := container(t, "applier DaemonSet", &applierDS.Spec.Template.Spec)
	applierOpts, err := applierapp.ParseOptions(ac.Args, lookupEnv(ac))
	if err != nil {
		t.Fatal(err)
	}

	ns := one(t, "Namespace", reset.namespaces, resetNamespace)
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace %s: pod-security enforce %q, want privileged (host paths, privileged container)", ns.Name, ns.Labels["pod-security.kubernetes.io/enforce"])
	}
	for _, obj := range reset.namespaced {
		if m := obj.(metav1.Object); m.GetNamespace() != resetNamespace {
			t.Errorf("%s %s is in namespace %q, want %q", obj.GetObjectKind().GroupVersionKind().Kind, m.GetName(), m.GetNamespace(), resetNamespace)
		}
	}
	if n := len(reset.namespaces) + len(reset.namespaced); n != 2 {
		t.Errorf("%d objects, want 2 (the namespace and the DaemonSet)", n)
	}
	ds := one(t, "DaemonSet", reset.daemonSets, resetName)
	spec := &ds.Spec.Template.Spec
	if len(spec.InitContainers) != 0 {
		t.Errorf("%d init containers, want none", len(spec.InitContainers))
	}
	c := container(t, "reset DaemonSet", spec)
	opts, err := applierapp.ParseOptions(c.Args, lookupEnv(c))
	if err != nil {
		t.Fatalf("the reset would not start with the DaemonSet's args and env: %v", err)
	}
	if !opts.Reset.Run || !opts.Reset.Wait || opts.Reset.AllDevices {
		t.Errorf("args %q: want `reset --wait` on the data disk only", c.Args)
	}
	if c.Image != ac.Image {
		t.Errorf("image %q, want the applier's %q", c.Image, ac.Image)
	}
	if opts.DataSettings() != applierOpts.DataSettings() || opts.CgroupRoot != applierOpts.CgroupRoot || opts.CgroupVersion != applierOpts.CgroupVersion || opts.ProcRoot != applierOpts.ProcRoot {
		t.Errorf("reset settings %+v cgroup %s %v proc %s; the applier's %+v cgroup %s %v proc %s",
			opts.DataSettings(), opts.CgroupRoot, opts.CgroupVersion, opts.ProcRoot, applierOpts.DataSettings(), applierOpts.CgroupRoot, applierOpts.CgroupVersion, applierOpts.ProcRoot)
	}
	for _, p := range []struct{ what, reset, applier string }{
		{"--cgroup-root", opts.CgroupRoot, applierOpts.CgroupRoot},
		{"--proc-root", opts.ProcRoot, applierOpts.ProcRoot},
		{"--data-mount", opts.DataMount, applierOpts.DataMount},
	} {
		host, m := hostPathOf(t, spec, c, p.reset)
		want, am := hostPathOf(t, &applierDS.Spec.Template.Spec, ac, p.applier)
		if host != want || m.ReadOnly != am.ReadOnly || !reflect.DeepEqual(m.MountPropagation, am.MountPropagation) {
			t.Errorf("%s %s shows host %s (read-only %t, propagation %v); the applier's shows %s (read-only %t, propagation %v)",
				p.what, p.reset, host, m.ReadOnly, m.MountPropagation, want, am.ReadOnly, am.MountPropagation)
		}
	}
	if len(spec.Volumes) != 3 {
		t.Errorf("%d volumes, want 3 (cgroupfs, /proc, data mount): the reset needs no runtime socket", len(spec.Volumes))
	}
	for _, vm := range c.VolumeMounts {
		if !vm.ReadOnly && path.Clean(vm.MountPath) != path.Clean(opts.CgroupRoot) {
			t.Errorf("mount %s at %s is read-write", vm.Name, vm.MountPath)
		}
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("the reset mounts a ServiceAccount token; it never talks to the API")
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Error("the reset shares a host namespace")
	}
	if sc, asc := c.SecurityContext, ac.SecurityContext; sc == nil || !firstBool(sc.Privileged) || !firstBool(sc.ReadOnlyRootFilesystem) || firstInt(sc.RunAsUser) != firstInt(asc.RunAsUser) {
		t.Errorf("security context %+v: want privileged (the host's cgroup namespace), a read-only root, and the applier's user", sc)
	}
	p := c.ReadinessProbe
	if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" || containerPort(t, c, p.HTTPGet.Port) != addrPort(t, "--health-probe-bind-address", opts.HealthProbeAddress) {
		t.Errorf("readiness probe %+v: want /readyz on --health-probe-bind-address %s (ready once the node is clean)", p, opts.HealthProbeAddress)
	}
	tolerateAll := slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	})
	if !tolerateAll {
		t.Errorf("tolerations %v: want one with operator Exists and no key: every node the applier ran on", spec.Tolerations)
	}
}
