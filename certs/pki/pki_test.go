package pki

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestWriteNewWritesAPairThatVerifiesAgainstItsCA(t *testing.T) {
	dir := t.TempDir()
	s, ca, err := WriteNew(dir, []string{"kubediskguard-webhook.kubediskguard-system.svc", "127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		t.Fatalf("tls.crt and tls.key do not load as a pair: %v", err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	for _, host := range []string{"kubediskguard-webhook.kubediskguard-system.svc", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: host}); err != nil {
			t.Errorf("certificate does not verify for %s: %v", host, err)
		}
	}
	if leaf.SerialNumber.Cmp(s.Cert.SerialNumber) != 0 || !ca.Cert.IsCA {
		t.Fatal("returned certificates differ from the written ones")
	}
}

func TestWriteDirSwapsAtomicallyAndRemovesTheOldGeneration(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := WriteNew(dir, []string{"a"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	first, _ := os.Readlink(filepath.Join(dir, "..data"))
	s, _, err := WriteNew(dir, []string{"b"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	second, _ := os.Readlink(filepath.Join(dir, "..data"))
	if first == second || !strings.HasPrefix(second, "..gen-") {
		t.Fatalf("..data = %q then %q, want a new generation", first, second)
	}
	if _, err := os.Stat(filepath.Join(dir, first)); !os.IsNotExist(err) {
		t.Fatalf("old generation %s still there: %v", first, err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "tls.crt"))
	if err != nil || string(got) != string(s.CertPEM) {
		t.Fatalf("tls.crt does not hold the new certificate: %v", err)
	}
}
