package cgroup

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// vmGuest is the init of the VM that TestCgroupV2InVM boots: it measures,
// prints its results on the console and powers off. It never returns.
func vmGuest() {
	defer func() {
		if r := recover(); r != nil {
			vmPrint(vmError + fmt.Sprintf("panic: %v: %s", r, debug.Stack()))
		}
		syscall.Sync()
		err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
		// PID 1 exiting panics the kernel; with panic=-1 and qemu's
		// -no-reboot, that too ends the VM.
		vmPrint(vmError + fmt.Sprintf("power off: %v", err))
		os.Exit(1)
	}()
	if err := vmGuestRun(); err != nil {
		vmPrint(vmError + err.Error())
		return
	}
	vmPrint(vmDone)
}

// vmPrint writes one console line in one write, so that kernel messages
// do not split it.
func vmPrint(line string) {
	_, _ = os.Stdout.WriteString(strings.ReplaceAll(line, "\n", " | ") + "\n")
}

// vmReport prints one result for the host: "KDG-RESULT key=value".
func vmReport(key string, value any) {
	if f, ok := value.(float64); ok {
		value = strconv.FormatFloat(f, 'f', 1, 64)
	}
	vmPrint(fmt.Sprintf("%s%s=%v", vmResult, key, value))
}

// vmGuestRun sets the VM up (filesystems, the virtio disk's modules, the
// io controller) and, through the package's Hierarchy, limits a
// container-like cgroup, clears one of its dimensions and caps a kubepods
// tree, measuring the O_DIRECT IO rate of this process in each; then it
// measures two worker processes in two pods below kubepods at once, without
// and with the cap.
func vmGuestRun() error {
	for _, m := range []struct{ source, dir, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2"},
	} {
		if err := syscall.Mount(m.source, m.dir, m.fstype, 0, ""); err != nil {
			return fmt.Errorf("mounting %s at %s: %w", m.fstype, m.dir, err)
		}
	}
	var uts syscall.Utsname
	if err := syscall.Uname(&uts); err == nil {
		vmReport("kernel", cString(uts.Release[:]))
	}
	for _, m := range vmModules {
		if err := vmLoadModule("/modules/" + m + ".ko"); err != nil {
			return err
		}
	}
	dev, err := vmWaitDisk("vda")
	if err != nil {
		return err
	}
	vmReport("disk", dev)

	const root = "/sys/fs/cgroup"
	if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+io"), 0); err != nil {
		return fmt.Errorf("enabling the io controller: %w", err)
	}
	h, err := Open(root, V2)
	if err != nil {
		return err
	}
	disk, err := vmOpenDisk("/dev/vda")
	if err != nil {
		return err
	}
	devs := []device.Device{dev}
	// inCgroup moves this whole process into the cgroup dir (cgroup v2
	// moves all threads of a process together) for the IO that f does.
	inCgroup := func(dir string, f func() error) error {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("moving into %s: %w", dir, err)
		}
		if got, err := h.ProcessDir("", os.Getpid()); err != nil || got != dir {
			return fmt.Errorf("ProcessDir(self) = %q, %v; want %s", got, err, dir)
		}
		ferr := f()
		if err := os.WriteFile(filepath.Join(root, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("moving back to the root cgroup: %w", err)
		}
		return ferr
	}
	// measure reports the IO rate as key, and the rate after the burst
	// as key_steady, for runs long enough to have one.
	measure := func(dir, key string, write bool, n int) error {
		return inCgroup(dir, func() error {
			avg, steady, err := disk.rate(write, n)
			vmReport(key, avg)
			if steady > 0 {
				vmReport(key+"_steady", steady)
			}
			return err
		})
	}
	mkdir := func(path string, enableIO bool) (string, error) {
		dir := h.Join(path)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return "", err
		}
		if enableIO {
			if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+io"), 0); err != nil {
				return "", fmt.Errorf("enabling io below %s: %w", dir, err)
			}
		}
		return dir, nil
	}
	readLimits := func(dir, prefix string) error {
		raw, err := os.ReadFile(filepath.Join(dir, IOMaxFile))
		if err != nil {
			return err
		}
		vmReport(prefix+"_iomax", strings.TrimSpace(string(raw)))
		got, err := h.Read(dir)
		if err != nil {
			return err
		}
		vmReport(prefix+"_read_limit", got[dev].ReadIOPS)
		vmReport(prefix+"_write_limit", got[dev].WriteIOPS)
		return nil
	}
	// limitsOf reports the limits set on dir as key: "none", or by device.
	limitsOf := func(dir, key string) error {
		got, err := h.Read(dir)
		if err != nil {
			return err
		}
		if len(got) == 0 {
			vmReport(key, "none")
		} else {
			vmReport(key, got)
		}
		return nil
	}
	stats := func(dir, prefix string) error {
		s, err := h.Stats(dir, devs)
		if err != nil {
			return err
		}
		vmReport(prefix+"_stat_rios", s[dev].ReadIOs)
		vmReport(prefix+"_stat_wios", s[dev].WriteIOs)
		vmReport(prefix+"_stat_rbytes", s[dev].ReadBytes)
		vmReport(prefix+"_stat_wbytes", s[dev].WriteBytes)
		return nil
	}

	// Unthrottled, in a cgroup without limits. Writing first also
	// allocates the disk image's blocks on the host.
	free, err := mkdir("/free", false)
	if err != nil {
		return err
	}
	if err := measure(free, "free_write_iops", true, vmIOs); err != nil {
		return err
	}
	if err := measure(free, "free_read_iops", false, vmIOs); err != nil {
		return err
	}

	// A container-like cgroup with read and write IOPS limits.
	limited, err := mkdir("/limited", false)
	if err != nil {
		return err
	}
	if changed, err := h.Apply(limited, devs, limits.Limits{ReadIOPS: vmLimit, WriteIOPS: vmLimit}); err != nil || !changed {
		return fmt.Errorf("Apply = %v, %v; want a write", changed, err)
	}
	if err := readLimits(limited, "limited"); err != nil {
		return err
	}
	changed, err := h.Apply(limited, devs, limits.Limits{ReadIOPS: vmLimit, WriteIOPS: vmLimit})
	if err != nil {
		return err
	}
	vmReport("limited_apply_again_changed", changed)
	if err := measure(limited, "limited_read_iops", false, vmThrottledIOs(vmLimit)); err != nil {
		return err
	}
	if err := measure(limited, "limited_write_iops", true, vmThrottledIOs(vmLimit)); err != nil {
		return err
	}
	if err := stats(limited, "limited"); err != nil {
		return err
	}

	// Clearing the read dimension ("riops=max") keeps the write limit.
	if _, err := h.Apply(limited, devs, limits.Limits{WriteIOPS: vmLimit}); err != nil {
		return err
	}
	if err := readLimits(limited, "cleared"); err != nil {
		return err
	}
	if err := measure(limited, "cleared_read_iops", false, vmIOs); err != nil {
		return err
	}
	if err := measure(limited, "cleared_write_iops", true, vmShortIOs); err != nil {
		return err
	}

	// The node-wide cap: a limit on kubepods throttles a pod's container
	// below it, which has no limit of its own.
	if _, err := mkdir("/kubepods", true); err != nil {
		return err
	}
	if _, err := mkdir("/kubepods/besteffort", true); err != nil {
		return err
	}
	pod, err := mkdir("/kubepods/besteffort/pod0", false)
	if err != nil {
		return err
	}
	kubepods, err := h.KubepodsOf(pod)
	if err != nil {
		return err
	}
	if found, err := h.FindKubepods(); err != nil || found != kubepods {
		return fmt.Errorf("FindKubepods = %q, %v; want %s", found, err, kubepods)
	}
	rel, _ := h.Rel(kubepods)
	vmReport("parent_found_kubepods", rel)
	if _, err := h.Apply(kubepods, devs, limits.Limits{ReadIOPS: vmParentCap, WriteIOPS: vmParentCap}); err != nil {
		return err
	}
	if err := readLimits(kubepods, "parent"); err != nil {
		return err
	}
	if err := limitsOf(pod, "parent_pod_limits"); err != nil {
		return err
	}
	if err := measure(pod, "parent_read_iops", false, vmThrottledIOs(vmParentCap)); err != nil {
		return err
	}
	if err := measure(pod, "parent_write_iops", true, vmThrottledIOs(vmParentCap)); err != nil {
		return err
	}
	if err := stats(kubepods, "parent"); err != nil {
		return err
	}

	// The cap holds the pods together: a second pod, in another QoS class,
	// with its own limit far above the cap, and one process in each pod
	// doing IO at the same time.
	if _, err := mkdir("/kubepods/burstable", true); err != nil {
		return err
	}
	pod1, err := mkdir("/kubepods/burstable/pod1", false)
	if err != nil {
		return err
	}
	if _, err := h.Apply(pod1, devs, limits.Limits{ReadIOPS: vmPodOwnLimit, WriteIOPS: vmPodOwnLimit}); err != nil {
		return err
	}
	if err := readLimits(pod1, "together_pod1"); err != nil {
		return err
	}
	pods := []string{pod, pod1}
	// together runs one worker process in each pod (started in it with
	// CLONE_INTO_CGROUP), all doing IO in the same wall-clock window, and
	// reports each pod's rate after the burst, the sum over the whole run
	// and after the burst, and the IOs done.
	together := func(key string, write bool, run time.Duration) error {
		before, err := h.Stats(kubepods, devs)
		if err != nil {
			return err
		}
		counts, window, err := vmTogether(pods, write, run)
		if err != nil {
			return err
		}
		var total, steady int
		for i, c := range counts {
			vmReport(fmt.Sprintf("%s_pod%d_iops_steady", key, i), float64(c.steady)/window.Seconds())
			total += c.total
			steady += c.steady
		}
		vmReport(key+"_iops", float64(total)/run.Seconds())
		vmReport(key+"_iops_steady", float64(steady)/window.Seconds())
		vmReport(key+"_ios", total)
		after, err := h.Stats(kubepods, devs)
		if err != nil {
			return err
		}
		ios := after[dev].ReadIOs - before[dev].ReadIOs
		if write {
			ios = after[dev].WriteIOs - before[dev].WriteIOs
		}
		vmReport(key+"_stat_ios", ios)
		return nil
	}
	// Without the cap, the same two processes go far faster.
	if _, err := h.Clear(kubepods, devs); err != nil {
		return err
	}
	if err := limitsOf(kubepods, "nocap_parent_limits"); err != nil {
		return err
	}
	if err := together("nocap_read", false, vmFreeRun); err != nil {
		return err
	}
	// With it, their sum is the cap.
	if _, err := h.Apply(kubepods, devs, limits.Limits{ReadIOPS: vmParentCap, WriteIOPS: vmParentCap}); err != nil {
		return err
	}
	if err := together("together_read", false, vmThrottledRun); err != nil {
		return err
	}
	return together("together_write", true, vmThrottledRun)
}

// vmWorkerEnv names the environment variable that makes the test binary a
// worker of vmTogether instead of running tests: "read|write,START,SETTLE,END,BASE"
// (wall-clock Unix nanoseconds; BASE is the worker's first disk block).
const vmWorkerEnv = "KDG_VM_WORKER"

// vmWorkerSpan is the number of 4 KiB blocks each worker cycles through.
const vmWorkerSpan = 4096

// vmCount is what one worker did: all its IOs, and those that completed
// in the window after the burst.
type vmCount struct{ total, steady int }

// vmTogether starts one worker process in each cgroup dir, each doing 4 KiB
// O_DIRECT IO on its own part of the disk, one at a time, from the same
// start for run, and returns their counts and the length of the window
// after the burst (from vmSettle to the end).
func vmTogether(dirs []string, write bool, run time.Duration) ([]vmCount, time.Duration, error) {
	start := time.Now().Add(500 * time.Millisecond) // time for the workers to start
	settle, end := start.Add(vmSettle), start.Add(run)
	mode := "read"
	if write {
		mode = "write"
	}
	type worker struct {
		cmd *exec.Cmd
		out bytes.Buffer
	}
	workers := make([]*worker, len(dirs))
	for i, dir := range dirs {
		fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, 0, fmt.Errorf("opening %s: %w", dir, err)
		}
		w := &worker{cmd: exec.Command("/proc/self/exe")}
		w.cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d,%d,%d,%d", vmWorkerEnv, mode,
			start.UnixNano(), settle.UnixNano(), end.UnixNano(), i*vmWorkerSpan))
		w.cmd.Stdout, w.cmd.Stderr = &w.out, &w.out
		w.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
		err = w.cmd.Start()
		syscall.Close(fd)
		if err != nil {
			return nil, 0, fmt.Errorf("starting a worker in %s: %w", dir, err)
		}
		workers[i] = w
	}
	counts := make([]vmCount, len(dirs))
	var errs []error
	for i, w := range workers {
		if err := w.cmd.Wait(); err != nil {
			errs = append(errs, fmt.Errorf("worker in %s: %w: %s", dirs[i], err, strings.TrimSpace(w.out.String())))
			continue
		}
		if _, err := fmt.Sscanf(w.out.String(), "%d %d", &counts[i].total, &counts[i].steady); err != nil {
			errs = append(errs, fmt.Errorf("worker in %s printed %q: %w", dirs[i], w.out.String(), err))
		}
	}
	if time.Now().Before(end) {
		errs = append(errs, errors.New("the workers ended before their window did"))
	}
	return counts, end.Sub(settle), errors.Join(errs...)
}

// vmWorker is a worker process of vmTogether: it waits for the start,
// does IO until the end, prints "TOTAL STEADY" and exits. It never returns.
func vmWorker(spec string) {
	var mode string
	var start, settle, end, base int64
	f := strings.Split(spec, ",")
	if len(f) != 5 {
		fmt.Fprintf(os.Stderr, "bad %s %q\n", vmWorkerEnv, spec)
		os.Exit(2)
	}
	mode = f[0]
	for i, p := range []*int64{&start, &settle, &end, &base} {
		n, err := strconv.ParseInt(f[i+1], 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bad %s %q: %v\n", vmWorkerEnv, spec, err)
			os.Exit(2)
		}
		*p = n
	}
	disk, err := vmOpenDisk("/dev/vda")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	time.Sleep(time.Until(time.Unix(0, start)))
	total, steady := 0, 0
	for i := int64(0); time.Now().UnixNano() < end; i++ {
		off := (base + i%vmWorkerSpan) * 4096
		if err := disk.io(mode == "write", off); err != nil {
			fmt.Fprintf(os.Stderr, "IO %d at %d: %v\n", i, off, err)
			os.Exit(1)
		}
		total++
		if now := time.Now().UnixNano(); now >= settle && now <= end {
			steady++
		}
	}
	fmt.Printf("%d %d\n", total, steady)
	os.Exit(0)
}

// sysFinitModule is finit_module(2) on x86_64, the VM's architecture; the
// syscall package lacks it.
const sysFinitModule = 313

// vmLoadModule loads a kernel module with finit_module(2).
func vmLoadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	params := []byte{0}
	_, _, errno := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&params[0])), 0)
	if errno != 0 && errno != syscall.EEXIST {
		return fmt.Errorf("loading %s: %w", path, errno)
	}
	return nil
}

// vmWaitDisk waits for the block device name to appear and returns its
// number.
func vmWaitDisk(name string) (device.Device, error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := os.ReadFile("/sys/block/" + name + "/dev")
		if err == nil {
			if _, err = os.Stat("/dev/" + name); err == nil {
				return device.Parse(strings.TrimSpace(string(b)))
			}
		}
		if time.Now().After(deadline) {
			return device.Device{}, fmt.Errorf("no disk %s after 20 s: %w", name, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// vmDisk does 4 KiB O_DIRECT IO on a block device.
type vmDisk struct {
	fd  int
	buf []byte // page aligned, as O_DIRECT needs
}

func vmOpenDisk(path string) (*vmDisk, error) {
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	buf, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return nil, err
	}
	copy(buf, slices.Repeat([]byte("kubediskguard "), 4096/14))
	return &vmDisk{fd: fd, buf: buf}, nil
}

// io reads or writes the 4 KiB at off.
func (d *vmDisk) io(write bool, off int64) error {
	var n int
	var err error
	if write {
		n, err = syscall.Pwrite(d.fd, d.buf, off)
	} else {
		n, err = syscall.Pread(d.fd, d.buf, off)
	}
	if err == nil && n != len(d.buf) {
		err = errors.New("short IO")
	}
	return err
}

// rate does n IOs of 4 KiB at increasing offsets and returns the IOs per
// second over the whole run, and over the part of it after its first
// vmSettle, when the throttle admits no more burst (0 for a run too short).
func (d *vmDisk) rate(write bool, n int) (avg, steady float64, err error) {
	done := make([]time.Time, n)
	start := time.Now()
	for i := range n {
		off := int64(i) * 4096
		if err := d.io(write, off); err != nil {
			return 0, 0, fmt.Errorf("IO %d at %d: %w", i, off, err)
		}
		done[i] = time.Now()
	}
	end := done[n-1]
	avg = float64(n) / end.Sub(start).Seconds()
	if k := slices.IndexFunc(done, func(t time.Time) bool { return t.Sub(start) >= vmSettle }); k >= 0 && end.Sub(done[k]) >= time.Second {
		steady = float64(n-1-k) / end.Sub(done[k]).Seconds()
	}
	return avg, steady, nil
}

func cString(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}
