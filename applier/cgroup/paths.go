package cgroup

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ExpandSlice returns the cgroup path of a systemd slice unit, in which
// every dash starts a child slice: "a-b-c.slice" is
// "a.slice/a-b.slice/a-b-c.slice", so "kubepods-besteffort.slice" is
// "kubepods.slice/kubepods-besteffort.slice" and
// "kubelet-kubepods.slice" is "kubelet.slice/kubelet-kubepods.slice".
// "-.slice", the root slice, is "". Names with a slash, without the .slice
// suffix or with an empty component ("a--b.slice", "-a.slice") are errors.
func ExpandSlice(slice string) (string, error) {
	name, ok := strings.CutSuffix(slice, ".slice")
	if !ok || name == "" || strings.Contains(slice, "/") {
		return "", fmt.Errorf("invalid systemd slice name %q: want NAME.slice without a slash", slice)
	}
	if name == "-" {
		return "", nil
	}
	var b strings.Builder
	prefix := ""
	for _, component := range strings.Split(name, "-") {
		if component == "" {
			return "", fmt.Errorf("invalid systemd slice name %q: empty component between dashes", slice)
		}
		if b.Len() > 0 {
			b.WriteByte('/')
		}
		prefix += component
		b.WriteString(prefix + ".slice")
		prefix += "-"
	}
	return b.String(), nil
}

// ProcessDir returns the cgroup directory of the process pid, read from
// <procRoot>/<pid>/cgroup (procRoot "" is "/proc"): its blkio line on
// cgroup v1, its "0::" line on cgroup v2. For a container, pid is its init
// process. A process that no longer exists is ErrCgroupGone.
//
// The applier must run in the host's cgroup namespace, or the paths in the
// file are relative to its own cgroup.
func (h *Hierarchy) ProcessDir(procRoot string, pid int) (string, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	file := filepath.Join(procRoot, strconv.Itoa(pid), "cgroup")
	b, err := os.ReadFile(file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("process %d: %w (no %s)", pid, ErrCgroupGone, file)
		}
		return "", fmt.Errorf("process %d: %w", pid, err)
	}
	p, err := ParseProcCgroup(string(b), h.version)
	if err != nil {
		return "", fmt.Errorf("process %d: %s: %w", pid, file, err)
	}
	return h.Join(p), nil
}

// ContainerDirOf returns the cgroup directory of the container id from the
// cgroup directory of one of its processes: dir itself or the nearest
// ancestor whose name holds the ID, as the runtimes name a container's
// cgroup (cgroupfs ".../<id>", systemd ".../cri-containerd-<id>.scope" or
// ".../docker-<id>.scope"); a process that nests cgroups of its own below
// (systemd in a container) still gives its container's. ok is false when no
// component holds the ID: the process is not, or no longer, in the
// container's cgroup — an exited process is in the root cgroup.
func (h *Hierarchy) ContainerDirOf(dir, id string) (string, bool) {
	rel, err := h.Rel(dir)
	if err != nil || id == "" {
		return "", false
	}
	for p := rel; p != "/"; p = path.Dir(p) {
		if strings.Contains(path.Base(p), id) {
			return h.Join(p), true
		}
	}
	return "", false
}

// ErrCgroupNamespace means the applier runs in a cgroup namespace of its
// own, where other processes' cgroup paths are relative to it ("/../..");
// it must run in the host's cgroup namespace (a privileged container).
var ErrCgroupNamespace = errors.New("not in the host's cgroup namespace")

// CheckNamespace verifies, from the cgroup of the host's init process
// (<procRoot>/1/cgroup), that the applier sees cgroup paths as the host does.
func (h *Hierarchy) CheckNamespace(procRoot string) error {
	_, err := h.ProcessDir(procRoot, 1)
	if errors.Is(err, ErrCgroupNamespace) {
		return fmt.Errorf("%w: run the applier privileged (host cgroup namespace) with the host's /proc at --proc-root", err)
	}
	return nil // other errors (no host /proc yet) show up per container
}

// ParseProcCgroup returns a process's cgroup path for version v from the
// contents of /proc/<pid>/cgroup: the path of the line whose controllers
// include blkio on v1 ("7:blkio:/kubepods/..."), of the "0::" line on v2.
// A cgroup that was removed ("0::/x (deleted)") is ErrCgroupGone.
func ParseProcCgroup(content string, v Version) (string, error) {
	for _, line := range strings.Split(content, "\n") {
		// hierarchy-ID:controller-list:cgroup-path; the path may hold ':'.
		id, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		controllers, p, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		var match bool
		switch v {
		case V1:
			match = id != "0" && containsField(controllers, "blkio")
		case V2:
			match = id == "0" && controllers == ""
		default:
			return "", fmt.Errorf("unknown cgroup version %v", v)
		}
		if !match {
			continue
		}
		if before, deleted := strings.CutSuffix(p, " (deleted)"); deleted {
			return "", fmt.Errorf("%w: %s was removed", ErrCgroupGone, before)
		}
		if !strings.HasPrefix(p, "/") {
			return "", fmt.Errorf("cgroup path %q is not absolute", p)
		}
		if slices.Contains(strings.Split(p, "/"), "..") {
			return "", fmt.Errorf("%w: the process's cgroup %q lies outside the reader's cgroup namespace", ErrCgroupNamespace, p)
		}
		return p, nil
	}
	if v == V1 {
		return "", errors.New("no line for the blkio controller")
	}
	return "", errors.New(`no "0::" line of the unified hierarchy`)
}

func containsField(list, name string) bool {
	for _, f := range strings.Split(list, ",") {
		if f == name {
			return true
		}
	}
	return false
}

// SpecDir returns the cgroup directory of an OCI runtime spec's
// Linux.CgroupsPath, as containerd (CRI) and runc use it, in either form:
//   - cgroupfs: "/kubepods/besteffort/pod<uid>/<id>", a path in the hierarchy;
//   - systemd: "<slice>:<prefix>:<name>", such as
//     "kubepods-besteffort-pod<uid_with_underscores>.slice:cri-containerd:<id>",
//     which is <slice expanded>/<prefix>-<name>.scope (an empty slice is
//     system.slice).
func (h *Hierarchy) SpecDir(cgroupsPath string) (string, error) {
	if cgroupsPath == "" {
		return "", errors.New("empty cgroups path")
	}
	parts := strings.Split(cgroupsPath, ":")
	if strings.HasPrefix(cgroupsPath, "/") || len(parts) == 1 {
		return h.Join(cgroupsPath), nil
	}
	if len(parts) != 3 {
		return "", fmt.Errorf("cgroups path %q: want a path or SLICE:PREFIX:NAME", cgroupsPath)
	}
	p, err := systemdPath(parts[0], parts[1], parts[2])
	if err != nil {
		return "", fmt.Errorf("cgroups path %q: %w", cgroupsPath, err)
	}
	return h.Join(p), nil
}

// systemdPath is the cgroup path of the scope prefix-name.scope in slice,
// as runc's systemd driver names it.
func systemdPath(slice, prefix, name string) (string, error) {
	if slice == "" {
		slice = "system.slice"
	}
	parent, err := ExpandSlice(slice)
	if err != nil {
		return "", err
	}
	if err := checkName(name); err != nil {
		return "", err
	}
	unit := name
	if !strings.HasSuffix(name, ".slice") {
		unit = prefix + "-" + name + ".scope"
	}
	return path.Join("/", parent, unit), nil
}

// checkName rejects container IDs and unit names that are not one path
// element.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/:") {
		return fmt.Errorf("invalid container ID or unit name %q", name)
	}
	return nil
}

// Driver is a container runtime's cgroup driver.
type Driver uint8

const (
	// Cgroupfs places containers by path: /docker/<id>.
	Cgroupfs Driver = iota + 1
	// Systemd places containers in scopes: system.slice/docker-<id>.scope.
	Systemd
)

// String returns "cgroupfs" or "systemd", as Docker's info reports it.
func (d Driver) String() string {
	switch d {
	case Cgroupfs:
		return "cgroupfs"
	case Systemd:
		return "systemd"
	}
	return fmt.Sprintf("Driver(%d)", uint8(d))
}

// ParseDriver parses a cgroup driver name: "cgroupfs" or "systemd".
func ParseDriver(s string) (Driver, error) {
	switch s {
	case "cgroupfs":
		return Cgroupfs, nil
	case "systemd":
		return Systemd, nil
	}
	return 0, fmt.Errorf("cgroup driver %q: want cgroupfs or systemd", s)
}

// DockerDir returns the cgroup directory of the Docker container id from its
// HostConfig.CgroupParent and the daemon's cgroup driver:
//   - cgroupfs: <parent>/<id>, or /docker/<id> without a parent;
//   - systemd: <parent expanded>/docker-<id>.scope, where the parent is a
//     slice such as "kubepods-burstable-pod<uid>.slice", or
//     system.slice/docker-<id>.scope without a parent.
func (h *Hierarchy) DockerDir(parent, id string, driver Driver) (string, error) {
	if err := checkName(id); err != nil {
		return "", fmt.Errorf("docker container: %w", err)
	}
	switch driver {
	case Cgroupfs:
		if parent == "" {
			parent = "/docker"
		}
		return h.Join(path.Join("/", parent, id)), nil
	case Systemd:
		p, err := systemdPath(parent, "docker", id)
		if err != nil {
			return "", fmt.Errorf("docker container %s with cgroup parent %q: %w", id, parent, err)
		}
		return h.Join(p), nil
	}
	return "", fmt.Errorf("docker container %s: unknown cgroup driver %v", id, driver)
}

// KubepodsOf returns the kubepods cgroup directory above dir, the cgroup
// of a container or a pod: its nearest ancestor (or dir itself) named
// "kubepods" (cgroupfs driver) or ending in "kubepods.slice" (systemd
// driver: kubepods.slice, kubelet-kubepods.slice, ...). It only computes
// the path.
//
// A limit on kubepods caps all pods together only on cgroup v2. On cgroup
// v1 the kernel's block throttle is flat: a limit on a cgroup applies to
// the processes directly in it, not to those in its descendants (see
// TestRealV1ThrottleIsFlat), so it does not cap the pods below kubepods.
func (h *Hierarchy) KubepodsOf(dir string) (string, error) {
	rel, err := h.Rel(dir)
	if err != nil {
		return "", err
	}
	for p := rel; p != "/"; p = path.Dir(p) {
		if b := path.Base(p); b == "kubepods" || strings.HasSuffix(b, "kubepods.slice") {
			return h.Join(p), nil
		}
	}
	return "", fmt.Errorf("no kubepods cgroup above %s", dir)
}

// kubepodsLayouts are the kubepods cgroups of the kubelet's layouts: the
// cgroupfs driver, and the systemd driver with the default root and with
// kubelet.slice as the root.
func kubepodsLayouts() []string {
	return []string{"kubepods", "kubepods.slice", "kubelet.slice/kubelet-kubepods.slice"}
}

// FindKubepods returns the kubepods cgroup directory by probing the
// kubelet's known layouts (kubepods, kubepods.slice,
// kubelet.slice/kubelet-kubepods.slice), for when no container's cgroup is
// known; prefer KubepodsOf when one is. Finding none, or more than one (a
// node whose cgroup driver changed), is an error.
func (h *Hierarchy) FindKubepods() (string, error) {
	var found, probed []string
	for _, l := range kubepodsLayouts() {
		dir := h.Join(l)
		probed = append(probed, dir)
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			found = append(found, dir)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return "", fmt.Errorf("no kubepods cgroup: none of %s exists: %w", strings.Join(probed, ", "), os.ErrNotExist)
	}
	return "", fmt.Errorf("several kubepods cgroups exist (%s): find it from a container's cgroup instead", strings.Join(found, ", "))
}

// KubepodsTree returns the kubepods cgroup directory of every layout of the
// kubelet that exists (kubepods, kubepods.slice,
// kubelet.slice/kubelet-kubepods.slice) and every cgroup below them — the
// QoS classes, pods and containers — parents before children. No kubepods
// cgroup at all is an error wrapping os.ErrNotExist.
func (h *Hierarchy) KubepodsTree() ([]string, error) {
	var dirs, probed []string
	for _, l := range kubepodsLayouts() {
		top := h.Join(l)
		probed = append(probed, top)
		if fi, err := os.Stat(top); err != nil || !fi.IsDir() {
			continue
		}
		err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
			switch {
			case errors.Is(err, os.ErrNotExist):
				return nil // removed while walking: a container that exited
			case err != nil:
				return err
			case d.IsDir():
				dirs = append(dirs, path)
			}
			return nil
		})
		if err != nil {
			return dirs, fmt.Errorf("listing the cgroups below %s: %w", top, err)
		}
	}
	if len(dirs) == 0 {
		return nil, fmt.Errorf("no kubepods cgroup: none of %s exists: %w", strings.Join(probed, ", "), os.ErrNotExist)
	}
	return dirs, nil
}

// CheckIOEnabled checks, on cgroup v2, that the io controller is enabled
// where the limits go: in cgroup.subtree_control of every cgroup from the
// root down to the kubepods cgroup (FindKubepods), so that the QoS, pod and
// container cgroups below have io.max. A controller that is only available
// (cgroup.controllers) but not enabled there leaves every container
// unlimited without an error from any write to the cgroups that have no
// io.max. The error names the first cgroup lacking it. On v1, and when no
// kubepods cgroup exists yet, it returns nil (nothing to check).
func (h *Hierarchy) CheckIOEnabled() error {
	if h.version != V2 {
		return nil
	}
	kp, err := h.FindKubepods()
	if err != nil {
		return nil
	}
	rel, err := h.Rel(kp)
	if err != nil {
		return err
	}
	var chain []string
	for p := rel; ; p = path.Dir(p) {
		chain = append([]string{h.Join(p)}, chain...)
		if p == "/" {
			break
		}
	}
	for _, dir := range chain {
		f := filepath.Join(dir, "cgroup.subtree_control")
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("cgroup v2: reading %s: %w", f, err)
		}
		if !slices.Contains(strings.Fields(string(b)), "io") {
			return fmt.Errorf("cgroup v2: the io controller is not enabled in %s (%s holds %q): the cgroups below it have no io.max, so no limit can be set on them", dir, f, strings.TrimSpace(string(b)))
		}
	}
	return nil
}
