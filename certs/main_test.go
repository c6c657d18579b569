package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	"sigs.k8s.io/yaml"
)

const manifest = "../manifests/webhook/mutatingwebhookconfiguration.yaml"

// verify checks that dir holds a key pair for host that chains to the CA in
// dir's ca.crt, and returns that CA's PEM.
func verify(t *testing.T, dir string, hosts ...string) []byte {
	t.Helper()
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
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.crt holds no certificate")
	}
	for _, h := range hosts {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: h, Roots: roots}); err != nil {
			t.Errorf("serving certificate does not verify for %s: %v", h, err)
		}
	}
	return caPEM
}

func TestPrintsTheCABundleOfACertificateForTheService(t *testing.T) {
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	err := run([]string{"--out", dir, "--namespace", "ns1", "--service", "svc1", "--hosts", "localhost, 127.0.0.1"}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, stderr.String())
	}
	caPEM := verify(t, dir, "svc1.ns1.svc", "svc1.ns1.svc.cluster.local", "localhost", "127.0.0.1")
	got, err := base64.StdEncoding.DecodeString(strings.TrimSpace(stdout.String()))
	if err != nil {
		t.Fatalf("stdout is not base64: %q: %v", stdout.String(), err)
	}
	if !bytes.Equal(got, caPEM) {
		t.Errorf("printed caBundle is not ca.crt:\n%s\nwant\n%s", got, caPEM)
	}
	if _, err := os.Stat(filepath.Join(dir, PatchedName)); err == nil {
		t.Errorf("%s written without --patch-manifest", PatchedName)
	}
}

func TestPatchManifestSetsTheCABundleAndKeepsTheRest(t *testing.T) {
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	if err := run([]string{"--out", dir, "--patch-manifest", manifest}, &stdout, &stderr); err != nil {
		t.Fatalf("run: %v\n%s", err, stderr.String())
	}
	caPEM := verify(t, dir, ServiceHosts("kubediskguard-webhook", "kubediskguard-system")...)
	if stdout.Len() != 0 {
		t.Errorf("stdout with --patch-manifest: %q, want nothing", stdout.String())
	}

	read := func(path string) admissionregistrationv1.MutatingWebhookConfiguration {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var cfg admissionregistrationv1.MutatingWebhookConfiguration
		if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return cfg
	}
	orig, patched := read(manifest), read(filepath.Join(dir, PatchedName))
	if _, ok := patched.Annotations[injectAnnotation]; ok {
		t.Errorf("patched configuration still asks cert-manager to inject the CA")
	}
	if len(patched.Webhooks) != len(orig.Webhooks) {
		t.Fatalf("patched configuration has %d webhooks, want %d", len(patched.Webhooks), len(orig.Webhooks))
	}
	for i, w := range patched.Webhooks {
		if !bytes.Equal(w.ClientConfig.CABundle, caPEM) {
			t.Errorf("webhook %s: caBundle is not ca.crt", w.Name)
		}
		// Everything but the caBundle is the original's.
		w.ClientConfig.CABundle = nil
		a, _ := yaml.Marshal(w)
		b, _ := yaml.Marshal(orig.Webhooks[i])
		if !bytes.Equal(a, b) {
			t.Errorf("webhook %s changed beyond caBundle:\n%s\nwant\n%s", w.Name, a, b)
		}
	}
	if patched.Name != orig.Name {
		t.Errorf("name %q, want %q", patched.Name, orig.Name)
	}
}

func TestBadInvocationsFailWithAMessageNamingTheProblem(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"an empty namespace":           {[]string{"--namespace", ""}, "--namespace"},
		"an empty service":             {[]string{"--service", " "}, "--service"},
		"a negative validity":          {[]string{"--valid-for", "-1h"}, "--valid-for"},
		"an unknown flag":              {[]string{"--nope"}, "nope"},
		"a stray argument":             {[]string{"extra"}, "extra"},
		"a manifest that is not there": {[]string{"--patch-manifest", "does-not-exist.yaml"}, "does-not-exist.yaml"},
	} {
		t.Run(name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(append([]string{"--out", t.TempDir()}, tc.args...), &stdout, &stderr)
			if err == nil {
				t.Fatal("no error")
			}
			if msg := err.Error() + stderr.String(); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q (stderr %q) does not name %q", err, stderr.String(), tc.want)
			}
		})
	}
}

func TestPatchManifestRejectsUnknownFields(t *testing.T) {
	src := filepath.Join(t.TempDir(), "bad.yaml")
	bad := "apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\nmetadata: {name: x}\nwebhooks:\n- name: a.b.c\n  clientConfg: {}\n"
	if err := os.WriteFile(src, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	err := patchManifest(src, filepath.Join(t.TempDir(), "out.yaml"), []byte("ca"))
	if err == nil || !strings.Contains(err.Error(), "clientConfg") {
		t.Fatalf("err = %v, want one naming the unknown field clientConfg", err)
	}
}
