package device

import (
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Mount
		wantErr string
	}{
		"parses a line without optional fields": {
			in:   "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
			want: Mount{ID: 27, Parent: 1, Device: Device{254, 0}, Root: "/", MountPoint: "/", FSType: "ext4", Source: "/dev/vda"},
		},
		"parses a line with several optional fields": {
			in:   "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue",
			want: Mount{ID: 36, Parent: 35, Device: Device{98, 0}, Root: "/mnt1", MountPoint: "/mnt2", FSType: "ext3", Source: "/dev/root"},
		},
		"unescapes a space, a tab, a newline and a backslash": {
			in:   `40 27 259:1 / /mnt/my\040disk\011a\012b\134c rw - xfs /dev/disk/by-label/my\040disk rw`,
			want: Mount{ID: 40, Parent: 27, Device: Device{259, 1}, Root: "/", MountPoint: "/mnt/my disk\ta\nb\\c", FSType: "xfs", Source: "/dev/disk/by-label/my disk"},
		},
		"keeps a backslash that starts no escape": {
			in:   `41 27 259:1 / /mnt/a\x rw - xfs /dev/nvme0n1p1 rw`,
			want: Mount{ID: 41, Parent: 27, Device: Device{259, 1}, Root: "/", MountPoint: `/mnt/a\x`, FSType: "xfs", Source: "/dev/nvme0n1p1"},
		},
		"rejects a line without the separator": {
			in:      "27 1 254:0 / / rw,relatime ext4 /dev/vda rw",
			wantErr: "separator",
		},
		"rejects a bad device number": {
			in:      "27 1 vda / / rw - ext4 /dev/vda rw",
			wantErr: "MAJOR:MINOR",
		},
		"rejects a bad mount ID": {
			in:      "x 1 254:0 / / rw - ext4 /dev/vda rw",
			wantErr: "mount ID",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseMountInfo(strings.NewReader(tc.in + "\n"))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "line 1") {
					t.Fatalf("got %v, %v; want an error on line 1 containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || len(got) != 1 || got[0] != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}
