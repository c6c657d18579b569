package app_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/certs/pki"
	"github.com/kubediskguard/kubediskguard/webhook/app"
)

// instance is a webhook run by a test; exited is closed when Run returns err.
type instance struct {
	port   string
	exited chan struct{}
	err    error
}

// runInstance starts a second webhook against the shared API server with its
// own certificate directory and port.
func runInstance(t *testing.T, p *plane, certDir string) *instance {
	t.Helper()
	addr, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := strings.Cut(addr, ":")
	o, err := app.ParseOptions([]string{"--cert-dir=" + certDir, "--port=" + port,
		"--metrics-bind-address=0", "--health-probe-bind-address=0"}, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{port: port, exited: make(chan struct{})}
	go func() { in.err = app.Run(ctx, o, p.cfg); close(in.exited) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-in.exited:
		case <-time.After(30 * time.Second):
			t.Error("webhook did not stop within 30s")
		}
	})
	return in
}

func servedSerial(port string) (string, error) {
	conn, err := tls.Dial("tcp", "127.0.0.1:"+port, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // we read the certificate, not trust it
	if err != nil {
		return "", err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.String(), nil
}

func TestAMissingCertificateStopsTheWebhookAtStartNamingIt(t *testing.T) {
	p := controlPlane(t)
	dir := t.TempDir()
	in := runInstance(t, p, dir)
	select {
	case <-in.exited:
		if in.err == nil || !strings.Contains(in.err.Error(), dir) {
			t.Fatalf("Run = %v, want an error naming %s", in.err, dir)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the webhook kept running without a certificate")
	}
}

func TestARotatedCertificateIsServedWithoutRestart(t *testing.T) {
	p := controlPlane(t)
	dir := t.TempDir()
	issue := func() string {
		s, _, err := pki.WriteNew(dir, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return s.Cert.SerialNumber.String()
	}
	first := issue()
	in := runInstance(t, p, dir)
	waitServed(t, in, first)

	second := issue() // a kubelet-style ..data swap, as when cert-manager renews the Secret
	if second == first {
		t.Fatal("the new certificate has the old serial")
	}
	waitServed(t, in, second)
}

func waitServed(t *testing.T, in *instance, serial string) {
	t.Helper()
	var got string
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		select {
		case <-in.exited:
			t.Fatalf("the webhook exited: %v", in.err)
		default:
		}
		if got, err = servedSerial(in.port); err == nil && got == serial {
			return
		}
	}
	t.Fatalf("served certificate serial %s (%v), want %s within 30s", got, err, serial)
}
