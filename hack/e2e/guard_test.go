package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
)

// guard is KubeDiskGuard as a test runs it, so that the same checks run on
// the built binaries (TestE2E) and on the images deployed from manifests/
// (TestDeployment).
type guard interface {
	// StopWebhook makes the webhook unreachable; StartWebhook brings it
	// back and returns when it serves.
	StopWebhook(ctx context.Context) error
	StartWebhook(ctx context.Context) error
	// StopApplier stops the applier (crash: abruptly, SIGKILL) and keeps it
	// stopped. StartApplier starts it with settings (KEY=VALUE) on top of
	// how it was set up and returns when it is ready (its first full
	// reconcile has run).
	StopApplier(ctx context.Context, crash bool) error
	StartApplier(ctx context.Context, settings ...string) error
	// ApplierAsSetUp: the applier runs, with no extra settings.
	ApplierAsSetUp() bool
	// ApplierLog is the running applier's log so far.
	ApplierLog(ctx context.Context) (string, error)
	// ResetNode runs `kubediskguard-applier reset` on the node as an
	// uninstall does (reset_test.go) and returns what it printed.
	ResetNode(ctx context.Context) (string, error)
	// Close stops what the guard started (logging what it has if t failed).
	Close(t *testing.T)
}

// binaries runs bin/kubediskguard-{webhook,applier} on the host, as the
// DaemonSet and Deployment would configure them (hack/kdg, like make demo).
type binaries struct {
	c              *cluster.Cluster
	dir, bin, data string
	webhook        *kdg.Webhook
	applier        *kdg.Proc // nil while stopped
	settings       []string  // the running applier's, on top of applierSettings
	starts         int       // numbers the applier's log files
}

// applierSettings is how the applier binary runs unless a test says
// otherwise (DATA_TOTAL_IOPS at its default, 0: no node cap).
const applierSettings = "CHECK_INTERVAL=5"

func (b *binaries) StopWebhook(context.Context) error {
	b.webhook.Kill()
	return nil
}

func (b *binaries) StartWebhook(ctx context.Context) error {
	if b.webhook.Alive() {
		return nil
	}
	return b.webhook.Restart(ctx)
}

func (b *binaries) StartApplier(ctx context.Context, settings ...string) error {
	b.starts++
	p, err := kdg.StartApplier(ctx, b.c, filepath.Join(b.bin, "kubediskguard-applier"), b.data,
		b.applierLog(b.starts), append([]string{applierSettings}, settings...)...)
	if err != nil {
		return err
	}
	b.applier, b.settings = p, settings
	return nil
}

func (b *binaries) StopApplier(_ context.Context, crash bool) error {
	if b.applier == nil {
		return nil
	}
	if crash {
		b.applier.Kill()
	} else {
		b.applier.Stop()
	}
	b.applier = nil
	return nil
}

func (b *binaries) ApplierAsSetUp() bool {
	return b.applier != nil && b.applier.Alive() && len(b.settings) == 0
}

func (b *binaries) ApplierLog(context.Context) (string, error) {
	if b.starts == 0 {
		return "", fmt.Errorf("the applier never started")
	}
	log, err := os.ReadFile(b.applierLog(b.starts))
	return string(log), err
}

// applierLog is the log file of the applier's nth start.
func (b *binaries) applierLog(n int) string {
	return filepath.Join(b.dir, "logs", fmt.Sprintf("applier-%d.log", n))
}

func (b *binaries) Close(t *testing.T) {
	if t.Failed() {
		logs := []string{filepath.Join(b.dir, "logs", "webhook.log")}
		if b.starts > 0 {
			logs = append(logs, b.applierLog(b.starts))
		}
		for _, f := range logs {
			t.Logf("%s:\n%s", filepath.Base(f), kdg.Tail(f, 30))
		}
	}
	if b.applier != nil {
		b.applier.Stop()
	}
	if b.webhook != nil {
		b.webhook.Stop()
	}
}
