package app

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/shared/command"
)

func TestParseOptions(t *testing.T) {
	tests := map[string]struct {
		args    []string
		env     map[string]string
		check   func(t *testing.T, o *Options)
		wantErr string
	}{
		"uses the SPEC's defaults": {
			env: map[string]string{"NODE_NAME": "n1"},
			check: func(t *testing.T, o *Options) {
				want := Options{Common: command.Common{MetricsBindAddress: ":8080", HealthProbeAddress: ":8081"}, NodeName: "n1", DataMount: "/data",
					DataTotalIOPS: 0, ContainerRuntime: "auto", CgroupVersion: cgroup.Auto, ContainerdNamespace: "k8s.io",
					CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", CheckInterval: 30 * time.Second}
				o.Log = want.Log
				if !reflect.DeepEqual(*o, want) {
					t.Errorf("options = %+v\nwant      %+v", *o, want)
				}
			},
		},
		"lets the seed-compatible environment variables set everything": {
			env: map[string]string{"NODE_NAME": "n1", "DATA_MOUNT": "/mnt/nvme", "DATA_DEVICES": "/dev/nvme0n1,259:3",
				"DATA_TOTAL_IOPS": "0", "CONTAINER_RUNTIME": "docker", "CGROUP_VERSION": "v2", "CONTAINERD_NAMESPACE": "other",
				"CONTAINER_SOCKET_PATH": "/run/docker.sock", "CGROUP_ROOT": "/host/cgroup", "CHECK_INTERVAL": "10", "PROC_ROOT": "/host/proc"},
			check: func(t *testing.T, o *Options) {
				if o.DataMount != "/mnt/nvme" || o.DataDevices != "/dev/nvme0n1,259:3" || o.DataTotalIOPS != 0 ||
					o.ContainerRuntime != "docker" || o.CgroupVersion != cgroup.V2 || o.ContainerdNamespace != "other" ||
					o.SocketPath != "/run/docker.sock" || o.CgroupRoot != "/host/cgroup" || o.CheckInterval != 10*time.Second ||
					o.ProcRoot != "/host/proc" {
					t.Errorf("options = %+v", *o)
				}
			},
		},
		"lets a flag override the environment": {
			args: []string{"--node-name=n2", "--check-interval=1m"},
			env:  map[string]string{"NODE_NAME": "n1", "CHECK_INTERVAL": "5"},
			check: func(t *testing.T, o *Options) {
				if o.NodeName != "n2" || o.CheckInterval != time.Minute {
					t.Errorf("options = %+v", *o)
				}
			},
		},
		"requires the node name": {wantErr: "--node-name / NODE_NAME is required"},
		"lets DATA_ALLOW_ROOT_DISK opt in to a data mount on the root disk": {
			env: map[string]string{"NODE_NAME": "n", "DATA_ALLOW_ROOT_DISK": "true"},
			check: func(t *testing.T, o *Options) {
				if s := o.DataSettings(); !s.AllowRootDisk || s.Mount != "/data" || s.Devices != "" {
					t.Errorf("data settings = %+v, want /data with the root disk allowed", s)
				}
			},
		},
		"names a bad DATA_ALLOW_ROOT_DISK": {
			env: map[string]string{"NODE_NAME": "n", "DATA_ALLOW_ROOT_DISK": "maybe"}, wantErr: `invalid value "maybe" for environment variable DATA_ALLOW_ROOT_DISK`,
		},
		"rejects a relative data mount": {
			env: map[string]string{"NODE_NAME": "n", "DATA_MOUNT": "data"}, wantErr: `invalid value "data" for --data-mount / DATA_MOUNT: want an absolute path`,
		},
		"parses the reset subcommand with the applier's settings and its own flags, without a node name": {
			args: []string{"reset", "--all-devices", "--wait", "--cgroup-root=/host/cgroup"},
			env:  map[string]string{"DATA_MOUNT": "/mnt/nvme", "PROC_ROOT": "/host/proc"},
			check: func(t *testing.T, o *Options) {
				if !o.Reset.Run || !o.Reset.AllDevices || !o.Reset.Wait || o.CgroupRoot != "/host/cgroup" || o.DataMount != "/mnt/nvme" || o.ProcRoot != "/host/proc" {
					t.Errorf("options = %+v", *o)
				}
				if o.NeedsCluster() {
					t.Error("reset needs the cluster; it must work on the node's files only")
				}
			},
		},
		"needs the cluster to apply limits": {
			env: map[string]string{"NODE_NAME": "n"},
			check: func(t *testing.T, o *Options) {
				if o.Reset.Run || !o.NeedsCluster() {
					t.Errorf("reset %+v, needs the cluster %t", o.Reset, o.NeedsCluster())
				}
			},
		},
		"knows the reset flags only in reset": {
			args: []string{"--node-name=n", "--all-devices"}, wantErr: "flag provided but not defined: -all-devices",
		},
		"names a bad runtime": {env: map[string]string{"NODE_NAME": "n", "CONTAINER_RUNTIME": "cri-o"}, wantErr: `invalid value "cri-o" for environment variable CONTAINER_RUNTIME: want one of auto, containerd, docker`},
		"names a bad cgroup version": {
			args: []string{"--node-name=n", "--cgroup-version=v3"}, wantErr: `invalid value "v3" for flag -cgroup-version`,
		},
		"names a bad total": {
			env: map[string]string{"NODE_NAME": "n", "DATA_TOTAL_IOPS": "-1"}, wantErr: `invalid value "-1" for environment variable DATA_TOTAL_IOPS`,
		},
		"rejects a check interval under a second": {
			env: map[string]string{"NODE_NAME": "n", "CHECK_INTERVAL": "0"}, wantErr: "--check-interval / CHECK_INTERVAL",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			o, err := ParseOptions(tc.args, func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok })
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, o)
		})
	}
}
