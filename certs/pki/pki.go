// Package pki makes the small PKI the webhook needs where cert-manager is
// absent (local runs, tests): a CA and a serving certificate signed by it,
// written as tls.crt, tls.key and ca.crt in the layout of a kubernetes.io/tls
// Secret mounted into the webhook's --cert-dir.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority that can sign serving certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte
}

// NewCA makes a self-signed CA valid for the given duration.
func NewCA(commonName string, validFor time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(validFor),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("signing the CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Serving is a serving certificate and its key, PEM-encoded.
type Serving struct {
	Cert    *x509.Certificate
	CertPEM []byte
	KeyPEM  []byte
}

// Issue signs a serving certificate for the given DNS names and IP addresses.
func (ca *CA) Issue(hosts []string, validFor time.Duration) (*Serving, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the serving key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(validFor),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return ca.sign(tmpl, key, "serving")
}

// WriteDir writes tls.crt, tls.key and ca.crt into dir the way the kubelet
// updates a mounted Secret: the files live in a fresh hidden directory, the
// ..data link is swapped to it in one rename, and the visible names are links
// through ..data. A reader never sees a certificate with the wrong key.
func WriteDir(dir string, s *Serving, ca *CA) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	gen, err := os.MkdirTemp(dir, "..gen-")
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
	}{{"tls.key", s.KeyPEM}, {"tls.crt", s.CertPEM}, {"ca.crt", ca.PEM}}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(gen, f.name), f.data, 0o600); err != nil {
			return err
		}
	}
	data := filepath.Join(dir, "..data")
	old, _ := os.Readlink(data)
	tmpLink := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(filepath.Base(gen), tmpLink); err != nil {
		return err
	}
	if err := os.Rename(tmpLink, data); err != nil {
		return fmt.Errorf("swapping %s: %w", data, err)
	}
	for _, f := range files {
		link := filepath.Join(dir, f.name)
		if target, err := os.Readlink(link); err == nil && target == filepath.Join("..data", f.name) {
			continue
		}
		_ = os.Remove(link)
		if err := os.Symlink(filepath.Join("..data", f.name), link); err != nil {
			return err
		}
	}
	if old != "" && old != filepath.Base(gen) {
		_ = os.RemoveAll(filepath.Join(dir, old))
	}
	return nil
}

// WriteNew makes a fresh CA and a serving certificate for hosts, both valid
// for validFor, and writes them into dir with WriteDir.
func WriteNew(dir string, hosts []string, validFor time.Duration) (*Serving, *CA, error) {
	ca, err := NewCA("kubediskguard-ca", validFor)
	if err != nil {
		return nil, nil, err
	}
	s, err := ca.Issue(hosts, validFor)
	if err != nil {
		return nil, nil, err
	}
	if err := WriteDir(dir, s, ca); err != nil {
		return nil, nil, fmt.Errorf("writing certificates to %s: %w", dir, err)
	}
	return s, ca, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// IssueClient signs a client certificate (ExtKeyUsageClientAuth) with the
// given common name and organizations; Kubernetes reads them as the user name
// and the groups (e.g. O=system:masters, or CN=system:node:NAME with
// O=system:nodes).
func (ca *CA) IssueClient(commonName string, orgs []string, validFor time.Duration) (*Serving, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the client key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: commonName, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(validFor),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return ca.sign(tmpl, key, "client")
}

// sign signs tmpl for key with the CA and returns the pair PEM-encoded.
func (ca *CA) sign(tmpl *x509.Certificate, key *ecdsa.PrivateKey, what string) (*Serving, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("signing the %s certificate: %w", what, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Serving{
		Cert:    cert,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
	}, nil
}
