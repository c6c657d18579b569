package certmanager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Binary is the file name of cert-manager-local in the test-bins folder
// (.cache/bin/k8s-<version>, $KUBEBUILDER_ASSETS), made by `make test-bins`.
const Binary = "cert-manager-local"

// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
const stopGrace = 10 * time.Second

// Process is a running cert-manager-local.
type Process struct {
	PID    int
	Log    string // its stdout and stderr
	Health string // host:port of its /healthz and /readyz

	exited  chan struct{}
	waitErr error // cmd.Wait's, once exited is closed
}

// Start runs binDir/cert-manager-local against kubeconfig in its own process
// group, appending its output to logFile, with args added to its command
// line (e.g. "-v=4"), and waits until it is ready: its cert-manager
// controllers' and CA injector's caches are synced. ctx bounds only that wait;
// the process runs until Stop. The cert-manager CRDs must be installed
// (InstallCRDs) for it to become ready.
func Start(ctx context.Context, binDir, kubeconfig, logFile string, args ...string) (*Process, error) {
	bin := filepath.Join(binDir, Binary)
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("cert-manager binary: %w (make test-bins builds it)", err)
	}
	health, err := freeAddr()
	if err != nil {
		return nil, err
	}
	out, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening cert-manager's log: %w", err)
	}
	defer out.Close()
	cmd := exec.Command(bin, append([]string{
		"--kubeconfig=" + kubeconfig,
		"--health-probe-bind-address=" + health,
	}, args...)...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	p := &Process{PID: cmd.Process.Pid, Log: logFile, Health: health, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	if err := p.waitReady(ctx); err != nil {
		return nil, errors.Join(err, p.Stop())
	}
	return p, nil
}

// Stop sends SIGTERM to the process, then SIGKILL if it has not exited
// within 10 s, and waits for it. It returns an error unless the process
// exited by itself with status 0 (cert-manager-local does on SIGTERM).
// Calling it again returns the same result.
func (p *Process) Stop() error {
	select {
	case <-p.exited:
		return p.exitErr()
	default:
	}
	if err := syscall.Kill(p.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signalling cert-manager (pid %d): %w", p.PID, err)
	}
	select {
	case <-p.exited:
		return p.exitErr()
	case <-time.After(stopGrace):
	}
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing cert-manager (pid %d): %w", p.PID, err)
	}
	<-p.exited
	return fmt.Errorf("cert-manager (pid %d) did not stop within %s of SIGTERM and was killed; its log: %s", p.PID, stopGrace, p.Log)
}

func (p *Process) exitErr() error {
	if p.waitErr != nil {
		return fmt.Errorf("cert-manager (pid %d) exited: %w; its log:\n%s", p.PID, p.waitErr, tail(p.Log, 20))
	}
	return nil
}

// waitReady polls /readyz until it answers 200, the process exits or ctx ends.
func (p *Process) waitReady(ctx context.Context) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	last := "no answer yet"
	for {
		resp, err := hc.Get("http://" + p.Health + "/readyz?verbose")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		select {
		case <-p.exited:
			return fmt.Errorf("cert-manager (pid %d) exited before it was ready (its log: %s)", p.PID, p.Log)
		case <-ctx.Done():
			return fmt.Errorf("cert-manager (pid %d) not ready (/readyz: %s): %w; its log:\n%s", p.PID, last, ctx.Err(), tail(p.Log, 20))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// freeAddr returns a local TCP address nothing listens on right now.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// tail returns the last n lines of file, or why it cannot.
func tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
