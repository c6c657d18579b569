package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
)

// testReset: an uninstall on the node. With a node cap set and Throttle's
// pods limited, the applier is stopped as an ordinary SIGTERM stops it (a
// rolling update, `kubectl delete`): every limit stays. Then
// `kubediskguard-applier reset` (the binary, or manifests/reset's one-shot
// DaemonSet) clears the containers' limits and the node cap and says what
// it cleared; run again, it finds nothing. The applier started again
// limits the containers again.
func (e *env) testReset(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(4*time.Minute))
	defer cancel()
	t.Cleanup(func() { e.restoreApplier(t) })
	limited := e.pod(ctx, t, optedIn, "limited")
	if err := e.restartApplier(ctx, fmt.Sprintf("DATA_TOTAL_IOPS=%d", e.f.totalIOPS)); err != nil {
		t.Fatal(err)
	}
	e.waitNodeCap(ctx, t, uint64(e.f.totalIOPS))
	e.waitCgroup(ctx, t, limited, "db", e.f.dbRead, e.f.dbWrite)

	if err := e.g.StopApplier(ctx, false); err != nil {
		t.Fatalf("stopping the applier: %v", err)
	}
	// Stopped: nothing cleared on the way out.
	e.waitCgroupBy(ctx, t, time.Now(), limited, "db", e.f.dbRead, e.f.dbWrite)
	e.waitNodeCap(ctx, t, uint64(e.f.totalIOPS))
	t.Log("applier stopped (SIGTERM): the containers' limits and the node cap are still there")

	start := time.Now()
	out, err := e.g.ResetNode(ctx)
	if err != nil {
		t.Fatalf("reset: %v", err)
	}
	t.Logf("reset (%s):\n%s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	for _, c := range []string{"app", "db"} {
		e.waitCgroupBy(ctx, t, time.Now(), limited, c, 0, 0)
	}
	e.waitNodeCap(ctx, t, 0)
	if !strings.Contains(out, "cleared ") || !strings.Contains(out, "reset: cleared the limits on the data disk") {
		t.Errorf("reset did not say what it cleared:\n%s", out)
	}
	out, err = e.g.ResetNode(ctx)
	if err != nil {
		t.Fatalf("second reset: %v", err)
	}
	if !strings.Contains(out, "nothing to clear") {
		t.Errorf("second reset:\n%s\nwant it to find nothing to clear", out)
	}

	if err := e.g.StartApplier(ctx); err != nil {
		t.Fatalf("starting the applier again: %v", err)
	}
	e.waitCgroup(ctx, t, limited, "db", e.f.dbRead, e.f.dbWrite)
	e.waitNodeCap(ctx, t, 0)
}

// ResetNode runs the built binary's reset with the applier's settings.
func (b *binaries) ResetNode(ctx context.Context) (string, error) {
	return kdg.ResetNode(ctx, b.c, filepath.Join(b.bin, "kubediskguard-applier"), applierSettings)
}

// What manifests/reset deploys.
const (
	resetNS   = "kubediskguard-reset"
	resetName = "kubediskguard-reset" // DaemonSet
)

// ResetNode applies manifests/reset through an overlay that points it at
// this node's data directory, as the uninstall in README.md does, waits
// until its pod is ready (the node is clean), returns its log, and deletes
// it again.
func (d *deployed) ResetNode(ctx context.Context) (string, error) {
	dir := filepath.Join(d.e.dir, "reset-overlay")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	base, err := filepath.Abs(filepath.Join(repoRoot, "manifests", "reset"))
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(dir, base)
	if err != nil {
		return "", err
	}
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %s
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: %s
        namespace: %s
      spec:
        template:
          spec:
            volumes:
              - name: data
                hostPath:
                  path: %s
`, rel, resetName, resetNS, d.e.data())
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		return "", err
	}
	if _, err := d.e.c.Kubectl(ctx, "apply", "-k", dir); err != nil {
		return "", err
	}
	defer func() {
		// kubectl delete waits until the namespace and its pods are gone.
		if _, err := d.e.c.Kubectl(ctx, "delete", "-k", dir, "--timeout=2m"); err != nil {
			fmt.Fprintf(os.Stderr, "deleting the reset DaemonSet: %v\n", err)
		}
	}()
	if err := cluster.Poll(ctx, "reset DaemonSet ready", 200*time.Millisecond, 2*time.Minute, func() error {
		ds := &appsv1.DaemonSet{}
		if err := d.cl.Get(ctx, client.ObjectKey{Namespace: resetNS, Name: resetName}, ds); err != nil {
			return err
		}
		if s := ds.Status; s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != 1 || s.NumberReady != 1 {
			return fmt.Errorf("status %+v", s)
		}
		return nil
	}); err != nil {
		out, _ := d.e.c.Kubectl(ctx, "-n", resetNS, "logs", "daemonset/"+resetName, "--tail=30")
		return string(out), err
	}
	out, err := d.e.c.Kubectl(ctx, "-n", resetNS, "logs", "daemonset/"+resetName, "--tail=-1")
	return string(out), err
}
