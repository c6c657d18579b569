package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// MountInfoFile is the mountinfo file the resolver reads:
// <ProcRoot>/<PID>/mountinfo.
func (r *Resolver) MountInfoFile() string {
	return filepath.Join(r.procRoot(), r.pid(), "mountinfo")
}

// WatchMounts calls changed each time the mount table of the resolver's
// mount namespace changes (a mount, an unmount, a remount, a mount moved or
// propagated into it), until ctx is done. The kernel signals POLLPRI and
// POLLERR on an open mountinfo file for every change of its namespace
// (proc(5)); several changes in a row may be reported once. In a
// DaemonSet, the applier's own namespace sees the host's mounts at the data
// mount through its HostToContainer propagation.
//
// It returns nil when ctx is done, and an error when the file cannot be
// opened or polled.
func (r *Resolver) WatchMounts(ctx context.Context, changed func()) error {
	path := r.MountInfoFile()
	// A raw descriptor, not an *os.File: Go's poller would register it
	// with epoll, whose own polls consume the change before ours sees it.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("watching mounts: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	defer unix.Close(fd)
	// A pipe whose write end is closed when ctx is done wakes the poll.
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("watching mounts: pipe: %w", err)
	}
	defer unix.Close(wake[0])
	stop := context.AfterFunc(ctx, func() { unix.Close(wake[1]) })
	defer func() {
		if stop() { // ctx not done: the write end is still open
			unix.Close(wake[1])
		}
	}()
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}, {Fd: int32(wake[0]), Events: unix.POLLIN}}
		_, err := unix.Poll(fds, -1)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("watching mounts: polling %s: %w", path, err)
		case fds[1].Revents != 0:
			return nil
		case fds[0].Revents&unix.POLLNVAL != 0:
			return fmt.Errorf("watching mounts: polling %s: invalid file", path)
		case fds[0].Revents&(unix.POLLPRI|unix.POLLERR) != 0:
			changed()
		}
	}
}
