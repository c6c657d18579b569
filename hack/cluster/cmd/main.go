// Command cluster starts and stops the local single-node Kubernetes of
// package hack/cluster.
//
//	go run ./hack/cluster/cmd up      # start, run a smoke pod, wait for Ctrl-C, tear down
//	go run ./hack/cluster/cmd up -detach   # start and return; stop later with down
//	go run ./hack/cluster/cmd down    # tear down from DIR/state.json (also after a crash)
//
// KUBEBUILDER_ASSETS names the pinned Kubernetes binaries (make test-bins).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cluster up [-node host|v2] [-dir D] [-detach] [-smoke=false] [-pod-network] [-full] | down [-dir D] | v2-image")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "/tmp/kdg-cluster", "state dir")
	detach := fs.Bool("detach", false, "up: return once the node is Ready, leaving the cluster running")
	smoke := fs.Bool("smoke", true, "up: run a pod and kubectl exec in it once the node is Ready")
	podNet := fs.Bool("pod-network", false, "up: a bridge CNI network, so pods need not be hostNetwork")
	full := fs.Bool("full", false, "up: also kube-controller-manager, kube-scheduler, kube-proxy and ServiceAccount tokens (implies -pod-network)")
	node := fs.String("node", "host", "up: the node kind: host (this machine: cgroup v1, cgroupfs, containerd 1.6) or v2 (a qemu VM: cgroup v2, systemd, containerd 2.x)")
	fs.Parse(os.Args[2:])

	switch os.Args[1] {
	case "v2-image":
		// The v2 node's image and snapshot, built when absent (make v2node).
		ctx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stopSignals()
		if err := cluster.PrepareV2Node(ctx, cluster.Config{Node: cluster.V2Node}); err != nil {
			fmt.Fprintln(os.Stderr, "v2-image:", err)
			os.Exit(1)
		}
	case "down":
		if err := cluster.Down(*dir, os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, "down:", err)
			os.Exit(1)
		}
	case "up":
		ctx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stopSignals()
		kind, err := cluster.ParseNodeKind(*node)
		if err != nil {
			fmt.Fprintln(os.Stderr, "up:", err)
			os.Exit(2)
		}
		c, err := cluster.Up(ctx, cluster.Config{Node: kind, Dir: *dir, PodNetwork: *podNet, Full: *full})
		if err != nil {
			fmt.Fprintln(os.Stderr, "up:", err)
			os.Exit(1)
		}
		if *smoke {
			r, err := c.Smoke(ctx)
			if err != nil {
				fmt.Fprintln(os.Stderr, "smoke:", err)
				cluster.Down(*dir, os.Stderr)
				os.Exit(1)
			}
			fmt.Fprintf(os.Stderr, "cluster: smoke pod Running in %s, exec in %s, cgroup %s\n", r.PodRunning, r.Exec, r.Cgroup)
		}
		// KUBECONFIG usable from this host; the rest as the applier on
		// the node gets it.
		fmt.Printf("export KUBECONFIG=%s\n", c.Kubeconfig)
		for _, kv := range c.Env() {
			if !strings.HasPrefix(kv, "KUBECONFIG=") {
				fmt.Printf("export %s\n", kv)
			}
		}
		if *detach {
			fmt.Fprintf(os.Stderr, "cluster: left running; stop it with: go run ./hack/cluster/cmd down -dir %s\n", *dir)
			return
		}
		fmt.Fprintln(os.Stderr, "cluster: running; Ctrl-C tears it down")
		<-ctx.Done()
		stopSignals()
		if err := cluster.Down(*dir, os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, "down:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
