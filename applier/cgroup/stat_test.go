package cgroup

import (
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/device"
)

// The files as this machine's kernel writes them.
const (
	v1Serviced = `254:0 Read 130
254:0 Write 100
254:0 Sync 230
254:0 Async 0
254:0 Discard 0
254:0 Total 230
259:0 Read 7
259:0 Write 8
259:0 Total 15
Total 245
`
	v1Bytes = `254:0 Read 532480
254:0 Write 409600
254:0 Sync 942080
254:0 Async 0
254:0 Discard 0
254:0 Total 942080
Total 942080
`
	v2IOStat = `254:0 rbytes=532480 wbytes=409600 rios=130 wios=100 dbytes=0 dios=0
259:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6 cost.vrate=100.00
`
)

func TestStats(t *testing.T) {
	sda := device.Device{Major: 8, Minor: 0}
	tests := map[string]struct {
		version     Version
		noRecursive bool // an old kernel without the _recursive files
		files       map[string]string
		devices     []device.Device
		want        map[device.Device]IOStat
		wantErr     string
	}{
		"v1 reads the recursive files, filtered to the data devices": {
			version: V1,
			files: map[string]string{
				"blkio.throttle.io_serviced_recursive":      v1Serviced,
				"blkio.throttle.io_service_bytes_recursive": v1Bytes,
				"blkio.throttle.io_serviced":                "254:0 Read 1\n",
			},
			devices: []device.Device{vda},
			want:    map[device.Device]IOStat{vda: {ReadBytes: 532480, WriteBytes: 409600, ReadIOs: 130, WriteIOs: 100}},
		},
		"v1 falls back to the plain files on kernels without recursive ones": {
			version:     V1,
			noRecursive: true,
			files: map[string]string{
				"blkio.throttle.io_serviced":      v1Serviced,
				"blkio.throttle.io_service_bytes": v1Bytes,
			},
			devices: []device.Device{vda, nvme0},
			want: map[device.Device]IOStat{
				vda:   {ReadBytes: 532480, WriteBytes: 409600, ReadIOs: 130, WriteIOs: 100},
				nvme0: {ReadIOs: 7, WriteIOs: 8},
			},
		},
		"v1 without devices returns every device": {
			version: V1,
			files: map[string]string{
				"blkio.throttle.io_serviced_recursive":      v1Serviced,
				"blkio.throttle.io_service_bytes_recursive": v1Bytes,
			},
			want: map[device.Device]IOStat{
				vda:   {ReadBytes: 532480, WriteBytes: 409600, ReadIOs: 130, WriteIOs: 100},
				nvme0: {ReadIOs: 7, WriteIOs: 8},
			},
		},
		"a data device without IO has zero counters": {
			version: V1,
			files: map[string]string{
				"blkio.throttle.io_serviced_recursive":      "Total 0\n",
				"blkio.throttle.io_service_bytes_recursive": "Total 0\n",
			},
			devices: []device.Device{sda},
			want:    map[device.Device]IOStat{sda: {}},
		},
		"v1 garbage is an error naming the file": {
			version: V1,
			files: map[string]string{
				"blkio.throttle.io_serviced_recursive": "254:0 Read many\n",
			},
			wantErr: "blkio.throttle.io_serviced_recursive: line 1",
		},
		"v2 reads io.stat, filtered to the data devices": {
			version: V2,
			files:   map[string]string{"io.stat": v2IOStat},
			devices: []device.Device{nvme0, sda},
			want:    map[device.Device]IOStat{nvme0: {ReadBytes: 1, WriteBytes: 2, ReadIOs: 3, WriteIOs: 4}, sda: {}},
		},
		"v2 garbage is an error naming the file": {
			version: V2,
			files:   map[string]string{"io.stat": "254:0 rios=x\n"},
			wantErr: `io.stat: line 1 "254:0 rios=x": rios value "x" is not a number`,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			h, _ := newHierarchy(t, tc.version)
			dir := mkCgroup(t, h, ctrPath)
			if tc.noRecursive {
				for _, f := range []string{"blkio.throttle.io_serviced_recursive", "blkio.throttle.io_service_bytes_recursive"} {
					if err := os.Remove(filepath.Join(dir, f)); err != nil {
						t.Fatal(err)
					}
				}
			}
			for f, c := range tc.files {
				write(t, filepath.Join(dir, f), c)
			}
			got, err := h.Stats(dir, tc.devices)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Stats = %v, %v; want an error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !maps.Equal(got, tc.want) {
				t.Fatalf("Stats = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}
