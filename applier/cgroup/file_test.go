package cgroup

import (
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

const ctrPath = "/kubepods/besteffort/pod1/ctr1"

func TestApplyAndRead(t *testing.T) {
	tests := map[string]struct {
		version Version
		before  map[string]string // file → contents before
		devices []device.Device
		limits  limits.Limits
		files   map[string]string // file → contents after
		writes  []string
	}{
		"v1 writes one line per limited dimension": {
			version: V1,
			devices: []device.Device{vda},
			limits:  limits.Limits{ReadIOPS: 500, WriteIOPS: 500, WriteBPS: 52428800},
			files: map[string]string{
				"blkio.throttle.read_iops_device":  "254:0 500\n",
				"blkio.throttle.write_iops_device": "254:0 500\n",
				"blkio.throttle.read_bps_device":   "",
				"blkio.throttle.write_bps_device":  "254:0 52428800\n",
			},
			writes: []string{
				"blkio.throttle.read_iops_device: 254:0 500",
				"blkio.throttle.write_iops_device: 254:0 500",
				"blkio.throttle.write_bps_device: 254:0 52428800",
			},
		},
		"v1 clears a dimension by writing 0, and leaves other devices alone": {
			version: V1,
			before: map[string]string{
				"blkio.throttle.read_iops_device":  "254:0 500\n259:0 9\n",
				"blkio.throttle.write_iops_device": "254:0 500\n",
			},
			devices: []device.Device{vda},
			limits:  limits.Limits{WriteIOPS: 500},
			files: map[string]string{
				"blkio.throttle.read_iops_device":  "259:0 9\n",
				"blkio.throttle.write_iops_device": "254:0 500\n",
			},
			writes: []string{"blkio.throttle.read_iops_device: 254:0 0"},
		},
		"v1 limits every data device": {
			version: V1,
			devices: []device.Device{vda, nvme0},
			limits:  limits.Limits{ReadIOPS: 100},
			files: map[string]string{
				"blkio.throttle.read_iops_device": "254:0 100\n259:0 100\n",
			},
			writes: []string{
				"blkio.throttle.read_iops_device: 254:0 100",
				"blkio.throttle.read_iops_device: 259:0 100",
			},
		},
		"v2 writes one io.max line with every dimension": {
			version: V2,
			devices: []device.Device{vda},
			limits:  limits.Limits{ReadIOPS: 500, WriteBPS: 52428800},
			files:   map[string]string{"io.max": "254:0 rbps=max wbps=52428800 riops=500 wiops=max\n"},
			writes:  []string{"io.max: 254:0 riops=500 wiops=max rbps=max wbps=52428800"},
		},
		"v2 clears one dimension with max without touching the others or other devices": {
			version: V2,
			before: map[string]string{
				"io.max": "254:0 rbps=max wbps=52428800 riops=500 wiops=max\n259:0 rbps=1 wbps=max riops=max wiops=max\n",
			},
			devices: []device.Device{vda},
			limits:  limits.Limits{WriteBPS: 52428800},
			files: map[string]string{
				"io.max": "254:0 rbps=max wbps=52428800 riops=max wiops=max\n259:0 rbps=1 wbps=max riops=max wiops=max\n",
			},
			writes: []string{"io.max: 254:0 riops=max wiops=max rbps=max wbps=52428800"},
		},
		"v2 clearing every dimension removes the device's line": {
			version: V2,
			before:  map[string]string{"io.max": "254:0 rbps=max wbps=max riops=500 wiops=max\n"},
			devices: []device.Device{vda},
			limits:  limits.Limits{},
			files:   map[string]string{"io.max": ""},
			writes:  []string{"io.max: 254:0 riops=max wiops=max rbps=max wbps=max"},
		},
		"v2 limits every data device": {
			version: V2,
			devices: []device.Device{vda, nvme0},
			limits:  limits.Limits{WriteIOPS: 7},
			files:   map[string]string{"io.max": "254:0 rbps=max wbps=max riops=max wiops=7\n259:0 rbps=max wbps=max riops=max wiops=7\n"},
			writes: []string{
				"io.max: 254:0 riops=max wiops=7 rbps=max wbps=max",
				"io.max: 259:0 riops=max wiops=7 rbps=max wbps=max",
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			h, k := newHierarchy(t, tc.version)
			dir := mkCgroup(t, h, ctrPath)
			for f, c := range tc.before {
				write(t, filepath.Join(dir, f), c)
			}
			changed, err := h.Apply(dir, tc.devices, tc.limits)
			if err != nil || !changed {
				t.Fatalf("Apply = %v, %v; want changed", changed, err)
			}
			if !slices.Equal(k.writes, tc.writes) {
				t.Errorf("writes:\n  %s\nwant:\n  %s", strings.Join(k.writes, "\n  "), strings.Join(tc.writes, "\n  "))
			}
			for f, want := range tc.files {
				if got := read(t, filepath.Join(dir, f)); got != want {
					t.Errorf("%s = %q, want %q", f, got, want)
				}
			}
			got, err := h.Read(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range tc.devices {
				if got[d] != tc.limits {
					t.Errorf("Read()[%v] = %v, want %v", d, got[d], tc.limits)
				}
			}

			// Applying the same limits again writes nothing.
			k.writes = nil
			changed, err = h.Apply(dir, tc.devices, tc.limits)
			if err != nil || changed || len(k.writes) != 0 {
				t.Errorf("second Apply = %v, %v with writes %q; want no change and no write", changed, err, k.writes)
			}
		})
	}
}

// TestApplySkipsUnchangedFiles proves with the real writer that a file
// already holding the desired value is not written: its modification time
// stays in the past.
func TestApplySkipsUnchangedFiles(t *testing.T) {
	tests := map[string]struct {
		version Version
		content map[string]string
		limits  limits.Limits
	}{
		"v1 files that hold the limits are not written": {
			version: V1,
			content: map[string]string{
				"blkio.throttle.read_iops_device":  "254:0 500\n",
				"blkio.throttle.write_iops_device": "254:0 500\n259:0 3\n",
			},
			limits: limits.Limits{ReadIOPS: 500, WriteIOPS: 500},
		},
		"v1 files without a device's line are not written to clear it": {
			version: V1,
			content: map[string]string{"blkio.throttle.read_iops_device": "259:0 3\n"},
			limits:  limits.Limits{},
		},
		"v2 io.max in the kernel's key order is not written": {
			version: V2,
			content: map[string]string{"io.max": "254:0 rbps=max wbps=52428800 riops=500 wiops=max\n"},
			limits:  limits.Limits{ReadIOPS: 500, WriteBPS: 52428800},
		},
		"v2 io.max without the device is not written to clear it": {
			version: V2,
			content: map[string]string{"io.max": "259:0 rbps=max wbps=max riops=1 wiops=max\n"},
			limits:  limits.Limits{},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			h, _ := newHierarchy(t, tc.version)
			h.write = writeCgroupFile // the real writer
			dir := mkCgroup(t, h, ctrPath)
			old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
			files, _ := os.ReadDir(dir)
			for _, f := range files {
				p := filepath.Join(dir, f.Name())
				write(t, p, tc.content[f.Name()])
				if err := os.Chtimes(p, old, old); err != nil {
					t.Fatal(err)
				}
			}
			changed, err := h.Apply(dir, []device.Device{vda}, tc.limits)
			if err != nil || changed {
				t.Fatalf("Apply = %v, %v; want no change", changed, err)
			}
			for _, f := range files {
				fi, err := os.Stat(filepath.Join(dir, f.Name()))
				if err != nil {
					t.Fatal(err)
				}
				if !fi.ModTime().Equal(old) {
					t.Errorf("%s was written (modified %v)", f.Name(), fi.ModTime())
				}
			}
		})
	}
}

func TestWriterWritesTheValueAlone(t *testing.T) {
	h, _ := newHierarchy(t, V1)
	h.write = writeCgroupFile
	dir := mkCgroup(t, h, ctrPath)
	write(t, filepath.Join(dir, V1File(limits.ReadIOPS)), "259:0 1234567890\n")
	if _, err := h.Apply(dir, []device.Device{vda}, limits.Limits{ReadIOPS: 50}); err != nil {
		t.Fatal(err)
	}
	// A plain file shows exactly what was written: one line without a
	// newline, replacing what was there (the kernel would merge it).
	if got := read(t, filepath.Join(dir, V1File(limits.ReadIOPS))); got != "254:0 50" {
		t.Errorf("wrote %q, want %q", got, "254:0 50")
	}
}

func TestApplyErrors(t *testing.T) {
	h, k := newHierarchy(t, V1)
	dir := mkCgroup(t, h, ctrPath)

	t.Run("a cgroup that does not exist is ErrCgroupGone and is not created", func(t *testing.T) {
		gone := h.Join("/kubepods/besteffort/pod1/exited")
		changed, err := h.Apply(gone, []device.Device{vda}, limits.Limits{ReadIOPS: 5})
		if !errors.Is(err, ErrCgroupGone) || changed {
			t.Fatalf("Apply = %v, %v; want ErrCgroupGone", changed, err)
		}
		if !strings.Contains(err.Error(), `writing "254:0 5" to `+gone+"/blkio.throttle.read_iops_device") {
			t.Errorf("error %q does not say what was written where", err)
		}
		if _, err := os.Stat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Apply created %s", gone)
		}
		if _, err := h.Read(gone); !errors.Is(err, ErrCgroupGone) {
			t.Errorf("Read = %v, want ErrCgroupGone", err)
		}
		if _, err := h.Stats(gone, nil); !errors.Is(err, ErrCgroupGone) {
			t.Errorf("Stats = %v, want ErrCgroupGone", err)
		}
	})

	t.Run("a cgroup removed between the read and the write is ErrCgroupGone", func(t *testing.T) {
		racy := mkCgroup(t, h, "/kubepods/besteffort/pod1/racy")
		k.before = func(string) {
			if err := os.RemoveAll(racy); err != nil {
				t.Fatal(err)
			}
		}
		defer func() { k.before = nil }()
		_, err := h.Apply(racy, []device.Device{vda}, limits.Limits{ReadIOPS: 5})
		if !errors.Is(err, ErrCgroupGone) {
			t.Fatalf("Apply = %v, want ErrCgroupGone", err)
		}
	})

	t.Run("a directory outside the hierarchy is refused", func(t *testing.T) {
		k.writes = nil
		outside := filepath.Join(filepath.Dir(h.Dir()), "cpu")
		_, err := h.Apply(outside, []device.Device{vda}, limits.Limits{ReadIOPS: 5})
		if err == nil || !strings.Contains(err.Error(), "not a cgroup directory in the hierarchy") || errors.Is(err, ErrCgroupGone) {
			t.Fatalf("Apply = %v, want a refusal", err)
		}
		if len(k.writes) != 0 {
			t.Errorf("wrote %q", k.writes)
		}
	})

	t.Run("a write the kernel refuses is wrapped with the value and the file", func(t *testing.T) {
		k.fail = map[string]error{"254:0 5": syscall.ENODEV}
		defer func() { k.fail = nil }()
		changed, err := h.Apply(dir, []device.Device{vda}, limits.Limits{ReadIOPS: 5, WriteIOPS: 6})
		want := `writing "254:0 5" to ` + filepath.Join(dir, "blkio.throttle.read_iops_device") + ": no such device"
		if err == nil || err.Error() != want {
			t.Fatalf("Apply error = %v, want %q", err, want)
		}
		if !errors.Is(err, syscall.ENODEV) || errors.Is(err, ErrCgroupGone) {
			t.Errorf("error %v should wrap ENODEV and not be ErrCgroupGone", err)
		}
		// The other dimension was still applied.
		if got, _ := h.Read(dir); got[vda] != (limits.Limits{WriteIOPS: 6}) || !changed {
			t.Errorf("after a failed write, Read = %v, changed = %v; want write-iops applied", got, changed)
		}
	})

	t.Run("a missing controller file in an existing cgroup is not ErrCgroupGone", func(t *testing.T) {
		bare := h.Join("/no-files")
		if err := os.Mkdir(bare, 0o755); err != nil {
			t.Fatal(err)
		}
		_, err := h.Apply(bare, []device.Device{vda}, limits.Limits{ReadIOPS: 5})
		if err == nil || errors.Is(err, ErrCgroupGone) || !errors.Is(err, os.ErrNotExist) ||
			!strings.Contains(err.Error(), "is the block IO controller enabled") {
			t.Fatalf("Apply = %v, want a missing-file error that is not ErrCgroupGone", err)
		}
	})

	t.Run("garbage in a throttle file is an error naming it", func(t *testing.T) {
		write(t, filepath.Join(dir, "blkio.throttle.write_bps_device"), "garbage\n")
		_, err := h.Apply(dir, []device.Device{vda}, limits.Limits{})
		if err == nil || !strings.Contains(err.Error(), "blkio.throttle.write_bps_device: parsing its current contents") {
			t.Fatalf("Apply = %v, want a parse error", err)
		}
		if _, err := h.Read(dir); err == nil || !strings.Contains(err.Error(), "parsing "+filepath.Join(dir, "blkio.throttle.write_bps_device")) {
			t.Fatalf("Read = %v, want a parse error", err)
		}
	})
}

func TestClear(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String()+" clear removes every limit of the devices only", func(t *testing.T) {
			h, _ := newHierarchy(t, v)
			dir := mkCgroup(t, h, ctrPath)
			other := device.Device{Major: 8, Minor: 0}
			l := limits.Limits{ReadIOPS: 1, WriteIOPS: 2, ReadBPS: 3, WriteBPS: 4}
			if _, err := h.Apply(dir, []device.Device{vda, nvme0, other}, l); err != nil {
				t.Fatal(err)
			}
			if changed, err := h.Clear(dir, []device.Device{vda, nvme0}); err != nil || !changed {
				t.Fatalf("Clear = %v, %v", changed, err)
			}
			got, err := h.Read(dir)
			if err != nil {
				t.Fatal(err)
			}
			if want := map[device.Device]limits.Limits{other: l}; !maps.Equal(got, want) {
				t.Errorf("Read = %v, want %v", got, want)
			}
		})
	}
}
