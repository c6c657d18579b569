package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Apply sets the limits l for each device on the cgroup directory dir (as
// ProcessDir, SpecDir, DockerDir, KubepodsOf or Join return it); an
// unlimited dimension clears that dimension's limit. Only values that differ from the files' current
// contents are written; changed reports whether anything was. A directory
// that does not exist is ErrCgroupGone: Apply never creates cgroups. Other
// failed writes do not stop the rest; their errors are joined.
func (h *Hierarchy) Apply(dir string, devices []device.Device, l limits.Limits) (changed bool, err error) {
	var errs []error
	for _, dev := range devices {
		t := Throttle{Device: dev, Limits: l}
		if h.version == V2 {
			c, err := h.writeIfChanged(dir, IOMaxFile, t.V2Line(), func(current string) (bool, error) {
				now, err := ParseIOMax(current)
				return now[dev] == l, err
			})
			changed = changed || c
			if err != nil {
				if errors.Is(err, ErrCgroupGone) {
					return changed, err
				}
				errs = append(errs, err)
			}
			continue
		}
		for _, d := range limits.Dimensions {
			want := l.Get(d)
			c, err := h.writeIfChanged(dir, V1File(d), t.V1Line(d), func(current string) (bool, error) {
				now, err := ParseV1File(current)
				return now[dev] == want, err
			})
			changed = changed || c
			if err != nil {
				if errors.Is(err, ErrCgroupGone) {
					return changed, err
				}
				errs = append(errs, err)
			}
		}
	}
	return changed, errors.Join(errs...)
}

// Clear removes every limit of the devices from the cgroup directory dir;
// it is Apply with unlimited limits.
func (h *Hierarchy) Clear(dir string, devices []device.Device) (changed bool, err error) {
	return h.Apply(dir, devices, limits.Limits{})
}

// Read returns the limits currently set on the cgroup directory dir, by
// device; devices without any limit are absent.
func (h *Hierarchy) Read(dir string) (map[device.Device]limits.Limits, error) {
	if h.version == V2 {
		content, err := h.readFile(dir, IOMaxFile)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", filepath.Join(dir, IOMaxFile), err)
		}
		out, err := ParseIOMax(content)
		if err != nil {
			return nil, fmt.Errorf("parsing %s: %w", filepath.Join(dir, IOMaxFile), err)
		}
		return out, nil
	}
	out := map[device.Device]limits.Limits{}
	for _, d := range limits.Dimensions {
		content, err := h.readFile(dir, V1File(d))
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", filepath.Join(dir, V1File(d)), err)
		}
		values, err := ParseV1File(content)
		if err != nil {
			return nil, fmt.Errorf("parsing %s: %w", filepath.Join(dir, V1File(d)), err)
		}
		for dev, v := range values {
			l := out[dev]
			l.Set(d, v)
			out[dev] = l
		}
	}
	return out, nil
}

// writeIfChanged is the one place that writes cgroup files. It writes value
// to the file name in the cgroup directory dir unless isSet, given the
// file's current contents, reports that the file already holds it, and
// reports whether it wrote.
func (h *Hierarchy) writeIfChanged(dir, name, value string, isSet func(current string) (bool, error)) (bool, error) {
	dir = filepath.Clean(dir)
	path := filepath.Join(dir, name)
	if dir == h.dir {
		// Every process of the host not in a cgroup of its own lives here
		// (an exited one too): limiting it is never what was meant.
		return false, fmt.Errorf("writing %q to %s: refusing to limit the root cgroup", value, path)
	}
	current, err := h.readFile(dir, name)
	if err != nil {
		return false, fmt.Errorf("writing %q to %s: %w", value, path, err)
	}
	if set, err := isSet(current); err != nil {
		return false, fmt.Errorf("writing %q to %s: parsing its current contents: %w", value, path, err)
	} else if set {
		return false, nil
	}
	if err := h.write(path, value); err != nil {
		return false, fmt.Errorf("writing %q to %s: %w", value, path, goneOr(dir, bare(err)))
	}
	return true, nil
}

// readFile reads the file name of the cgroup directory dir. Its errors do
// not name the file; the callers' do.
func (h *Hierarchy) readFile(dir, name string) (string, error) {
	dir, err := h.cgroupDir(dir)
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return "", goneOr(dir, bare(err))
	}
	return string(b), nil
}

// cgroupDir cleans dir and checks that it is in the hierarchy.
func (h *Hierarchy) cgroupDir(dir string) (string, error) {
	dir = filepath.Clean(dir)
	if _, err := h.Rel(dir); err != nil {
		return "", err
	}
	return dir, nil
}

// goneOr returns ErrCgroupGone, naming dir, when dir no longer exists, and
// err otherwise. A file that is missing from an existing cgroup directory
// is not ErrCgroupGone: the controller is not enabled there.
func goneOr(dir string, err error) error {
	if _, serr := os.Stat(dir); errors.Is(serr, os.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrCgroupGone, dir)
	}
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w (is the block IO controller enabled for %s?)", err, dir)
	}
	return err
}

// writeCgroupFile writes value to an existing cgroup file in one write(2), as
// cgroup files require; it never creates the file.
func writeCgroupFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_, err = f.Write([]byte(value))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// bare strips the *os.PathError of file operations whose path the caller's
// message already names.
func bare(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
