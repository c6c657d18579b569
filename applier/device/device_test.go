package device

import (
	"strings"
	"testing"
)

// mkdev is the inverse of FromRdev: glibc's makedev.
func mkdev(major, minor uint32) uint64 {
	ma, mi := uint64(major), uint64(minor)
	return mi&0xff | (ma&0xfff)<<8 | (mi&^0xff)<<12 | (ma&^0xfff)<<32
}

func TestDeviceStringAndParse(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Device
		wantErr string
	}{
		"parses a virtio disk":              {in: "254:0", want: Device{254, 0}},
		"parses an NVMe partition":          {in: "259:3", want: Device{259, 3}},
		"parses the largest numbers":        {in: "4294967295:4294967295", want: Device{1<<32 - 1, 1<<32 - 1}},
		"rejects a missing colon":           {in: "2540", wantErr: "want MAJOR:MINOR"},
		"rejects a negative minor":          {in: "254:-1", wantErr: "decimal"},
		"rejects a device path":             {in: "/dev/vda", wantErr: "want MAJOR:MINOR"},
		"rejects a number beyond 32 bits":   {in: "4294967296:0", wantErr: "decimal"},
		"rejects spaces around the numbers": {in: " 254:0", wantErr: "decimal"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := Parse(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse(%q) = %v, %v; want an error containing %q", tc.in, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Parse(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
			if got.String() != tc.in {
				t.Errorf("String() = %q, want %q", got.String(), tc.in)
			}
		})
	}
}

func TestFromRdev(t *testing.T) {
	for _, d := range []Device{{254, 0}, {259, 3}, {8, 17}, {253, 300}, {4095, 255}, {4096, 256}, {1<<32 - 1, 1<<20 - 1}} {
		if got := FromRdev(mkdev(d.Major, d.Minor)); got != d {
			t.Errorf("FromRdev(makedev(%v)) = %v", d, got)
		}
	}
	// The well-known encoding of 8:1 (sda1) and 259:0 (nvme0n1).
	if got := FromRdev(0x801); got != (Device{8, 1}) {
		t.Errorf("FromRdev(0x801) = %v, want 8:1", got)
	}
	if got := FromRdev(0x10300); got != (Device{259, 0}) {
		t.Errorf("FromRdev(0x10300) = %v, want 259:0", got)
	}
}
