// Package runtimetest starts private containerd and dockerd daemons for the
// real tests of the runtime packages (StartContainerd, StartDockerd) and for
// test tooling outside a test (LaunchContainerd, LaunchDockerd, such as the
// image builds of hack/images), each in its own directory and never on the
// host's default sockets, and undoes what they leave on the host: processes
// (stopped by PID), mounts and cgroups.
package runtimetest

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

// Debian packages of the real components.
const (
	ContainerdPackages = "apt-get install containerd runc"
	DockerPackages     = "apt-get install docker.io"
	BusyboxPackages    = "apt-get install busybox-static"
)

// startTimeout bounds how long a daemon may take to answer, stopTimeout
// how long it may take to exit on SIGTERM before it is killed.
const (
	startTimeout = 15 * time.Second
	stopTimeout  = 15 * time.Second
)

// lockOnce holds the host lock from the first test of the process that
// starts a daemon until the process exits (realtest.HoldHostLock): a
// package's runtime tests and benchmarks then run one after the other
// without waiting for other packages' tests between each.
func lockOnce(t testing.TB) {
	t.Helper()
	start := time.Now()
	if err := realtest.HoldHostLock(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Logf("waited %s for other tests using the host's runtimes and cgroups", d.Round(time.Millisecond))
	}
}

// Hierarchy returns the host's cgroup hierarchy of the block IO controller.
func Hierarchy(t testing.TB) *cgroup.Hierarchy {
	t.Helper()
	h, err := cgroup.Open(cgroup.DefaultRoot, cgroup.Auto)
	if err != nil {
		realtest.Missing(t, "a cgroup hierarchy with the block IO controller ("+err.Error()+")", "run on a Linux host with cgroup v1 blkio or cgroup v2 io")
	}
	return h
}

// Bin returns the path of the program name, looked up in PATH and in
// /usr/sbin and /usr/bin, or stops the test saying which packages have it.
func Bin(t testing.TB, name, packages string) string {
	t.Helper()
	p, err := lookBin(name, packages)
	if err != nil {
		realtest.Missing(t, name+" is not installed", packages)
	}
	return p
}

// lookBin returns the path of the program name, looked up in PATH and in
// /usr/sbin and /usr/bin, or an error that says which packages have it.
func lookBin(name, packages string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not installed (get it with: %s)", name, packages)
}

// daemonEnv is the environment of the daemons: they find runc and the
// shims in PATH, which may lack the sbin directories under go test; first
// of all in first, when set.
func daemonEnv(first string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PATH=") })
	path := os.Getenv("PATH") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
	if first != "" {
		path = first + ":" + path
	}
	return append(env, "PATH="+path)
}

// Rootfs returns a new directory under parent holding a root filesystem
// with a static busybox as /bin/busybox and /bin/sh.
func Rootfs(t testing.TB, parent string) string {
	t.Helper()
	bb := busybox(t)
	dir := filepath.Join(parent, "rootfs")
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(dir, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// RootfsTar returns the tar archive of the root filesystem that Rootfs
// makes, for docker import.
func RootfsTar(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(busybox(t))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(b))},
		{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(b); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// busybox returns the path of a statically linked busybox, or stops the
// test saying which package has it.
func busybox(t testing.TB) string {
	t.Helper()
	p, err := Busybox()
	if err != nil {
		realtest.Missing(t, "a statically linked busybox (for the containers' root filesystem)", BusyboxPackages)
	}
	return p
}

// Busybox returns the path of a statically linked busybox (Debian's
// busybox-static), for root filesystems with nothing else in them.
func Busybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", fmt.Errorf("no statically linked busybox in /bin or /usr/bin (get it with: %s)", BusyboxPackages)
}

// Options say where a daemon that LaunchContainerd or LaunchDockerd starts
// outside a test keeps its files, and where it reports.
type Options struct {
	// Dir holds everything of the daemon but a dockerd's data root: its
	// configuration, sockets, pid file, log and state (and a dockerd's exec
	// root and containerd). It must exist, and be short enough for the unix
	// sockets below it (about 60 bytes).
	Dir string
	// DataRoot is a dockerd's --data-root, which may be kept across runs
	// (images, layers, build cache); default Dir/root. containerd has none.
	DataRoot string
	// Log gets progress lines: when the daemon is up, what its cleanup
	// found. Default: none.
	Log io.Writer
}

// logf returns a printf to o.Log, one line per call.
func (o Options) logf() func(format string, args ...any) {
	w := o.Log
	if w == nil {
		w = io.Discard
	}
	return func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
}

// daemon is a daemon process started by a test or a tool.
type daemon struct {
	name string
	dir  string // everything of the daemon is below it, but a data root
	// pathDir, when set, comes first in the daemon's PATH (where a
	// containerd finds its shim).
	pathDir string
	log     string
	cmd     *exec.Cmd
	exited  chan struct{}
	// cgroups are removed after the daemon stopped; see CleanupCgroups.
	cgroups []string
	// mountDirs are the directories besides dir whose mounts are removed
	// after the daemon stopped (a dockerd's data root).
	mountDirs []string
	// logf reports progress and what the cleanup found: t.Logf, or
	// Options.Log outside a test.
	logf func(format string, args ...any)
	// up starts the daemon and waits until it answers; down removes its
	// containers, stops it and undoes what it left on the host: the
	// launch and shutdown of Containerd or Dockerd.
	up   func() (time.Duration, error)
	down func() error
}

// startInTest starts the daemon for the test t, which stops it when it
// ends.
func (d *daemon) startInTest(t testing.TB) {
	t.Helper()
	d.logf = t.Logf
	t.Cleanup(func() {
		if err := d.down(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Log(d.logTail())
		}
	})
	d.Start(t)
}

// startAlone starts the daemon outside a test, reporting to o.Log; when it
// fails, it has stopped the daemon.
func (d *daemon) startAlone(o Options) (time.Duration, error) {
	d.logf = o.logf()
	took, err := d.up()
	if err != nil {
		return 0, errors.Join(err, d.Stop())
	}
	return took, nil
}

// Start starts the daemon on its directories, as after a crash or a
// restart, and waits until it answers.
func (d *daemon) Start(t testing.TB) time.Duration {
	t.Helper()
	took, err := d.up()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s up in %s (pid %d)", d.name, took.Round(time.Millisecond), d.cmd.Process.Pid)
	return took
}

// Stop stops a daemon that LaunchContainerd started, after its containers
// are removed, kills any process it left and undoes what it left on the
// host (mounts, cgroups, shim sockets). Its directory stays. (Dockerd.Stop
// says what it does for a dockerd.)
func (d *daemon) Stop() error {
	err := d.down()
	if err != nil {
		d.logf("%s", d.logTail())
	}
	return err
}

// start starts the program bin with args, its output appended to d.log.
func (d *daemon) start(bin string, args ...string) error {
	logf, err := os.OpenFile(d.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("starting %s: %w", d.name, err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = daemonEnv(d.pathDir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", d.name, err)
	}
	d.cmd, d.exited = cmd, make(chan struct{})
	go func(exited chan struct{}) {
		_ = cmd.Wait()
		close(exited)
	}(d.exited)
	return nil
}

// Dir is the daemon's directory; everything of it is below, but a
// dockerd's data root given to LaunchDockerd.
func (d *daemon) Dir() string { return d.dir }

// running reports whether the daemon's process has not exited.
func (d *daemon) running() bool {
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// waitReady calls ready until it succeeds, the daemon exits or
// startTimeout passes, and returns how long the daemon took.
func (d *daemon) waitReady(started time.Time, ready func(context.Context) error) (time.Duration, error) {
	deadline := started.Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := ready(ctx)
		cancel()
		if err == nil {
			return time.Since(started), nil
		}
		if !d.running() {
			return 0, fmt.Errorf("%s exited before it answered: %v\n%s", d.name, d.cmd.ProcessState, d.logTail())
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s did not answer within %s: %w\n%s", d.name, startTimeout, err, d.logTail())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Kill kills the daemon with SIGKILL, as a crash would, and waits until
// it is gone.
func (d *daemon) Kill(t testing.TB) {
	t.Helper()
	if !d.running() {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
}

// stop stops the daemon with SIGTERM, or SIGKILL after stopTimeout, which
// is an error.
func (d *daemon) stop() error {
	if !d.running() {
		return nil
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		return nil
	case <-time.After(stopTimeout):
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.exited
		return fmt.Errorf("%s (pid %d) did not exit within %s of SIGTERM; killed it", d.name, d.cmd.Process.Pid, stopTimeout)
	}
}

// logTail returns the end of the daemon's log, for failure messages.
func (d *daemon) logTail() string {
	b, _ := os.ReadFile(d.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return fmt.Sprintf("--- end of %s ---\n%s", d.log, b)
}

// cleanupHost kills the processes the daemon left (see leftoverPIDs),
// unmounts what is mounted under its directory and mountDirs and removes
// the cgroups that CleanupCgroups named.
func (d *daemon) cleanupHost() error {
	for _, pid := range leftoverPIDs(d.dir) {
		d.logf("%s left process %d; killing it", d.name, pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 500 && alive(pid); i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	var errs []error
	for _, dir := range append([]string{d.dir}, d.mountDirs...) {
		errs = append(errs, unmountUnder(dir))
	}
	errs = append(errs, removeCgroups(d.cgroups, d.logf))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s cleanup: %w", d.name, err)
	}
	return nil
}

// process is a live process of the host.
type process struct {
	pid, ppid int
	cmdline   []byte // its arguments, each ended by a NUL byte
}

// processes returns the live processes of the host but this one.
func processes() []process {
	entries, _ := os.ReadDir("/proc")
	var ps []process
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || !alive(pid) {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		ps = append(ps, process{pid: pid, ppid: ppid(pid), cmdline: cmdline})
	}
	return ps
}

// leftoverPIDs returns the live processes that the daemon with directory
// dir left: those whose command line names dir (the daemon, its shims,
// dockerd's containerd), their children (container processes), and the
// processes named by pid files under dir that run in a mount namespace
// other than ours (container processes whose shim is gone).
func leftoverPIDs(dir string) []int {
	ps := processes()
	ours := map[int]bool{}
	for _, p := range ps {
		if bytes.Contains(p.cmdline, []byte(dir)) {
			ours[p.pid] = true
		}
	}
	for _, p := range ps {
		if ours[p.ppid] {
			ours[p.pid] = true
		}
	}
	myNS, _ := os.Readlink("/proc/self/ns/mnt")
	_ = filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || !strings.HasSuffix(e.Name(), ".pid") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 || !alive(pid) {
			return nil
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && ns != myNS {
			ours[pid] = true
		}
		return nil
	})
	pids := slices.Collect(maps.Keys(ours))
	slices.Sort(pids)
	return pids
}

// ppid returns the parent of pid, 0 if unknown.
func ppid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...
	_, rest, _ := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie is as good as gone.
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// unmountUnder unmounts, deepest first, every mount point under dir.
func unmountUnder(dir string) error {
	ms, err := device.ReadMountInfo("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("listing the mounts under %s: %w", dir, err)
	}
	var points []string
	for _, m := range ms {
		if strings.HasPrefix(m.MountPoint, dir+"/") {
			points = append(points, m.MountPoint)
		}
	}
	slices.SortFunc(points, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	var errs []error
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// CleanupCgroups removes, once the daemon stopped when the test ends, the
// cgroups at paths (paths in the hierarchies, such as
// "/kubepods/besteffort/pod<uid>") with all their descendants, and their
// ancestors, in every mounted cgroup hierarchy (v1 controllers, named and
// unified), leaf first. Only cgroups that do not exist now are removed, so
// nothing that was there before is touched: call it before the daemon
// makes them.
func (d *daemon) CleanupCgroups(t testing.TB, paths ...string) {
	t.Helper()
	if err := d.cleanupCgroups(paths...); err != nil {
		t.Fatal(err)
	}
}

// cleanupCgroups is CleanupCgroups for a daemon started outside a test:
// the cgroups are removed when it stops.
func (d *daemon) cleanupCgroups(paths ...string) error {
	roots, err := cgroup.Hierarchies("")
	if err != nil {
		return fmt.Errorf("listing the cgroup hierarchies: %w", err)
	}
	for _, root := range roots {
		for _, p := range paths {
			for p = path.Clean("/" + p); p != "/"; p = path.Dir(p) {
				dir := filepath.Join(root, p)
				if _, err := os.Stat(dir); err == nil {
					break
				}
				d.cgroups = append(d.cgroups, dir)
			}
		}
	}
	return nil
}

// removeCgroups removes dirs and the cgroups below them, deepest first.
// logf reports the cgroups it leaves because they have others below.
func removeCgroups(dirs []string, logf func(format string, args ...any)) error {
	var all []string
	for _, dir := range dirs {
		_ = filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				all = append(all, p)
			}
			return nil
		})
	}
	slices.SortFunc(all, func(a, b string) int {
		if d := strings.Count(b, "/") - strings.Count(a, "/"); d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	var errs []error
	for _, dir := range slices.Compact(all) {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			// Another test's cgroups below it keep it: not ours to remove.
			if sub, _ := os.ReadDir(dir); slices.ContainsFunc(sub, fs.DirEntry.IsDir) {
				logf("leaving cgroup %s: it has child cgroups", dir)
				continue
			}
			procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w (processes: %q)", dir, err, strings.Fields(string(procs))))
		}
	}
	return errors.Join(errs...)
}

// shimSockets are the sockets that containerd's shims leave in
// /run/containerd/s, a directory containerd 1.6 uses whatever its
// configuration says, as found when a containerd is started.
type shimSockets struct {
	before                    map[string]bool
	dirExisted, parentExisted bool
}

const shimSocketDir, shimSocketParent = "/run/containerd/s", "/run/containerd"

// watchShimSockets records the shim sockets there are now.
func watchShimSockets() shimSockets {
	s := shimSockets{before: map[string]bool{}}
	entries, err := os.ReadDir(shimSocketDir)
	for _, e := range entries {
		s.before[e.Name()] = true
	}
	s.dirExisted = err == nil
	_, err = os.Stat(shimSocketParent)
	s.parentExisted = err == nil
	return s
}

// cleanup removes the sockets that appeared since watchShimSockets and
// that nothing listens on by now, and the directory and /run/containerd
// too if they were not there before and are empty.
func (s shimSockets) cleanup() {
	entries, _ := os.ReadDir(shimSocketDir)
	for _, e := range entries {
		p := filepath.Join(shimSocketDir, e.Name())
		if s.before[e.Name()] || e.Type()&fs.ModeSocket == 0 {
			continue
		}
		if c, err := net.DialTimeout("unix", p, time.Second); err == nil {
			c.Close()
			continue
		}
		_ = os.Remove(p)
	}
	if !s.dirExisted {
		_ = os.Remove(shimSocketDir)
	}
	if !s.parentExisted {
		_ = os.Remove(shimSocketParent)
	}
}

// missingDirs returns those of dirs that do not exist.
func missingDirs(dirs ...string) []string {
	var missing []string
	for _, dir := range dirs {
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, dir)
		}
	}
	return missing
}

// removeEmptyDirs removes each of dirs that is empty, last first.
func removeEmptyDirs(dirs []string) {
	for _, dir := range slices.Backward(dirs) {
		_ = os.Remove(dir)
	}
}
