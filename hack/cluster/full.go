package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What Config.PodNetwork and Config.Full add to the cluster: the pod bridge,
// kube-controller-manager, kube-scheduler and kube-proxy.

// startPodNetwork makes the pod bridge with the gateway address before
// anything starts (the apiserver of a Full cluster listens on it). It is
// recorded first, so teardown deletes it (and its route) even if this fails
// half-way.
func (c *Cluster) startPodNetwork(context.Context) error {
	if err := exec.Command("ip", "link", "show", PodBridge).Run(); err == nil {
		return fmt.Errorf("interface %s exists already: another cluster runs, or one was not torn down (go run ./hack/cluster/cmd down)", PodBridge)
	}
	c.State.PodBridge = PodBridge
	if err := c.save(); err != nil {
		return err
	}
	_, cidr, err := net.ParseCIDR(PodCIDR)
	if err != nil {
		return err
	}
	ones, _ := cidr.Mask.Size()
	for _, args := range [][]string{
		{"link", "add", PodBridge, "type", "bridge"},
		{"addr", "add", PodGateway + "/" + strconv.Itoa(ones), "dev", PodBridge},
		{"link", "set", PodBridge, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// startControllerManager runs the controllers a Deployment, a DaemonSet and
// a pod's ServiceAccount token need, with the admin credentials (one
// identity is enough on a test node), no leader election and no serving.
// Ready when the `default` ServiceAccount and the kube-root-ca.crt
// ConfigMap exist in the default namespace: a pod's projected token
// volume needs both.
func (c *Cluster) startControllerManager(ctx context.Context) error {
	p := func(n string) string { return c.path("pki", n) }
	proc, err := c.start("kube-controller-manager", filepath.Join(c.BinDir, "kube-controller-manager"),
		"--kubeconfig="+c.Kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--use-service-account-credentials=false",
		"--service-account-private-key-file="+p("sa.key"),
		"--root-ca-file="+p("ca.crt"),
		"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
		"--controllers=*",
		"--profiling=false", "--v=1")
	if err != nil {
		return err
	}
	return c.wait(ctx, "kube-controller-manager (waiting for the default ServiceAccount)", proc, 60*time.Second, func() error {
		return c.defaultServiceAccountReady(ctx)
	})
}

// defaultServiceAccountReady says whether the `default` ServiceAccount and
// the kube-root-ca.crt ConfigMap exist in the default namespace: a pod's
// projected token volume needs both (a Full cluster's controller-manager
// makes them).
func (c *Cluster) defaultServiceAccountReady(ctx context.Context) error {
	if _, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		return err
	}
	_, err := c.Client.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
	return err
}

// startScheduler runs kube-scheduler without leader election or serving.
// Nothing shows it ready before the node exists; the first pod without a
// nodeName proves it.
func (c *Cluster) startScheduler(ctx context.Context) error {
	proc, err := c.start("kube-scheduler", filepath.Join(c.BinDir, "kube-scheduler"),
		"--kubeconfig="+c.Kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false", "--v=1")
	if err != nil {
		return err
	}
	// Give it a moment to fail on a bad flag or kubeconfig.
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(300 * time.Millisecond):
	}
	if !proc.Alive() {
		return fmt.Errorf("kube-scheduler exited at start (see %s)", c.path("logs"))
	}
	return nil
}

// kubeProxyConfig is kube-proxy's configuration on both node kinds:
// iptables mode, health and metrics on 127.0.0.1 only, and no conntrack
// sysctls touched (the host's are left as they are).
func kubeProxyConfig(kubeconfig, nodeName, clusterCIDR string, healthzPort, metricsPort int) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %q
hostnameOverride: %q
mode: iptables
clusterCIDR: %q
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
`, kubeconfig, nodeName, clusterCIDR, healthzPort, metricsPort)
}

// startKubeProxy runs kube-proxy in iptables mode. Its host changes are
// kept to what Services need: no conntrack sysctls (maxPerCore 0, timeouts
// 0), no localhost NodePorts (which set route_localnet). Its KUBE-* chains
// are removed at teardown (restoreIptables), the sysctls restored.
// Ready when /healthz says the rules are synced.
func (c *Cluster) startKubeProxy(ctx context.Context) error {
	config := kubeProxyConfig(c.Kubeconfig, c.NodeName, PodCIDR, c.KubeProxyHealthzPort, c.KubeProxyMetricsPort)
	if err := os.WriteFile(c.path("kube-proxy.yaml"), []byte(config), 0o644); err != nil {
		return err
	}
	proc, err := c.start("kube-proxy", filepath.Join(c.BinDir, "kube-proxy"), "--config="+c.path("kube-proxy.yaml"), "--v=1")
	if err != nil {
		return err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", c.KubeProxyHealthzPort)
	return c.wait(ctx, "kube-proxy", proc, 60*time.Second, func() error {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return errors.New(url + ": " + resp.Status)
		}
		return nil
	})
}
