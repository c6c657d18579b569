package certmanager_test

// The project's cert-manager manifests against a real cert-manager: a
// kube-apiserver and etcd (envtest), cert-manager's CRDs from the module the
// product requires, and cert-manager-local (its controllers and CA injector)
// as a child process. Everything is applied from manifests/ as a user would,
// and every assertion is made through the API.

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	certutil "k8s.io/client-go/util/cert"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubediskguard/kubediskguard/hack/certmanager"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// Names from manifests/certmanager and manifests/webhook.
const (
	namespace     = "kubediskguard-system"
	caCertName    = "kubediskguard-ca"      // Certificate and its Secret
	servingName   = "kubediskguard-webhook" // Certificate named by inject-ca-from
	webhookConfig = "kubediskguard"
)

var manifests = filepath.Join("..", "..", "manifests")

func TestCertManagerIssuesTheWebhookCertificateInjectsItsCAAndRenewsIt(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: needs a kube-apiserver, etcd and cert-manager-local (run without -short)")
	}
	assets := realtest.KubeAssets(t, "kube-apiserver", "etcd", certmanager.Binary)
	realtest.Log()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stopping envtest: %v", err)
		}
	})
	dir := t.TempDir()
	kubeconfig := adminKubeconfig(t, env, dir)

	crdDir, err := certmanager.CRDDir()
	if err != nil {
		t.Fatal(err)
	}
	crds, err := certmanager.InstallCRDs(ctx, cfg, crdDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"certificates.cert-manager.io", "certificaterequests.cert-manager.io", "issuers.cert-manager.io", "clusterissuers.cert-manager.io"} {
		if !slices.Contains(crds, want) {
			t.Fatalf("installed CRDs %v from %s, want %s among them", crds, crdDir, want)
		}
	}

	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, cmapi.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}

	logFile := filepath.Join(dir, "cert-manager.log")
	start := time.Now()
	cm, err := certmanager.Start(ctx, assets, kubeconfig, logFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cert-manager-local ready in %s", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if err := cm.Stop(); err != nil {
			t.Errorf("stopping cert-manager: %v", err)
		}
		if t.Failed() || os.Getenv("KDG_TEST_VERBOSE") != "" {
			t.Logf("cert-manager's log (%s), last lines:\n%s", logFile, kdg.Tail(logFile, 60))
		}
	})

	for _, file := range []string{
		"namespace.yaml",
		filepath.Join("certmanager", "issuers.yaml"),
		filepath.Join("certmanager", "certificates.yaml"),
		filepath.Join("webhook", "mutatingwebhookconfiguration.yaml"),
	} {
		applyManifest(ctx, t, c, filepath.Join(manifests, file))
	}

	issued := time.Now()
	serving, err := certmanager.WaitIssued(ctx, c, namespace, servingName, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("serving certificate issued in %s", time.Since(issued).Round(time.Millisecond))
	ca := caCertificate(ctx, t, c)

	t.Run("the serving Secret holds a key pair for the Certificate's DNS names signed by the CA", func(t *testing.T) {
		leaf, secret := servingCertificate(ctx, t, c, serving)
		if got, want := slices.Sorted(slices.Values(leaf.DNSNames)), slices.Sorted(slices.Values(serving.Spec.DNSNames)); !slices.Equal(got, want) {
			t.Errorf("certificate DNS names %v, want the Certificate's %v", got, want)
		}
		verify(t, leaf, ca, serving.Spec.DNSNames)
		if _, err := tls.X509KeyPair(secret.Data[corev1.TLSCertKey], secret.Data[corev1.TLSPrivateKeyKey]); err != nil {
			t.Errorf("tls.crt and tls.key are not a key pair: %v", err)
		}
		if leaf.PublicKeyAlgorithm != x509.ECDSA {
			t.Errorf("key algorithm %s, want ECDSA as the Certificate asks", leaf.PublicKeyAlgorithm)
		}
		if got := certs(t, "ca.crt", secret.Data["ca.crt"]); len(got) != 1 || !got[0].Equal(ca) {
			t.Errorf("ca.crt of the serving Secret is not the CA's certificate")
		}
	})

	t.Run("the CA injector writes the CA into the webhook configuration's caBundle", func(t *testing.T) {
		waitCABundle(ctx, t, c, ca)
	})

	t.Run("a manual renewal issues a new serving certificate and bumps the revision, and the caBundle stays the CA", func(t *testing.T) {
		old, _ := servingCertificate(ctx, t, c, serving)
		oldRevision := *serving.Status.Revision
		if err := certmanager.Renew(ctx, c, namespace, servingName); err != nil {
			t.Fatal(err)
		}
		renewed := time.Now()
		crt, err := certmanager.WaitIssued(ctx, c, namespace, servingName, oldRevision+1)
		if err != nil {
			t.Fatal(err)
		}
		if got := *crt.Status.Revision; got != oldRevision+1 {
			t.Errorf("revision %d after one renewal from %d", got, oldRevision)
		}
		leaf, _ := servingCertificate(ctx, t, c, crt)
		t.Logf("renewed in %s: revision %d -> %d, serial %x -> %x", time.Since(renewed).Round(time.Millisecond), oldRevision, *crt.Status.Revision, old.SerialNumber, leaf.SerialNumber)
		if leaf.SerialNumber.Cmp(old.SerialNumber) == 0 {
			t.Fatalf("the serving Secret still holds the old certificate (serial %x)", old.SerialNumber)
		}
		if leaf.NotBefore.Before(old.NotBefore) {
			t.Errorf("new certificate's NotBefore %s is before the old one's %s", leaf.NotBefore, old.NotBefore)
		}
		verify(t, leaf, ca, crt.Spec.DNSNames)
		if key, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || key.Equal(old.PublicKey) {
			t.Errorf("the renewed certificate has the old key; the Certificate's rotationPolicy is Always")
		}
		waitCABundle(ctx, t, c, ca)
	})
}

// adminKubeconfig writes a system:masters kubeconfig for env into dir.
func adminKubeconfig(t *testing.T, env *envtest.Environment, dir string) string {
	t.Helper()
	user, err := env.AddUser(envtest.User{Name: "cert-manager", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "admin.kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// applyManifest creates every object of a YAML file as it is.
func applyManifest(ctx context.Context, t *testing.T, c client.Client, file string) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for {
		obj := &unstructured.Unstructured{}
		err := dec.Decode(&obj.Object)
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("decoding %s: %v", file, err)
		}
		if len(obj.Object) == 0 {
			continue
		}
		if err := c.Create(ctx, obj); err != nil {
			t.Fatalf("creating %s %s from %s: %v", obj.GetKind(), obj.GetName(), file, err)
		}
	}
}

// caCertificate returns the CA's certificate, from its Ready Certificate's Secret.
func caCertificate(ctx context.Context, t *testing.T, c client.Client) *x509.Certificate {
	t.Helper()
	crt, err := certmanager.WaitIssued(ctx, c, namespace, caCertName, 1)
	if err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: crt.Spec.SecretName}, secret); err != nil {
		t.Fatal(err)
	}
	got := certs(t, crt.Spec.SecretName+" tls.crt", secret.Data[corev1.TLSCertKey])
	if len(got) != 1 || !got[0].IsCA {
		t.Fatalf("Secret %s holds %d certificates, want one CA certificate", crt.Spec.SecretName, len(got))
	}
	return got[0]
}

// servingCertificate returns the leaf certificate in crt's Secret, and the Secret.
func servingCertificate(ctx context.Context, t *testing.T, c client.Client, crt *cmapi.Certificate) (*x509.Certificate, *corev1.Secret) {
	t.Helper()
	secret := &corev1.Secret{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: crt.Spec.SecretName}, secret); err != nil {
		t.Fatal(err)
	}
	got := certs(t, crt.Spec.SecretName+" tls.crt", secret.Data[corev1.TLSCertKey])
	if len(got) == 0 {
		t.Fatalf("Secret %s holds no certificate", crt.Spec.SecretName)
	}
	return got[0], secret
}

// verify checks that leaf chains to ca for server auth under each DNS name.
func verify(t *testing.T, leaf, ca *x509.Certificate, dnsNames []string) {
	t.Helper()
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		t.Errorf("serving certificate not signed by the CA: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, name := range dnsNames {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("serving certificate does not verify against the CA for %s: %v", name, err)
		}
	}
}

// waitCABundle waits until the webhook configuration's caBundle is exactly ca.
func waitCABundle(ctx context.Context, t *testing.T, c client.Client, ca *x509.Certificate) {
	t.Helper()
	poll(ctx, t, "the caBundle of MutatingWebhookConfiguration "+webhookConfig+" to be the CA", func() error {
		mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
		if err := c.Get(ctx, client.ObjectKey{Name: webhookConfig}, mwc); err != nil {
			return err
		}
		for _, wh := range mwc.Webhooks {
			got := certs(t, "caBundle", wh.ClientConfig.CABundle)
			if len(got) != 1 || !got[0].Equal(ca) {
				return fmt.Errorf("webhook %s: caBundle has %d certificates, not just the CA", wh.Name, len(got))
			}
		}
		return nil
	})
}

// certs parses the PEM certificates in b (none when b is empty).
func certs(t *testing.T, what string, b []byte) []*x509.Certificate {
	t.Helper()
	if len(b) == 0 {
		return nil
	}
	out, err := certutil.ParseCertsPEM(b)
	if err != nil {
		t.Fatalf("parsing %s: %v", what, err)
	}
	return out
}

// poll calls ok every 100 ms until it returns nil; it fails the test when
// ctx ends first.
func poll(ctx context.Context, t *testing.T, what string, ok func() error) {
	t.Helper()
	for {
		err := ok()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v (last: %v)", what, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
