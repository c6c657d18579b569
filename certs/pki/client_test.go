package pki

import (
	"crypto/tls"
	"crypto/x509"
	"slices"
	"testing"
	"time"
)

func TestIssueClientCarriesUserAndGroupsAndVerifiesForClientAuth(t *testing.T) {
	ca, err := NewCA("test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.IssueClient("system:node:kdg-node", []string{"system:nodes"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tls.X509KeyPair(c.CertPEM, c.KeyPEM); err != nil {
		t.Fatalf("cert and key do not match: %v", err)
	}
	if c.Cert.Subject.CommonName != "system:node:kdg-node" || !slices.Equal(c.Cert.Subject.Organization, []string{"system:nodes"}) {
		t.Errorf("subject %v", c.Cert.Subject)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if _, err := c.Cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("does not verify as a client certificate: %v", err)
	}
	if _, err := c.Cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Errorf("a client certificate must not verify for server auth")
	}
}
