package device

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// hostRoot writes the mountinfo of the host's init (<ProcRoot>/1) with its
// root filesystem on source and device dev.
func hostRoot(t *testing.T, r *Resolver, line string) {
	t.Helper()
	dir := filepath.Join(r.ProcRoot, "1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "mountinfo"), []byte(line+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	rootOnVda     = "1 0 254:0 / / rw,relatime - ext4 /dev/vda rw"
	rootOnOverlay = "1 0 0:50 / / rw - overlay overlay rw,lowerdir=/l"
)

func TestDataDisk(t *testing.T) {
	tests := map[string]struct {
		settings Settings
		hostRoot string // the mountinfo of <ProcRoot>/1; "" for none
		want     DataDisk
		waiting  bool     // the error is ErrNoDataDisk
		wantErr  []string // the error contains these
	}{
		"a partition mounted at the data mount is limited as its whole disk": {
			settings: Settings{Mount: "/data"}, hostRoot: rootOnVda,
			want: DataDisk{Devices: []Device{{259, 0}}, Source: "/data"},
		},
		"the top of stacked mounts at the data mount is the data disk": {
			settings: Settings{Mount: "/later"}, hostRoot: rootOnVda,
			want: DataDisk{Devices: []Device{{259, 0}}, Source: "/later"},
		},
		"a directory on the root filesystem is not a data disk: waited for": {
			settings: Settings{Mount: "/datab"}, hostRoot: rootOnVda, waiting: true,
			wantErr: []string{"/datab is not a mount point", "mounted at /", "DATA_ALLOW_ROOT_DISK=true"},
		},
		"a directory below a data disk's mount point is not a mount point: waited for": {
			settings: Settings{Mount: "/data/app"}, hostRoot: rootOnVda, waiting: true,
			wantErr: []string{"/data/app is not a mount point", "mounted at /data"},
		},
		"a bind mount of a directory of the root disk is not a data disk: waited for": {
			settings: Settings{Mount: "/bound"}, hostRoot: rootOnVda, waiting: true,
			wantErr: []string{"/bound", "on the root disk 254:0", "root /var/tmp/data", "DATA_ALLOW_ROOT_DISK=true"},
		},
		"a filesystem without a block device at the data mount is waited for": {
			settings: Settings{Mount: "/tmp"}, hostRoot: rootOnVda, waiting: true,
			wantErr: []string{"/tmp holds a tmpfs filesystem", "no block device"},
		},
		"DATA_ALLOW_ROOT_DISK limits the root disk under a plain directory": {
			settings: Settings{Mount: "/datab", AllowRootDisk: true},
			want:     DataDisk{Devices: []Device{{254, 0}}, Source: "/datab"},
		},
		"DATA_ALLOW_ROOT_DISK limits the disk of a directory below a mount": {
			settings: Settings{Mount: "/data/app", AllowRootDisk: true},
			want:     DataDisk{Devices: []Device{{259, 0}}, Source: "/data/app"},
		},
		"listed devices are limited as they are, the root disk too": {
			settings: Settings{Mount: "/datab", Devices: " /dev/vda, 259:1 "},
			want:     DataDisk{Devices: []Device{{254, 0}, {259, 0}}, Source: "DATA_DEVICES=/dev/vda, 259:1"},
		},
		"a host root without a block device makes no disk the root disk": {
			settings: Settings{Mount: "/bound"}, hostRoot: rootOnOverlay,
			want: DataDisk{Devices: []Device{{254, 0}}, Source: "/bound"},
		},
		"a root disk that cannot be read is an error, not a fallback": {
			settings: Settings{Mount: "/data"},
			wantErr:  []string{"telling whether /data is on the root disk", "DATA_ALLOW_ROOT_DISK=true", "1/mountinfo"},
		},
		"a data mount that does not exist is an error, not waited for": {
			settings: Settings{Mount: "/nonexistent"}, hostRoot: rootOnVda,
			wantErr: []string{"mount path /nonexistent", "no such file"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := fakeNode(t)
			if tc.hostRoot != "" {
				hostRoot(t, r, tc.hostRoot)
			}
			got, err := r.DataDisk(tc.settings)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("DataDisk(%+v) = %v, want an error", tc.settings, got)
				}
				if errors.Is(err, ErrNoDataDisk) != tc.waiting {
					t.Errorf("DataDisk(%+v) error %q: errors.Is(ErrNoDataDisk) = %t, want %t", tc.settings, err, !tc.waiting, tc.waiting)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("DataDisk(%+v) error %q does not contain %q", tc.settings, err, w)
					}
				}
				return
			}
			if err != nil || !got.Equal(tc.want) {
				t.Fatalf("DataDisk(%+v) = %v, %v; want %v", tc.settings, got, err, tc.want)
			}
		})
	}
}

func TestDataDiskString(t *testing.T) {
	tests := map[string]struct {
		disk DataDisk
		want string
	}{
		"names a mounted disk and its mount point": {DataDisk{Devices: []Device{{259, 0}}, Source: "/data"}, "259:0 (/data)"},
		"names listed devices and the list": {
			DataDisk{Devices: []Device{{259, 0}, {253, 0}}, Source: "DATA_DEVICES=/dev/nvme0n1,253:0"}, "259:0, 253:0 (DATA_DEVICES=/dev/nvme0n1,253:0)",
		},
		"says when there is no device": {DataDisk{}, "no device"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := tc.disk.String(); got != tc.want {
				t.Errorf("String() = %q, want %q", got, tc.want)
			}
		})
	}
}
