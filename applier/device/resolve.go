package device

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Resolver finds the block devices to limit. The zero value reads the real
// /proc, /sys and /dev of the process; set the roots when they are mounted
// elsewhere (as in a DaemonSet with host paths).
type Resolver struct {
	// ProcRoot is where procfs is mounted; default "/proc".
	ProcRoot string
	// PID is the process whose mount namespace is looked at; default
	// "self". With the host's PID namespace, "1" sees the host's mounts.
	PID string
	// SysRoot is where sysfs is mounted; default "/sys".
	SysRoot string
	// DevRoot is where the host's /dev is visible; default "/dev". A
	// device path /dev/X is looked up as DevRoot/X.
	DevRoot string

	// stat is syscall.Stat; tests replace it to fake device nodes.
	stat func(path string, st *syscall.Stat_t) error
}

func (r *Resolver) procRoot() string { return orDefault(r.ProcRoot, "/proc") }
func (r *Resolver) pid() string      { return orDefault(r.PID, "self") }
func (r *Resolver) sysRoot() string  { return orDefault(r.SysRoot, "/sys") }
func (r *Resolver) devRoot() string  { return orDefault(r.DevRoot, "/dev") }

func (r *Resolver) statPath(path string) (syscall.Stat_t, error) {
	var st syscall.Stat_t
	stat := r.stat
	if stat == nil {
		stat = syscall.Stat
	}
	if err := stat(path, &st); err != nil {
		return st, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return st, nil
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// DataDevices returns the devices named by devices (a DATA_DEVICES list)
// or, when that is empty, the whole disk holding the filesystem at mount,
// wherever that is: DataDisk with AllowRootDisk. Test tooling uses it to
// find the disk a directory is on.
func (r *Resolver) DataDevices(mount, devices string) ([]Device, error) {
	d, err := r.DataDisk(Settings{Mount: mount, Devices: devices, AllowRootDisk: true})
	return d.Devices, err
}

// ForList resolves a comma-separated list of device paths ("/dev/nvme0n1")
// and device numbers ("259:3") to whole disks, without duplicates, in the
// order given. A partition stands for its disk.
func (r *Resolver) ForList(list string) ([]Device, error) {
	var out []Device
	seen := map[Device]bool{}
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		var d Device
		var err error
		if strings.HasPrefix(item, "/") {
			d, err = r.nodeDevice(item)
		} else {
			d, err = Parse(item)
		}
		if err == nil {
			d, err = r.Disk(d)
		}
		if err != nil {
			return nil, fmt.Errorf("device %q: %w", item, err)
		}
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("device list %q names no device", list)
	}
	return out, nil
}

// nodeDevice returns the device number of a block device node under /dev.
func (r *Resolver) nodeDevice(path string) (Device, error) {
	clean := filepath.Clean(path)
	rel, ok := strings.CutPrefix(clean, "/dev/")
	if !ok {
		return Device{}, errors.New("a device path must be under /dev")
	}
	st, err := r.statPath(filepath.Join(r.devRoot(), rel))
	if err != nil {
		return Device{}, err
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFBLK {
		return Device{}, fmt.Errorf("%s is not a block device", path)
	}
	return FromRdev(uint64(st.Rdev)), nil
}

// ForMount returns the device to limit for the filesystem holding path: the
// filesystem's device, or its whole disk when that is a partition. The
// filesystem is the mount whose mount point is path or its nearest ancestor.
// A filesystem without a block device (tmpfs, overlay, btrfs, NFS) is an
// error that names it.
func (r *Resolver) ForMount(path string) (Device, error) {
	m, err := r.Mount(path)
	if err != nil {
		return Device{}, err
	}
	if m.Device.Major == 0 {
		return Device{}, fmt.Errorf("%s is on the %s filesystem mounted at %s (source %s, device %s), which has no block device to limit; set the data mount to a block-device filesystem or list the devices explicitly",
			path, m.FSType, m.MountPoint, m.Source, m.Device)
	}
	d, err := r.Disk(m.Device)
	if err != nil {
		return Device{}, fmt.Errorf("%s is on %s mounted at %s: %w", path, m.Source, m.MountPoint, err)
	}
	return d, nil
}

// Mount returns the mount holding path, from the mountinfo of the
// resolver's process: the mount whose mount point is the path itself or its
// nearest ancestor, and of stacked mounts on one mount point the last that
// holds the filesystem stat(2) finds there. The
// path must exist (it is looked up through <ProcRoot>/<PID>/root, so in
// that process's mount namespace) and must not cross a symbolic link into
// another mount.
func (r *Resolver) Mount(path string) (Mount, error) {
	if !filepath.IsAbs(path) {
		return Mount{}, fmt.Errorf("mount path %q is not absolute", path)
	}
	path = filepath.Clean(path)
	st, err := r.statPath(filepath.Join(r.procRoot(), r.pid(), "root", path))
	if err != nil {
		return Mount{}, fmt.Errorf("mount path %s: %w", path, err)
	}
	info := filepath.Join(r.procRoot(), r.pid(), "mountinfo")
	mounts, err := ReadMountInfo(info)
	if err != nil {
		return Mount{}, fmt.Errorf("finding the mount of %s: %w", path, err)
	}
	// Of stacked mounts on the nearest mount point, the one on top: the
	// last that holds the filesystem stat sees there (mount order alone
	// can mislead once mounts propagate between namespaces).
	dev := FromRdev(uint64(st.Dev))
	best := -1
	for i, m := range mounts {
		if !within(path, m.MountPoint) {
			continue
		}
		if best < 0 || len(m.MountPoint) > len(mounts[best].MountPoint) ||
			len(m.MountPoint) == len(mounts[best].MountPoint) && (m.Device == dev || mounts[best].Device != dev) {
			best = i
		}
	}
	if best < 0 {
		return Mount{}, fmt.Errorf("no mount in %s holds %s", info, path)
	}
	m := mounts[best]
	// The filesystem stat reports must be the one mountinfo names, or the
	// path leads elsewhere (a symbolic link, a mount hidden by another) and
	// limiting m would limit the wrong disk.
	if dev != m.Device && dev.Major != 0 && m.Device.Major != 0 {
		return Mount{}, fmt.Errorf("%s is on device %s, but the mount at %s (per %s) is device %s: is the path a symbolic link? use the real mount point",
			path, dev, m.MountPoint, info, m.Device)
	}
	return m, nil
}

// within reports whether path is mountPoint or below it; both are clean.
func within(path, mountPoint string) bool {
	if mountPoint == "/" || path == mountPoint {
		return true
	}
	return strings.HasPrefix(path, mountPoint) && path[len(mountPoint)] == '/'
}

// Disk returns the whole disk of a partition, and any other block device
// (a whole disk, a device-mapper or LVM volume) itself. The device must
// exist in sysfs.
func (r *Resolver) Disk(d Device) (Device, error) {
	link := filepath.Join(r.sysRoot(), "dev", "block", d.String())
	dir, err := filepath.EvalSymlinks(link)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return Device{}, fmt.Errorf("block device %s does not exist (no %s)", d, link)
		}
		return Device{}, fmt.Errorf("block device %s: %w", d, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "partition")); err == nil {
		dir = filepath.Dir(dir)
	} else if !errors.Is(err, os.ErrNotExist) {
		return Device{}, fmt.Errorf("block device %s: %w", d, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "dev"))
	if err != nil {
		return Device{}, fmt.Errorf("block device %s: %w", d, err)
	}
	disk, err := Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return Device{}, fmt.Errorf("block device %s: %s: %w", d, filepath.Join(dir, "dev"), err)
	}
	return disk, nil
}
