package cgroup

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

var (
	vda   = device.Device{Major: 254, Minor: 0}
	nvme0 = device.Device{Major: 259, Minor: 0}
)

// v1Files are the files of a blkio cgroup that the package touches.
var v1Files = []string{
	"blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device",
	"blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device",
	"blkio.throttle.io_serviced", "blkio.throttle.io_serviced_recursive",
	"blkio.throttle.io_service_bytes", "blkio.throttle.io_service_bytes_recursive",
	"cgroup.procs",
}

// v2Files are the files of a cgroup v2 cgroup with the io controller
// enabled that the package touches.
var v2Files = []string{"io.max", "io.stat", "cgroup.procs"}

// newRoot lays out a fake cgroup root in a temporary directory: a pure v1
// host, a hybrid host (v1 controllers, an empty cgroup2 at "unified") or a
// unified v2 host.
func newRoot(t *testing.T, layout string) string {
	t.Helper()
	root := t.TempDir()
	switch layout {
	case "v1", "hybrid":
		touch(t, filepath.Join(root, "blkio"), v1Files...)
		touch(t, filepath.Join(root, "cpu"), "cpu.shares")
		if layout == "hybrid" {
			touch(t, filepath.Join(root, "unified"), "cgroup.procs")
			write(t, filepath.Join(root, "unified", "cgroup.controllers"), "hugetlb\n")
		}
	case "v2":
		touch(t, root, "cgroup.procs", "io.stat")
		write(t, filepath.Join(root, "cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n")
	default:
		t.Fatalf("unknown layout %q", layout)
	}
	return root
}

// newHierarchy opens a fake cgroup root of the given version whose writes
// go to a kernel emulation, which records them.
func newHierarchy(t *testing.T, v Version) (*Hierarchy, *fakeKernel) {
	t.Helper()
	h, err := Open(newRoot(t, v.String()), Auto)
	if err != nil {
		t.Fatal(err)
	}
	if h.Version() != v {
		t.Fatalf("opened %v, want %v", h.Version(), v)
	}
	k := &fakeKernel{t: t}
	h.write = k.write
	return h, k
}

// mkCgroup creates the cgroup at path in the hierarchy, as the kernel
// would: a directory with the controller's files, empty.
func mkCgroup(t *testing.T, h *Hierarchy, path string) string {
	t.Helper()
	dir := h.Join(path)
	if h.Version() == V1 {
		touch(t, dir, v1Files...)
	} else {
		touch(t, dir, v2Files...)
	}
	return dir
}

func touch(t *testing.T, dir string, names ...string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		write(t, filepath.Join(dir, n), "")
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// fakeKernel emulates how the kernel handles a write to a throttle file:
// the value updates one device's line (v1) or some keys of one device's
// line (v2 io.max) and leaves the other lines alone; a device whose limits
// are all cleared disappears. It records every write, and fails the ones
// whose values are listed in fail.
type fakeKernel struct {
	t      *testing.T
	writes []string // "file: value"
	fail   map[string]error
	// before runs before each write, for tests that race the write.
	before func(path string)
}

func (k *fakeKernel) write(path, value string) error {
	k.writes = append(k.writes, filepath.Base(path)+": "+value)
	if k.before != nil {
		k.before(path)
	}
	if err := k.fail[value]; err != nil {
		return &os.PathError{Op: "write", Path: path, Err: err}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	fields := strings.Fields(value)
	if len(fields) < 2 {
		return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
	}
	dev, err := device.Parse(fields[0])
	if err != nil {
		return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
	}
	var lines []string
	if filepath.Base(path) == IOMaxFile {
		current, err := ParseIOMax(string(b))
		if err != nil {
			k.t.Fatalf("fake kernel: %s holds garbage: %v", path, err)
		}
		l := current[dev]
		for _, kv := range fields[1:] {
			key, v, ok := strings.Cut(kv, "=")
			found := false
			for _, d := range limits.Dimensions {
				if ok && key == v2Key(d) {
					found = true
					n, err := strconv.ParseUint(v, 10, 64)
					if v == "max" {
						n, err = 0, nil
					}
					if err != nil {
						return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
					}
					l.Set(d, n)
				}
			}
			if !found {
				return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
			}
		}
		current[dev] = l
		for d, l := range current {
			if l.IsUnlimited() {
				continue
			}
			line := d.String()
			// The kernel lists the keys in this order.
			for _, dim := range []limits.Dimension{limits.ReadBPS, limits.WriteBPS, limits.ReadIOPS, limits.WriteIOPS} {
				v := "max"
				if n := l.Get(dim); n != 0 {
					v = strconv.FormatUint(n, 10)
				}
				line += " " + v2Key(dim) + "=" + v
			}
			lines = append(lines, line)
		}
	} else {
		if len(fields) != 2 {
			return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
		}
		current, err := ParseV1File(string(b))
		if err != nil {
			k.t.Fatalf("fake kernel: %s holds garbage: %v", path, err)
		}
		n, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return &os.PathError{Op: "write", Path: path, Err: syscall.EINVAL}
		}
		current[dev] = n
		for d, n := range current {
			if n != 0 {
				lines = append(lines, fmt.Sprintf("%s %d", d, n))
			}
		}
	}
	slices.Sort(lines)
	content := strings.Join(lines, "\n")
	if content != "" {
		content += "\n"
	}
	// Like the kernel, never create a file.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteString(content)
	return err
}
