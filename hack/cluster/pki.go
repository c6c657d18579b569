package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kubediskguard/kubediskguard/certs/pki"
)

const certValidity = 7 * 24 * time.Hour

// validity is how long the PKI's certificates are valid: certValidity, or
// pkiValidity when set (the v2 node's image keeps its PKI for months).
func (c *Cluster) validity() time.Duration {
	if c.pkiValidity > 0 {
		return c.pkiValidity
	}
	return certValidity
}

// writePKI makes the cluster's CA and the certificates signed by it, in
// DIR/pki (NAME.crt + NAME.key):
//
//	apiserver                 serving: 127.0.0.1, localhost, kubernetes.default.svc…
//	admin                     client: CN=kubernetes-admin, O=system:masters
//	kubelet                   client: CN=system:node:NODE, O=system:nodes
//	apiserver-kubelet-client  client: CN=kube-apiserver-kubelet-client, O=system:masters
//	kubelet-serving           serving: NODE, node IP (made in writeKubeletServing)
//	sa.key / sa.pub           the service-account token signing key pair
func (c *Cluster) writePKI(ctx context.Context) error {
	dir := c.path("pki")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := pki.NewCA("kubediskguard-local-cluster-ca", c.validity())
	if err != nil {
		return err
	}
	c.ca = ca
	keyDER, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return err
	}
	if err := writeFile(dir, "ca.crt", ca.PEM); err != nil {
		return err
	}
	if err := writeFile(dir, "ca.key", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})); err != nil {
		return err
	}
	serving, err := ca.Issue([]string{"kube-apiserver", "127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "10.96.0.1", PodGateway}, c.validity())
	if err != nil {
		return err
	}
	if err := writePair(dir, "apiserver", serving); err != nil {
		return err
	}
	for _, cl := range []struct {
		name, cn string
		orgs     []string
	}{
		{"admin", "kubernetes-admin", []string{"system:masters"}},
		{"kubelet", "system:node:" + c.NodeName, []string{"system:nodes"}},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}},
	} {
		s, err := ca.IssueClient(cl.cn, cl.orgs, c.validity())
		if err != nil {
			return err
		}
		if err := writePair(dir, cl.name, s); err != nil {
			return err
		}
	}
	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saDER, err := x509.MarshalECPrivateKey(sa)
	if err != nil {
		return err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	if err := writeFile(dir, "sa.key", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER})); err != nil {
		return err
	}
	return writeFile(dir, "sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))
}

// CA is the cluster CA (e.g. to sign the webhook's serving certificate
// the apiserver trusts).
func (c *Cluster) CA() *pki.CA { return c.ca }

func (c *Cluster) writeKubeletServing(nodeIP string) error {
	s, err := c.ca.Issue([]string{c.NodeName, nodeIP, "127.0.0.1", "localhost"}, c.validity())
	if err != nil {
		return err
	}
	return writePair(c.path("pki"), "kubelet-serving", s)
}

func writePair(dir, name string, s *pki.Serving) error {
	if err := writeFile(dir, name+".crt", s.CertPEM); err != nil {
		return err
	}
	return writeFile(dir, name+".key", s.KeyPEM)
}

func writeFile(dir, name string, data []byte) error {
	return os.WriteFile(filepath.Join(dir, name), data, 0o600)
}

// writeKubeconfig writes a kubeconfig for the client certificate pki/USER.crt.
func (c *Cluster) writeKubeconfig(path, user string) error {
	p := func(n string) string { return c.path("pki", n) }
	return os.WriteFile(path, []byte(kubeconfigText(c.APIServerURL(), p("ca.crt"), user, p(user+".crt"), p(user+".key"))), 0o600)
}

// kubeconfigText is a kubeconfig for server, trusting the CA file ca, as
// user with the client certificate crt and key.
func kubeconfigText(server, ca, user, crt, key string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kdg
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: kdg
  context: {cluster: kdg, user: %s}
current-context: kdg
`, server, ca, user, crt, key, user)
}
