package certmanager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
)

// Binary is the file name of cert-manager-local in the test-bins folder
// (.cache/bin/k8s-<version>, $KUBEBUILDER_ASSETS), made by `make test-bins`.
const Binary = "cert-manager-local"

// Process is a running cert-manager-local.
type Process struct {
	*kdg.Proc
	Health string // host:port of its /healthz and /readyz
}

// Start runs binDir/cert-manager-local against kubeconfig in its own process
// group, its output in logFile, with args added to its command line (e.g.
// "-v=4"), and waits until it is ready: its cert-manager controllers' and CA
// injector's caches are synced. ctx bounds only that wait; the process runs
// until Stop. The cert-manager CRDs must be installed (InstallCRDs) for it
// to become ready.
func Start(ctx context.Context, binDir, kubeconfig, logFile string, args ...string) (*Process, error) {
	bin := filepath.Join(binDir, Binary)
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("cert-manager binary: %w (make test-bins builds it)", err)
	}
	ports, err := cluster.FreeLocalPorts(1)
	if err != nil {
		return nil, err
	}
	health := fmt.Sprintf("127.0.0.1:%d", ports[0])
	p, err := kdg.Start(bin, logFile, nil, append([]string{
		"--kubeconfig=" + kubeconfig,
		"--health-probe-bind-address=" + health,
	}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	if err := p.WaitReady(ctx, health); err != nil {
		p.Stop()
		return nil, err
	}
	return &Process{Proc: p, Health: health}, nil
}

// Stop sends SIGTERM, then SIGKILL after 10 s, and waits for the process.
// It returns an error unless the process exited by itself with status 0
// (cert-manager-local does on SIGTERM).
func (p *Process) Stop() error {
	p.Proc.Stop()
	if err := p.ExitErr(); err != nil {
		return fmt.Errorf("cert-manager did not stop cleanly on SIGTERM: %w; its log: %s", err, p.Log)
	}
	return nil
}
