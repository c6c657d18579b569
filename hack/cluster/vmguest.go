package cluster

import (
	"fmt"
	"path"
	"strings"
)

// The v2 node's guest configuration (written into the image by
// buildVMImage, part of its key): systemd units for the guest network,
// the agent, etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// kube-proxy, containerd 2.x, the image import and the kubelet, and the data disk's
// mount; the kubelet with cgroupDriver: systemd and its default
// failCgroupV1; containerd with SystemdCgroup = true. The reference this
// follows was measured on this machine kind (shared/v2node).

// vmUnits are enabled in multi-user.target.
var vmUnits = []string{"kdg-net.service", "kdg-agent.service", "etcd.service", "kube-apiserver.service",
	"kube-controller-manager.service", "kube-scheduler.service", "kube-proxy.service", "containerd.service", "kdg-images.service",
	"kubelet.service", "data.mount"}

const vmPKI = "/etc/kubernetes/pki"

func vmKubeconfigText(user string) string {
	return kubeconfigText(fmt.Sprintf("https://127.0.0.1:%d", vmAPIServerPort), path.Join(vmPKI, "ca.crt"), user,
		path.Join(vmPKI, user+".crt"), path.Join(vmPKI, user+".key"))
}

// vmGuestFiles are the files buildVMImage adds to the base root filesystem
// (path in the guest without the leading / → contents).
func vmGuestFiles(release string) map[string]guestFile {
	p := func(n string) string { return path.Join(vmPKI, n) }
	unit := func(desc, after, body string) guestFile {
		return guestFile{fmt.Sprintf("[Unit]\nDescription=%s\nAfter=%s\nWants=%s\n\n[Service]\n%s\n[Install]\nWantedBy=multi-user.target\n",
			desc, after, after, body), 0o644}
	}
	service := func(cmd ...string) string {
		return "Environment=GOGC=400\nExecStart=" + strings.Join(cmd, " \\\n  ") + "\nRestart=always\nRestartSec=1\n"
	}
	files := map[string]guestFile{
		"etc/modules-load.d/kdg.conf": {"virtio_net\noverlay\nbridge\nveth\nbr_netfilter\n", 0o644},
		"etc/sysctl.d/90-kdg.conf":    {"net.bridge.bridge-nf-call-iptables = 1\nnet.ipv4.ip_forward = 1\n", 0o644},
		// qemu's user-mode network: the guest's address, no default route
		// (restrict=on lets nothing out anyway); a route for the Service
		// range only, as a node without a default route needs: a packet
		// the node itself sends to a ClusterIP is routed before kube-proxy's
		// OUTPUT rules rewrite it to a pod (there is nothing behind eth0
		// for one that is not).
		"etc/systemd/system/kdg-net.service": {`[Unit]
Description=the guest's address on qemu's user-mode network (no route out)
DefaultDependencies=no
After=systemd-modules-load.service
Before=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'modprobe virtio_net; for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done; ip link set lo up; ip addr add ` + vmGuestIP + `/24 dev eth0; ip link set eth0 up; ip route add ` + vmServiceCIDR + ` dev eth0'

[Install]
WantedBy=multi-user.target
`, 0o644},
		// KillMode=process: programs the host started through it (Node.Start)
		// outlive a restart of the agent.
		"etc/systemd/system/kdg-agent.service": unit("KubeDiskGuard test harness command agent (port 2222, token)", "kdg-net.service",
			fmt.Sprintf("Environment=KDG_AGENT_ADDR=:%d\nExecStart=/usr/local/bin/kdg-agent\nKillMode=process\nRestart=always\nRestartSec=1\n", vmAgentPort)),
		"etc/systemd/system/etcd.service": unit("etcd", "kdg-net.service", service("/usr/local/bin/etcd", "--name=kdg", "--data-dir=/var/lib/etcd",
			"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
			"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
			"--initial-cluster=kdg=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level=warn")),
		"etc/systemd/system/kube-apiserver.service": unit("kube-apiserver", "etcd.service", service("/usr/local/bin/kube-apiserver",
			"--etcd-servers=http://127.0.0.1:2379", "--bind-address=0.0.0.0", "--advertise-address="+vmGuestIP,
			fmt.Sprintf("--secure-port=%d", vmAPIServerPort), "--cert-dir=/var/lib/kube-apiserver",
			"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"), "--client-ca-file="+p("ca.crt"),
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
			"--service-cluster-ip-range="+vmServiceCIDR, "--authorization-mode=Node,RBAC",
			"--enable-admission-plugins=NodeRestriction",
			"--allow-privileged=true", "--enable-priority-and-fairness=false",
			"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"), "--kubelet-client-key="+p("apiserver-kubelet-client.key"),
			"--kubelet-certificate-authority="+p("ca.crt"), "--kubelet-preferred-address-types=InternalIP",
			"--profiling=false", "--v=1")),
		"etc/systemd/system/kube-controller-manager.service": unit("kube-controller-manager", "kube-apiserver.service", service("/usr/local/bin/kube-controller-manager",
			"--kubeconfig="+vmKubeconfig, "--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=false",
			"--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
			"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
			"--controllers=*", "--profiling=false", "--v=1")),
		"etc/systemd/system/kube-scheduler.service": unit("kube-scheduler", "kube-apiserver.service", service("/usr/local/bin/kube-scheduler",
			"--kubeconfig="+vmKubeconfig, "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v=1")),
		// Services as Config.Full's host node has them (iptables mode): the
		// apiserver reaches a webhook through its ClusterIP, pods reach the
		// apiserver through the kubernetes Service.
		"etc/systemd/system/kube-proxy.service": unit("kube-proxy", "kube-apiserver.service", service("/usr/local/bin/kube-proxy",
			"--config=/etc/kubernetes/kube-proxy.yaml", "--v=1")),
		"etc/kubernetes/kube-proxy.yaml": {kubeProxyConfig(vmKubeconfig, vmNodeName, vmPodCIDR, vmKubeProxyHealthzPort, vmKubeProxyMetricsPort), 0o644},
		// As containerd's own unit: Delegate (runc makes the containers'
		// scopes through systemd), KillMode=process (shims outlive it).
		"etc/systemd/system/containerd.service": {`[Unit]
Description=containerd 2.x (built from the Go module proxy)
After=kdg-net.service local-fs.target

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/containerd --config /etc/containerd/config.toml --log-level warn
Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=1
LimitNPROC=infinity
LimitCORE=infinity
LimitNOFILE=1048576
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
`, 0o644},
		"etc/systemd/system/kdg-images.service": {`[Unit]
Description=import the local images (busybox, pause) into containerd's k8s.io namespace
After=containerd.service
Requires=containerd.service
Before=kubelet.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for i in /opt/kdg/images/*.tar; do ctr --address ` + vmContainerdSock + ` -n k8s.io images import $i || exit 1; done'

[Install]
WantedBy=multi-user.target
`, 0o644},
		"etc/systemd/system/kubelet.service": {`[Unit]
Description=kubelet
After=containerd.service kdg-images.service kube-apiserver.service data.mount
Wants=containerd.service kdg-images.service

[Service]
Environment=GOGC=400
ExecStart=/usr/local/bin/kubelet --config=/etc/kubernetes/kubelet.yaml --kubeconfig=/etc/kubernetes/kubelet.kubeconfig \
  --root-dir=/var/lib/kubelet --hostname-override=` + vmNodeName + ` --node-ip=` + vmGuestIP + ` --v=1
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
`, 0o644},
		"etc/systemd/system/data.mount": {`[Unit]
Description=the node's data disk

[Mount]
What=` + vmDataDevice + `
Where=` + vmDataDir + `
Type=ext4
Options=noatime

[Install]
WantedBy=multi-user.target
`, 0o644},
		"etc/kubernetes/kubelet.yaml": {fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %s
tlsPrivateKeyFile: %s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
cgroupDriver: systemd
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
makeIPTablesUtilChains: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
fileCheckFrequency: 10s
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
resolvConf: ""
`, p("kubelet-serving.crt"), p("kubelet-serving.key"), p("ca.crt"), vmContainerdSock, vmContainerdSock), 0o644},
		"etc/kubernetes/admin.kubeconfig":   {vmKubeconfigText("admin"), 0o600},
		"etc/kubernetes/kubelet.kubeconfig": {vmKubeconfigText("kubelet"), 0o600},
		"etc/containerd/config.toml": {`version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  # A folder of its own, which a DaemonSet can mount.
  address = "` + vmContainerdSock + `"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "` + PauseImage + `"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # Pod annotations KubeDiskGuard's applier reads from the OCI spec.
      pod_annotations = ["kubediskguard.io/*"]
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = true
        BinaryName = "/usr/sbin/runc"
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
`, 0o644},
		// A bridge that exists only inside the VM.
		"etc/cni/net.d/10-kdg.conflist": {`{"cniVersion": "0.4.0", "name": "kdg-bridge", "plugins": [{"type": "bridge", "bridge": "cni0",
  "isGateway": true, "ipMasq": false, "hairpinMode": false,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + vmPodCIDR + `"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
`, 0o644},
		"etc/kdg-release": {"kernel " + release + "\n", 0o644},
	}
	return files
}
