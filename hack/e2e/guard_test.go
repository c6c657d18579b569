package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

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
	Close(t testing.TB)
}

// binaries runs bin/kubediskguard-{webhook,applier} on the cluster's node
// (cluster.Node.Start), as the DaemonSet and Deployment would configure
// them (hack/kdg, like make demo).
type binaries struct {
	c        *cluster.Cluster
	bin      string // the host's bin/ with the built binaries
	webhook  *kdg.Webhook
	applier  *kdg.NodeProc // nil while stopped
	settings []string      // the running applier's, on top of applierSettings
	starts   int           // numbers the applier's processes (and logs)
}

// checkInterval is the applier's CHECK_INTERVAL in the checks (binaries
// and deployment): an hour, far longer than the whole run, so that its
// periodic full pass never runs and cannot do what a check credits to the
// event path (a container's start, a live annotate, a namespace's policy),
// the full pass at start (a restarted applier) or a reconnect.
const checkInterval = "3600"

// applierSettings is how the applier binary runs unless a test says
// otherwise (DATA_TOTAL_IOPS at its default, 0: no node cap).
const applierSettings = "CHECK_INTERVAL=" + checkInterval

func (b *binaries) StopWebhook(ctx context.Context) error {
	b.webhook.Kill(ctx)
	return nil
}

func (b *binaries) StartWebhook(ctx context.Context) error {
	if b.webhook.Running(ctx) {
		return nil
	}
	return b.webhook.Restart(ctx)
}

func (b *binaries) StartApplier(ctx context.Context, settings ...string) error {
	b.starts++
	p, err := kdg.StartApplier(ctx, b.c, filepath.Join(b.bin, "kubediskguard-applier"), b.applierName(b.starts),
		append([]string{applierSettings}, settings...)...)
	if err != nil {
		return err
	}
	b.applier, b.settings = p, settings
	return nil
}

func (b *binaries) StopApplier(ctx context.Context, crash bool) error {
	if b.applier == nil {
		return nil
	}
	if crash {
		b.applier.Kill(ctx)
	} else {
		b.applier.Stop(ctx)
	}
	b.applier = nil
	return nil
}

func (b *binaries) ApplierAsSetUp() bool {
	return b.applier != nil && b.applier.Running(context.Background()) && len(b.settings) == 0
}

func (b *binaries) ApplierLog(ctx context.Context) (string, error) {
	if b.starts == 0 {
		return "", fmt.Errorf("the applier never started")
	}
	log, err := b.c.Node.ReadFile(ctx, cluster.LogPath(b.c.Node, b.applierName(b.starts)))
	return string(log), err
}

// applierName names the applier's nth process on the node, and its log.
func (b *binaries) applierName(n int) string { return fmt.Sprintf("applier-%d", n) }

func (b *binaries) Close(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if t.Failed() {
		names := []string{kdg.WebhookName}
		if b.starts > 0 {
			names = append(names, b.applierName(b.starts))
		}
		for _, n := range names {
			log, err := b.c.Node.ReadFile(ctx, cluster.LogPath(b.c.Node, n))
			if err != nil {
				t.Logf("%s's log: %v", n, err)
				continue
			}
			t.Logf("%s's log:\n%s", n, tail(string(log), 30))
		}
	}
	if b.applier != nil {
		b.applier.Stop(ctx)
	}
	if b.webhook != nil && b.webhook.NodeProc != nil {
		b.webhook.Stop(ctx)
	}
}
