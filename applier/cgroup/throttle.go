package cgroup

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// IOMaxFile is the cgroup v2 file of block IO limits.
const IOMaxFile = "io.max"

// V1File returns the cgroup v1 blkio file of one dimension, such as
// "blkio.throttle.read_iops_device".
func V1File(d limits.Dimension) string {
	switch d {
	case limits.ReadIOPS:
		return "blkio.throttle.read_iops_device"
	case limits.WriteIOPS:
		return "blkio.throttle.write_iops_device"
	case limits.ReadBPS:
		return "blkio.throttle.read_bps_device"
	case limits.WriteBPS:
		return "blkio.throttle.write_bps_device"
	}
	panic(fmt.Sprintf("cgroup: unknown dimension %d", d))
}

// v2Key returns the io.max key of one dimension.
func v2Key(d limits.Dimension) string {
	switch d {
	case limits.ReadIOPS:
		return "riops"
	case limits.WriteIOPS:
		return "wiops"
	case limits.ReadBPS:
		return "rbps"
	case limits.WriteBPS:
		return "wbps"
	}
	panic(fmt.Sprintf("cgroup: unknown dimension %d", d))
}

// Throttle is the block IO limit set of one device in one cgroup, as cgroup
// v1's four blkio.throttle files and cgroup v2's io.max hold it. A zero
// dimension is unlimited.
type Throttle struct {
	Device device.Device
	Limits limits.Limits
}

// V1Line renders the line for one dimension's cgroup v1 file: "254:0 500".
// An unlimited dimension renders "254:0 0", which clears the limit.
func (t Throttle) V1Line(d limits.Dimension) string {
	return t.Device.String() + " " + strconv.FormatUint(t.Limits.Get(d), 10)
}

// V2Line renders the cgroup v2 io.max line of all four dimensions:
// "254:0 riops=500 wiops=max rbps=max wbps=52428800", where "max" clears one
// dimension without touching the others.
func (t Throttle) V2Line() string {
	var b strings.Builder
	b.WriteString(t.Device.String())
	for _, d := range limits.Dimensions {
		b.WriteByte(' ')
		b.WriteString(v2Key(d))
		b.WriteByte('=')
		if v := t.Limits.Get(d); v == limits.Unlimited {
			b.WriteString("max")
		} else {
			b.WriteString(strconv.FormatUint(v, 10))
		}
	}
	return b.String()
}

// ParseV1File parses the contents of a cgroup v1 blkio.throttle file: one
// "MAJ:MIN VALUE" line per limited device. Devices without a line are
// unlimited.
func ParseV1File(content string) (map[device.Device]uint64, error) {
	out := map[device.Device]uint64{}
	err := eachLine(content, func(fields []string) error {
		if len(fields) != 2 {
			return fmt.Errorf("want MAJ:MIN VALUE")
		}
		d, err := device.Parse(fields[0])
		if err != nil {
			return err
		}
		v, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return fmt.Errorf("value %q is not a number", fields[1])
		}
		if v != limits.Unlimited {
			out[d] = v
		}
		return nil
	})
	return out, err
}

// ParseIOMax parses the contents of a cgroup v2 io.max file: one line per
// limited device, "MAJ:MIN rbps=max wbps=max riops=500 wiops=max". Devices
// without a line are unlimited; unknown keys are ignored.
func ParseIOMax(content string) (map[device.Device]limits.Limits, error) {
	out := map[device.Device]limits.Limits{}
	err := eachLine(content, func(fields []string) error {
		d, err := device.Parse(fields[0])
		if err != nil {
			return err
		}
		var l limits.Limits
		for _, kv := range fields[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("%q is not KEY=VALUE", kv)
			}
			for _, dim := range limits.Dimensions {
				if k != v2Key(dim) || v == "max" {
					continue
				}
				n, err := strconv.ParseUint(v, 10, 64)
				if err != nil {
					return fmt.Errorf("%s value %q is not a number or max", k, v)
				}
				l.Set(dim, n)
			}
		}
		if !l.IsUnlimited() {
			out[d] = l
		}
		return nil
	})
	return out, err
}

// eachLine calls f with the fields of every non-blank line, and wraps its
// error with the line.
func eachLine(content string, f func(fields []string) error) error {
	sc := bufio.NewScanner(strings.NewReader(content))
	for n := 1; sc.Scan(); n++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if err := f(fields); err != nil {
			return fmt.Errorf("line %d %q: %w", n, sc.Text(), err)
		}
	}
	return sc.Err()
}
