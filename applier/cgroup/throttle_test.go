package cgroup

import (
	"maps"
	"strings"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

func TestThrottleRendering(t *testing.T) {
	tests := map[string]struct {
		throttle Throttle
		v1       [4]string // by dimension: read-iops, write-iops, read-bps, write-bps
		v2       string
	}{
		"an IOPS limit and a bytes limit render with max for the rest": {
			throttle: Throttle{vda, limits.Limits{ReadIOPS: 500, WriteBPS: 52428800}},
			v1:       [4]string{"254:0 500", "254:0 0", "254:0 0", "254:0 52428800"},
			v2:       "254:0 riops=500 wiops=max rbps=max wbps=52428800",
		},
		"no limits render as clearing every dimension": {
			throttle: Throttle{nvme0, limits.Limits{}},
			v1:       [4]string{"259:0 0", "259:0 0", "259:0 0", "259:0 0"},
			v2:       "259:0 riops=max wiops=max rbps=max wbps=max",
		},
		"all four dimensions render": {
			throttle: Throttle{device.Device{Major: 8, Minor: 16}, limits.Limits{ReadIOPS: 1, WriteIOPS: limits.MaxIOPS, ReadBPS: 1 << 40, WriteBPS: 1<<64 - 1}},
			v1:       [4]string{"8:16 1", "8:16 4294967295", "8:16 1099511627776", "8:16 18446744073709551615"},
			v2:       "8:16 riops=1 wiops=4294967295 rbps=1099511627776 wbps=18446744073709551615",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for i, d := range limits.Dimensions {
				if got := tc.throttle.V1Line(d); got != tc.v1[i] {
					t.Errorf("V1Line(%v) = %q, want %q", d, got, tc.v1[i])
				}
			}
			if got := tc.throttle.V2Line(); got != tc.v2 {
				t.Errorf("V2Line() = %q, want %q", got, tc.v2)
			}
		})
	}
}

func TestV1FileNames(t *testing.T) {
	want := []string{"blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device", "blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"}
	for i, d := range limits.Dimensions {
		if got := V1File(d); got != want[i] {
			t.Errorf("V1File(%v) = %q, want %q", d, got, want[i])
		}
	}
}

func TestParseV1File(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    map[device.Device]uint64
		wantErr string
	}{
		"an empty file has no limits": {
			in: "", want: map[device.Device]uint64{},
		},
		"one line per device, as the kernel lists them": {
			in: "254:0 500\n259:0 100\n", want: map[device.Device]uint64{vda: 500, nvme0: 100},
		},
		"a zero value is no limit": {
			in: "254:0 0\n", want: map[device.Device]uint64{},
		},
		"a line with three fields is an error": {
			in: "254:0 Read 5\n", wantErr: `line 1 "254:0 Read 5"`,
		},
		"a bad value is an error naming the line": {
			in: "254:0 500\n259:0 max\n", wantErr: `line 2 "259:0 max": value "max" is not a number`,
		},
		"a bad device is an error": {
			in: "vda 500\n", wantErr: "MAJOR:MINOR",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseV1File(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseV1File(%q) = %v, %v; want an error containing %q", tc.in, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !maps.Equal(got, tc.want) {
				t.Fatalf("ParseV1File(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestParseIOMax(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    map[device.Device]limits.Limits
		wantErr string
	}{
		"an empty file has no limits": {
			in: "", want: map[device.Device]limits.Limits{},
		},
		"the kernel's key order is parsed": {
			in:   "254:0 rbps=max wbps=52428800 riops=500 wiops=max\n",
			want: map[device.Device]limits.Limits{vda: {ReadIOPS: 500, WriteBPS: 52428800}},
		},
		"several devices are parsed": {
			in:   "254:0 rbps=1 wbps=2 riops=3 wiops=4\n259:0 rbps=max wbps=max riops=max wiops=10\n",
			want: map[device.Device]limits.Limits{vda: {ReadBPS: 1, WriteBPS: 2, ReadIOPS: 3, WriteIOPS: 4}, nvme0: {WriteIOPS: 10}},
		},
		"a device with every key max is unlimited": {
			in: "254:0 rbps=max wbps=max riops=max wiops=max\n", want: map[device.Device]limits.Limits{},
		},
		"unknown keys are ignored": {
			in:   "254:0 rbps=max wbps=max riops=7 wiops=max latency=5\n",
			want: map[device.Device]limits.Limits{vda: {ReadIOPS: 7}},
		},
		"a bad value is an error": {
			in: "254:0 riops=lots\n", wantErr: `riops value "lots" is not a number or max`,
		},
		"a key without a value is an error": {
			in: "254:0 riops\n", wantErr: `"riops" is not KEY=VALUE`,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseIOMax(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseIOMax(%q) = %v, %v; want an error containing %q", tc.in, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !maps.Equal(got, tc.want) {
				t.Fatalf("ParseIOMax(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestRenderParseRoundTrip(t *testing.T) {
	for _, l := range []limits.Limits{
		{},
		{ReadIOPS: 500, WriteIOPS: 500},
		{ReadBPS: 100 << 20},
		{ReadIOPS: 1, WriteIOPS: 2, ReadBPS: 3, WriteBPS: 4},
		{WriteIOPS: limits.MaxIOPS, WriteBPS: 1<<64 - 1},
	} {
		th := Throttle{Device: nvme0, Limits: l}
		v2, err := ParseIOMax(th.V2Line())
		if err != nil || v2[nvme0] != l {
			t.Errorf("ParseIOMax(%q) = %v, %v; want %v", th.V2Line(), v2, err, l)
		}
		var v1 limits.Limits
		for _, d := range limits.Dimensions {
			values, err := ParseV1File(th.V1Line(d) + "\n")
			if err != nil {
				t.Fatalf("ParseV1File(%q): %v", th.V1Line(d), err)
			}
			v1.Set(d, values[nvme0])
		}
		if v1 != l {
			t.Errorf("v1 lines of %v parse back as %v", l, v1)
		}
	}
}
