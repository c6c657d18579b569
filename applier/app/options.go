// Package app is the kubediskguard-applier command: its options and the
// wiring of device resolution, the cgroup layer, the container runtime, the
// pod watch and the reconciler.
package app

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/applier/runtime/connect"
	"github.com/kubediskguard/kubediskguard/applier/runtime/containerd"
	"github.com/kubediskguard/kubediskguard/shared/command"
	"github.com/kubediskguard/kubediskguard/shared/config"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Options is the applier's whole configuration.
type Options struct {
	command.Common

	NodeName string

	DataMount           string
	DataDevices         string
	DataAllowRootDisk   bool
	DataTotalIOPS       uint64
	ContainerRuntime    string
	CgroupVersion       cgroup.Version
	ContainerdNamespace string
	SocketPath          string
	CgroupRoot          string
	ProcRoot            string
	CheckInterval       time.Duration

	// Reset is the reset subcommand: clear the limits instead of applying them.
	Reset ResetOptions
}

// ResetOptions are the reset subcommand's own options.
type ResetOptions struct {
	// Run is true for `kubediskguard-applier reset`.
	Run bool
	// AllDevices clears the limits of every device, not only the data disk's.
	AllDevices bool
	// Wait keeps the command running after it has cleared, until it is
	// stopped, with /readyz ready once it has (the container of a one-shot
	// DaemonSet).
	Wait bool
}

// DataSettings are the settings that say where the data disk is.
func (o *Options) DataSettings() device.Settings {
	return device.Settings{Mount: o.DataMount, Devices: o.DataDevices, AllowRootDisk: o.DataAllowRootDisk}
}

// NeedsCluster implements command.Clusterless: reset works on the node's
// cgroup files only.
func (o *Options) NeedsCluster() bool { return !o.Reset.Run }

// ParseOptions reads the options from the command line and the environment
// (lookupEnv is normally os.LookupEnv). A bad value is an error naming it.
// A first argument "reset" is the reset subcommand, with the same settings
// plus its own flags.
func ParseOptions(args []string, lookupEnv func(string) (string, bool)) (*Options, error) {
	o := &Options{ContainerRuntime: connect.Auto, CgroupVersion: cgroup.Auto, CheckInterval: 30 * time.Second}
	name := "kubediskguard-applier"
	if len(args) > 0 && args[0] == "reset" {
		o.Reset.Run, args, name = true, args[1:], name+" reset"
	}
	fs := config.NewFlagSet(name)
	if o.Reset.Run {
		fs.BoolVar(&o.Reset.AllDevices, "all-devices", false, "clear the limits of every device below the kubepods cgroup, not only the data disk's (for a data disk that is no longer mounted)")
		fs.BoolVar(&o.Reset.Wait, "wait", false, "after clearing, keep running until stopped, /readyz on --health-probe-bind-address ready once cleared (the container of a one-shot DaemonSet)")
	}

	fs.StringVar(&o.NodeName, "node-name", "", "the node this applier runs on; only its pods are watched (required)")
	fs.Env("node-name", "NODE_NAME")
	fs.StringVar(&o.DataMount, "data-mount", "/data", "mount point of the data disk; its filesystem's whole disk is limited")
	fs.Env("data-mount", "DATA_MOUNT")
	fs.StringVar(&o.DataDevices, "data-devices", "", "devices to limit (/dev/nvme0n1,259:3); overrides --data-mount")
	fs.Env("data-devices", "DATA_DEVICES")
	fs.BoolVar(&o.DataAllowRootDisk, "data-allow-root-disk", false, "let --data-mount be any directory, also one on the root disk: the disk of the filesystem holding it is limited (default: it must be the mount point of a disk other than the root disk, waited for until it is)")
	fs.Env("data-allow-root-disk", "DATA_ALLOW_ROOT_DISK")
	fs.Var(value[uint64]{&o.DataTotalIOPS, limits.ParseIOPS}, "data-total-iops", "read and write IOPS cap of all pods together, on the kubepods cgroup (0: off)")
	fs.Env("data-total-iops", "DATA_TOTAL_IOPS")
	fs.Var(value[string]{&o.ContainerRuntime, oneOf(connect.Auto, connect.Containerd, connect.Docker)}, "container-runtime", "auto, containerd or docker")
	fs.Env("container-runtime", "CONTAINER_RUNTIME")
	fs.Var(value[cgroup.Version]{&o.CgroupVersion, cgroup.ParseVersion}, "cgroup-version", "auto, v1 or v2")
	fs.Env("cgroup-version", "CGROUP_VERSION")
	fs.StringVar(&o.ContainerdNamespace, "containerd-namespace", containerd.DefaultNamespace, "containerd namespace of the kubelet's containers")
	fs.Env("containerd-namespace", "CONTAINERD_NAMESPACE")
	fs.StringVar(&o.SocketPath, "container-socket-path", "", "containerd or Docker socket (default: the runtime's default socket)")
	fs.Env("container-socket-path", "CONTAINER_SOCKET_PATH")
	fs.StringVar(&o.CgroupRoot, "cgroup-root", cgroup.DefaultRoot, "the host's cgroup filesystem as mounted into the applier")
	fs.Env("cgroup-root", "CGROUP_ROOT")
	fs.StringVar(&o.ProcRoot, "proc-root", "/proc", "the host's /proc as mounted into the applier (the applier needs the host PID namespace or this mount)")
	fs.Env("proc-root", "PROC_ROOT")
	interval := config.Seconds(o.CheckInterval)
	fs.Var(&interval, "check-interval", "time between full reconciles, in seconds (a safety net; events do the real work)")
	fs.Env("check-interval", "CHECK_INTERVAL")
	o.Common.Bind(fs.FlagSet)

	if err := fs.Parse(args, lookupEnv); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, fs.Usage())
	}
	o.CheckInterval = time.Duration(interval)
	var errs []error
	if strings.TrimSpace(o.NodeName) == "" && !o.Reset.Run {
		errs = append(errs, errors.New("--node-name / NODE_NAME is required (set it from the downward API: spec.nodeName)"))
	}
	if o.CheckInterval < time.Second {
		errs = append(errs, fmt.Errorf("invalid value %s for --check-interval / CHECK_INTERVAL: want at least 1 second", o.CheckInterval))
	}
	if strings.TrimSpace(o.DataMount) == "" && strings.Trim(o.DataDevices, " ,") == "" {
		errs = append(errs, errors.New("--data-mount / DATA_MOUNT or --data-devices / DATA_DEVICES must name the data disk"))
	} else if !o.DataSettings().Explicit() && !path.IsAbs(o.DataMount) {
		errs = append(errs, fmt.Errorf("invalid value %q for --data-mount / DATA_MOUNT: want an absolute path", o.DataMount))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return o, nil
}

// value is a flag.Value whose text parse turns into a T.
type value[T any] struct {
	v     *T
	parse func(string) (T, error)
}

func (f value[T]) Set(s string) error {
	v, err := f.parse(s)
	if err != nil {
		return err
	}
	*f.v = v
	return nil
}

func (f value[T]) String() string {
	if f.v == nil {
		return ""
	}
	return fmt.Sprint(*f.v)
}

// oneOf parses a value that must be one of allowed.
func oneOf(allowed ...string) func(string) (string, error) {
	return func(s string) (string, error) {
		if slices.Contains(allowed, s) {
			return s, nil
		}
		return "", fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
	}
}
