// Package device finds the block devices whose IO KubeDiskGuard limits: the
// disk holding the filesystem mounted at DATA_MOUNT, or the explicit
// DATA_DEVICES. It reads mountinfo and sysfs only; it never runs df or lsblk.
package device

import (
	"fmt"
	"strconv"
	"strings"
)

// Device is a block device number, as the kernel's block throttle names it.
type Device struct {
	Major, Minor uint32
}

// String renders the device as "MAJ:MIN", the form cgroup files use: "254:0".
func (d Device) String() string {
	return strconv.FormatUint(uint64(d.Major), 10) + ":" + strconv.FormatUint(uint64(d.Minor), 10)
}

// Parse parses a "MAJ:MIN" device number such as "259:3".
func Parse(s string) (Device, error) {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return Device{}, fmt.Errorf("device number %q: want MAJOR:MINOR", s)
	}
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return Device{}, fmt.Errorf("device number %q: want MAJOR:MINOR, two decimal numbers", s)
	}
	return Device{Major: uint32(ma), Minor: uint32(mi)}, nil
}

// FromRdev splits a Linux dev_t (stat's st_rdev or st_dev) into its major and
// minor numbers, with glibc's encoding.
func FromRdev(rdev uint64) Device {
	major := (rdev>>8)&0xfff | (rdev>>32)&^uint64(0xfff)
	minor := rdev&0xff | (rdev>>12)&^uint64(0xff)
	return Device{Major: uint32(major), Minor: uint32(minor)}
}
