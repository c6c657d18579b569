// Command up is `make up` and `make down`: a local single-node Kubernetes
// (hack/cluster, with scheduler, controller-manager and kube-proxy) with
// KubeDiskGuard installed, left running for a person to try by hand, the
// way kind or minikube give a cluster to play in. The webhook is registered
// and the applier runs on the node, both the built binaries (bin/), detached
// and recorded in the cluster's state file; the node's data disk is mounted
// at a directory pods mount as a hostPath.
//
//	go run ./hack/up up [-node host|v2] [-dir D] [-bin bin]   # make up [NODE=v2]
//	go run ./hack/up down [-dir D]                            # make down
//
// up prints two lines on stdout for a shell to eval (`eval "$(make up)"`):
// `export KUBECONFIG=…` (usable from this host) and `export KDG_DATA_DIR=…`
// (the data directory on the node's data disk), also written to DIR/env,
// and on stderr what to try. down stops everything and restores the host,
// from the state file alone (also after a crash of up).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "up" && os.Args[1] != "down") {
		fmt.Fprintln(os.Stderr, "usage: up up [-node host|v2] [-dir D] [-bin DIR] [-manifest F] | up down [-dir D]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "/var/tmp/kdg-up", "state dir: the cluster (with the host node's data disk image), the webhook configuration, env")
	node := fs.String("node", "host", "up: the node kind: host (this machine: cgroup v1, cgroupfs, containerd 1.6) or v2 (a qemu VM: cgroup v2, systemd, containerd 2.x)")
	binDir := fs.String("bin", "bin", "up: where kubediskguard-webhook and kubediskguard-applier are (make build)")
	manifest := fs.String("manifest", "manifests/webhook/mutatingwebhookconfiguration.yaml", "up: the webhook configuration to register")
	fs.Parse(os.Args[2:])
	abs, err := filepath.Abs(*dir)
	if err != nil {
		fail(err)
	}
	if os.Args[1] == "down" {
		if err := down(abs); err != nil {
			fail(err)
		}
		return
	}
	kind, err := cluster.ParseNodeKind(*node)
	if err != nil {
		fail(err)
	}
	bins, err := filepath.Abs(*binDir)
	if err != nil {
		fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := up(ctx, abs, kind, bins, *manifest); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "kdg-up: %v\n", err)
	os.Exit(1)
}

func clusterDir(dir string) string { return filepath.Join(dir, "cluster") }

// ownEntries are the names up writes in its state dir.
var ownEntries = map[string]bool{"cluster": true, "mutatingwebhookconfiguration.yaml": true, "env": true}

func up(ctx context.Context, dir string, kind cluster.NodeKind, binDir, manifest string) (err error) {
	start := time.Now()
	if _, err := os.Stat(filepath.Join(clusterDir(dir), "state.json")); err == nil {
		return fmt.Errorf("a cluster is up already (or was not torn down) in %s: make down first", dir)
	}
	for _, b := range []string{"kubediskguard-webhook", "kubediskguard-applier"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return fmt.Errorf("%s not built: run `make build` (%w)", b, err)
		}
	}
	if err := cluster.EmptyOwnedDir(dir, ownEntries, "make up"); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.Remove(dir) // only if nothing was left in it
		}
	}()
	c, err := cluster.Up(ctx, cluster.Config{Node: kind, Dir: clusterDir(dir), Full: true})
	if err != nil {
		return fmt.Errorf("starting the cluster: %w", err)
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "kdg-up: %v; tearing down\n", err)
			if derr := cluster.Down(c.Dir, os.Stderr); derr != nil {
				err = errors.Join(err, fmt.Errorf("teardown: %w", derr))
			}
		}
	}()
	w, err := kdg.StartWebhook(ctx, c, filepath.Join(binDir, "kubediskguard-webhook"))
	if err != nil {
		return fmt.Errorf("starting the webhook: %w", err)
	}
	if err := w.Register(ctx, manifest, filepath.Join(dir, "mutatingwebhookconfiguration.yaml")); err != nil {
		return fmt.Errorf("registering the webhook: %w", err)
	}
	a, err := kdg.StartApplier(ctx, c, filepath.Join(binDir, "kubediskguard-applier"), "kubediskguard-applier")
	if err != nil {
		return fmt.Errorf("starting the applier: %w", err)
	}
	if _, err := c.Node.Run(ctx, "chmod", "0777", c.Node.DataDir()); err != nil {
		return err
	}
	exports := fmt.Sprintf("export KUBECONFIG=%s\nexport KDG_DATA_DIR=%s\n", c.Kubeconfig, c.Node.DataDir())
	if err := os.WriteFile(filepath.Join(dir, "env"), []byte(exports), 0o644); err != nil {
		return err
	}
	guide(os.Stderr, c, w, a, dir, time.Since(start))
	fmt.Print(exports)
	return nil
}

// guide tells the person what runs and what to try.
func guide(out io.Writer, c *cluster.Cluster, w *kdg.Webhook, a *kdg.NodeProc, dir string, took time.Duration) {
	l := c.Node.Layout()
	file := l.LimitFile(limits.ReadIOPS)
	inContainer := "/sys/fs/cgroup/" + file // cgroup v2: the container's own cgroup namespace
	if l.Cgroup == cgroup.V1 {
		inContainer = "/sys/fs/cgroup/blkio/" + file // v1: runc mounts the container's blkio cgroup there
	}
	fmt.Fprintf(out, `
KubeDiskGuard is up (%s): a single-node Kubernetes, node %s (%s),
with a scheduler, so pods need no nodeName.
  webhook  registered; on the node, pid %d, log %s
  applier  on the node, pid %d, log %s, DATA_MOUNT=%s
  data disk %s mounted at %s (KDG_DATA_DIR)
The two export lines below are also in %s (source it in another shell).
kubectl: %s (or put %s on PATH).

Try it:

  kubectl create namespace team-a
  kubectl label namespace team-a kubediskguard.io/enabled=true
  kubectl annotate namespace team-a kubediskguard.io/iops=200

  kubectl apply -f - <<EOF
  apiVersion: v1
  kind: Pod
  metadata: {name: io, namespace: team-a}
  spec:
    terminationGracePeriodSeconds: 1
    containers:
    - name: app
      image: %s          # local busybox (no registry): imagePullPolicy Never
      imagePullPolicy: Never
      command: [sleep, inf]
      volumeMounts: [{name: data, mountPath: /data}]
    volumes: [{name: data, hostPath: {path: $KDG_DATA_DIR, type: Directory}}]
  EOF

  kubectl get pod -n team-a io -o jsonpath='{.metadata.annotations.kubediskguard\.io/limits}{"\n"}'
  kubectl exec -n team-a io -- cat %s    # the container's limits (data disk %s)
  # 600 direct 4 KiB writes, then reads: about 3 s each at 200 IOPS
  kubectl exec -n team-a io -- sh -c 'time dd if=/dev/zero of=/data/f bs=4k count=600 oflag=direct; time dd if=/data/f of=/dev/null bs=4k count=600 iflag=direct'
  kubectl annotate pod -n team-a io kubediskguard.io/read-iops=50   # live: the next reads take ~12 s
  kubectl describe pod -n team-a io                                 # the applier's IOLimitsApplied Events

  The same pod in a namespace without the label is not limited. For fio, mount
  the node's /usr, /lib and /lib64 read-only and run /usr/bin/fio (hack/e2e's
  fioPod does). On the node, the container's cgroup is under %s.

Stop everything and restore the host: make down

`, took.Round(time.Second), c.NodeName, l, w.Proc.PID, w.Log, a.Proc.PID, a.Log, c.Node.DataDir(),
		c.Node.DataDisk(), c.Node.DataDir(), filepath.Join(dir, "env"),
		filepath.Join(c.BinDir, "kubectl"), c.BinDir, cluster.BusyboxImage, inContainer, c.Node.DataDisk(), l.KubepodsCgroup())
}

// down tears down what up left (the cluster's state file records the
// binaries too) and removes the state dir, logs included.
func down(dir string) error {
	if err := cluster.Down(clusterDir(dir), os.Stderr); err != nil {
		return err
	}
	if m := cluster.MountsUnder(dir); len(m) > 0 {
		return fmt.Errorf("mounts left under %s, not removing it: %v", dir, m)
	}
	if err := cluster.EmptyOwnedDir(dir, ownEntries, "make up"); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "kdg-up: down; %s removed, host restored\n", dir)
	return nil
}
