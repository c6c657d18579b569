package device

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// ErrNoDataDisk means that no data disk is mounted at DATA_MOUNT (yet): the
// path is not a mount point, holds a filesystem without a block device, or
// is on the root disk without DATA_ALLOW_ROOT_DISK. The applier waits for
// it; check with errors.Is.
var ErrNoDataDisk = errors.New("no data disk")

// Settings say where the data disk is: the applier's DATA_MOUNT,
// DATA_DEVICES and DATA_ALLOW_ROOT_DISK.
type Settings struct {
	// Mount is the mount point of the data disk.
	Mount string
	// Devices, a comma-separated list of device paths and numbers,
	// overrides Mount.
	Devices string
	// AllowRootDisk lets Mount be any directory, also one on the root
	// disk: its filesystem's disk (the nearest mount at or above it) is
	// limited. Without it, Mount must be the mount point of a block-device
	// filesystem that is not on the root disk.
	AllowRootDisk bool
}

// Explicit reports whether the devices are listed rather than found from
// the mount.
func (s Settings) Explicit() bool { return strings.Trim(s.Devices, " ,") != "" }

// DataDisk is what the data disk resolved to: the devices limited, and
// where they came from.
type DataDisk struct {
	Devices []Device
	// Source is the data mount ("/data") or "DATA_DEVICES=<the list>".
	Source string
}

// String names the devices and where they came from, as Events and logs
// say it: "259:0 (/data)", "259:0, 253:0 (DATA_DEVICES=/dev/nvme0n1,253:0)",
// or "no device" when there is none.
func (d DataDisk) String() string {
	if len(d.Devices) == 0 {
		return "no device"
	}
	names := make([]string, len(d.Devices))
	for i, dev := range d.Devices {
		names[i] = dev.String()
	}
	return strings.Join(names, ", ") + " (" + d.Source + ")"
}

// Equal reports whether both name the same devices in the same order from
// the same source.
func (d DataDisk) Equal(o DataDisk) bool {
	if d.Source != o.Source || len(d.Devices) != len(o.Devices) {
		return false
	}
	for i := range d.Devices {
		if d.Devices[i] != o.Devices[i] {
			return false
		}
	}
	return true
}

// DataDisk resolves the data disk from the settings s: the listed devices
// (each partition standing for its disk), or the whole disk of the
// filesystem mounted at s.Mount.
//
// Unless s.AllowRootDisk, s.Mount must be a mount point in the resolver's
// mount namespace (a directory that merely lies on some filesystem is not a
// data disk), of a filesystem with a block device, whose disk is not the
// root disk (the disk of the host's /, per <ProcRoot>/1). Where it is not,
// the error wraps ErrNoDataDisk and says what is there: the disk may be
// mounted later. A path that does not exist, or whose mount or devices
// cannot be read, is another error.
func (r *Resolver) DataDisk(s Settings) (DataDisk, error) {
	if s.Explicit() {
		devs, err := r.ForList(s.Devices)
		if err != nil {
			return DataDisk{}, err
		}
		return DataDisk{Devices: devs, Source: "DATA_DEVICES=" + strings.Trim(s.Devices, " ,")}, nil
	}
	if s.AllowRootDisk {
		d, err := r.ForMount(s.Mount)
		if err != nil {
			return DataDisk{}, err
		}
		return DataDisk{Devices: []Device{d}, Source: filepath.Clean(s.Mount)}, nil
	}
	m, err := r.Mount(s.Mount)
	if err != nil {
		return DataDisk{}, err
	}
	path := filepath.Clean(s.Mount)
	const optIn = "; mount the data disk there, list the devices in DATA_DEVICES, or set DATA_ALLOW_ROOT_DISK=true to limit the disk holding it"
	if m.MountPoint != path {
		return DataDisk{}, fmt.Errorf("%w: %s is not a mount point (it lies on the %s filesystem mounted at %s, source %s)%s",
			ErrNoDataDisk, path, m.FSType, m.MountPoint, m.Source, optIn)
	}
	if m.Device.Major == 0 {
		return DataDisk{}, fmt.Errorf("%w: %s holds a %s filesystem (source %s, device %s), which has no block device to limit%s",
			ErrNoDataDisk, path, m.FSType, m.Source, m.Device, optIn)
	}
	d, err := r.Disk(m.Device)
	if err != nil {
		return DataDisk{}, fmt.Errorf("%s is on %s: %w", path, m.Source, err)
	}
	root, ok, err := r.RootDisk()
	if err != nil {
		return DataDisk{}, fmt.Errorf("telling whether %s is on the root disk (set DATA_ALLOW_ROOT_DISK=true or DATA_DEVICES to skip this): %w", path, err)
	}
	if ok && root == d {
		return DataDisk{}, fmt.Errorf("%w: the %s filesystem at %s (source %s, root %s) is on the root disk %s, the disk of the host's /%s",
			ErrNoDataDisk, m.FSType, path, m.Source, m.Root, d, optIn)
	}
	return DataDisk{Devices: []Device{d}, Source: path}, nil
}

// RootDisk returns the whole disk of the host's root filesystem: the
// filesystem mounted at / in the mount namespace of <ProcRoot>/1 (the
// host's init when ProcRoot is the host's /proc), the last of stacked
// ones, from its mountinfo alone (its /proc/1/root may not be readable).
// ok is false when that filesystem has no block device (a root on tmpfs,
// overlay or the network), so no disk is the root disk.
func (r *Resolver) RootDisk() (disk Device, ok bool, err error) {
	host := *r
	host.PID = "1"
	info := host.MountInfoFile()
	mounts, err := ReadMountInfo(info)
	if err != nil {
		return Device{}, false, fmt.Errorf("finding the host's root filesystem: %w", err)
	}
	var root *Mount
	for i := range mounts {
		if mounts[i].MountPoint == "/" {
			root = &mounts[i]
		}
	}
	switch {
	case root == nil:
		return Device{}, false, fmt.Errorf("finding the host's root filesystem: no mount at / in %s", info)
	case root.Device.Major == 0:
		return Device{}, false, nil
	}
	d, err := host.Disk(root.Device)
	if err != nil {
		return Device{}, false, fmt.Errorf("the host's root filesystem (%s): %w", root.Source, err)
	}
	return d, true, nil
}
