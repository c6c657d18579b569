// Package cgroup is KubeDiskGuard's only access to cgroup files: it finds the
// cgroup hierarchy that holds the block IO controller (v1 blkio or v2 io),
// locates the cgroups of Kubernetes containers and of the kubepods tree, sets
// and reads block IO throttle limits, and reads IO statistics.
//
// Every write goes through one choke point that cleans the path, refuses
// paths outside the hierarchy and the root cgroup itself (where every
// process without a cgroup of its own lives), never creates a cgroup, and
// skips the write when the file already holds the desired value. A cgroup
// that no longer exists, which is normal for a container that has just
// exited, is reported as ErrCgroupGone.
package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// DefaultRoot is where the host's cgroup filesystems are mounted.
const DefaultRoot = "/sys/fs/cgroup"

// ErrCgroupGone means that a cgroup, or the process whose cgroup was looked
// up, no longer exists; check it with errors.Is.
var ErrCgroupGone = errors.New("cgroup does not exist")

// Version is a cgroup version, as the CGROUP_VERSION setting names it.
type Version uint8

const (
	// Auto detects the version from the files under the root.
	Auto Version = iota
	// V1 is the blkio controller of cgroup v1, also on hybrid hosts.
	V1
	// V2 is the io controller of the unified hierarchy.
	V2
)

// String returns "auto", "v1" or "v2".
func (v Version) String() string {
	switch v {
	case Auto:
		return "auto"
	case V1:
		return "v1"
	case V2:
		return "v2"
	}
	return fmt.Sprintf("Version(%d)", uint8(v))
}

// ParseVersion parses a CGROUP_VERSION value: "auto", "v1" or "v2".
func ParseVersion(s string) (Version, error) {
	for _, v := range []Version{Auto, V1, V2} {
		if s == v.String() {
			return v, nil
		}
	}
	return 0, fmt.Errorf("cgroup version %q: want auto, v1 or v2", s)
}

// Hierarchy is the cgroup hierarchy that holds the block IO controller:
// cgroup v1's blkio hierarchy at <root>/blkio, or the unified cgroup v2
// hierarchy at <root>. Cgroup directories are absolute paths inside it. Get
// one from Open; it holds no mutable state and is safe for concurrent use.
type Hierarchy struct {
	version Version
	dir     string

	// write writes one value to one cgroup file; tests replace it with an
	// emulation of the kernel's merging of throttle lines.
	write func(path, value string) error
}

// Open returns the hierarchy of the IO controller under root (the
// CGROUP_ROOT setting; "" is DefaultRoot) for version v, detecting the
// version when v is Auto: cgroup v2 when <root>/cgroup.controllers exists,
// v1 when <root>/blkio has the blkio throttle files. A hybrid host, with v1
// controllers and an empty cgroup2 hierarchy, is v1 for IO because blkio is
// bound to v1. An explicit version is checked against the files too.
func Open(root string, v Version) (*Hierarchy, error) {
	if root == "" {
		root = DefaultRoot
	}
	root = filepath.Clean(root)
	v1Probe := filepath.Join(root, "blkio", V1File(limits.ReadIOPS))
	v2Probe := filepath.Join(root, "cgroup.controllers")
	switch v {
	case Auto:
		switch {
		case exists(v2Probe):
			v = V2
		case exists(v1Probe):
			v = V1
		default:
			return nil, fmt.Errorf("no cgroup hierarchy with a block IO controller under %s: neither %s (cgroup v2) nor %s (cgroup v1 blkio) exists", root, v2Probe, v1Probe)
		}
	case V1:
		if !exists(v1Probe) {
			return nil, fmt.Errorf("cgroup v1: %s does not exist: is the blkio controller mounted at %s?", v1Probe, filepath.Dir(v1Probe))
		}
	case V2:
		if !exists(v2Probe) {
			return nil, fmt.Errorf("cgroup v2: %s does not exist: is the cgroup2 filesystem mounted at %s?", v2Probe, root)
		}
	default:
		return nil, fmt.Errorf("unknown cgroup version %v", v)
	}
	h := &Hierarchy{version: v, dir: root, write: writeCgroupFile}
	if v == V1 {
		h.dir = filepath.Join(root, "blkio")
		return h, nil
	}
	b, err := os.ReadFile(v2Probe)
	if err != nil {
		return nil, fmt.Errorf("cgroup v2: %w", err)
	}
	if !slices.Contains(strings.Fields(string(b)), "io") {
		return nil, fmt.Errorf("cgroup v2: the io controller is not available in %s (it lists %q); on a hybrid host the block IO controller is bound to cgroup v1", v2Probe, strings.TrimSpace(string(b)))
	}
	return h, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// Version returns V1 or V2.
func (h *Hierarchy) Version() Version { return h.version }

// Dir returns the directory of the hierarchy's root cgroup:
// <root>/blkio for v1, <root> for v2.
func (h *Hierarchy) Dir() string { return h.dir }

// Join returns the directory of the cgroup at path, a path inside the
// hierarchy such as "/kubepods/besteffort/pod<uid>/<id>". ".." cannot lead
// out of the hierarchy.
func (h *Hierarchy) Join(path string) string {
	return filepath.Join(h.dir, filepath.Clean("/"+path))
}

// Rel returns the path inside the hierarchy of the cgroup directory dir,
// such as "/kubepods/besteffort"; it is the inverse of Join.
func (h *Hierarchy) Rel(dir string) (string, error) {
	dir = filepath.Clean(dir)
	if dir == h.dir {
		return "/", nil
	}
	rest, ok := strings.CutPrefix(dir, h.dir)
	if !ok || !strings.HasPrefix(rest, "/") {
		return "", fmt.Errorf("%s is not a cgroup directory in the hierarchy at %s", dir, h.dir)
	}
	return rest, nil
}

// Hierarchies lists the cgroup hierarchies mounted under root ("" is
// DefaultRoot), from this process's mountinfo: each v1 controller and the
// unified mount of a hybrid host, or root itself on a unified host.
func Hierarchies(root string) ([]string, error) {
	if root == "" {
		root = DefaultRoot
	}
	root = filepath.Clean(root)
	mounts, err := device.ReadMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var below, at []string
	for _, m := range mounts {
		if m.FSType != "cgroup" && m.FSType != "cgroup2" {
			continue
		}
		switch {
		case strings.HasPrefix(m.MountPoint, root+"/"):
			below = append(below, m.MountPoint)
		case m.MountPoint == root:
			at = append(at, m.MountPoint)
		}
	}
	if len(below) > 0 {
		return below, nil
	}
	return at, nil
}
