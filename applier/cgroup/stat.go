package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kubediskguard/kubediskguard/applier/device"
)

// IOStat holds the IO counters of one cgroup on one device since the cgroup
// was created.
type IOStat struct {
	ReadBytes, WriteBytes uint64
	ReadIOs, WriteIOs     uint64
}

// Stats returns the IO counters of the cgroup directory dir, its
// descendants included, for each of devices (zero for a device without IO).
// With no devices it returns every device the files list. It reads io.stat
// on cgroup v2 and blkio.throttle.io_serviced_recursive and
// io_service_bytes_recursive on cgroup v1 (the non-recursive files on
// kernels without them).
func (h *Hierarchy) Stats(dir string, devices []device.Device) (map[device.Device]IOStat, error) {
	return StatsOf(h.version, dir, func(name string) (string, error) { return h.readFile(dir, name) }, devices)
}

// StatsOf is Stats with the files of the cgroup directory dir read by read
// (by file name; a missing file is an error wrapping os.ErrNotExist): the
// counters of a cgroup on another machine, such as a test's node.
func StatsOf(v Version, dir string, read func(name string) (string, error), devices []device.Device) (map[device.Device]IOStat, error) {
	all := map[device.Device]IOStat{}
	if v == V2 {
		content, err := read("io.stat")
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", filepath.Join(dir, "io.stat"), err)
		}
		if err := parseIOStat(content, all); err != nil {
			return nil, fmt.Errorf("parsing %s: %w", filepath.Join(dir, "io.stat"), err)
		}
	} else {
		for _, file := range []string{"blkio.throttle.io_serviced", "blkio.throttle.io_service_bytes"} {
			name := file + "_recursive"
			content, err := read(name)
			if errors.Is(err, os.ErrNotExist) && !errors.Is(err, ErrCgroupGone) {
				name = file
				content, err = read(name)
			}
			if err != nil {
				return nil, fmt.Errorf("reading %s: %w", filepath.Join(dir, name), err)
			}
			counts, err := parseV1Stat(content)
			if err != nil {
				return nil, fmt.Errorf("parsing %s: %w", filepath.Join(dir, name), err)
			}
			for d, c := range counts {
				s := all[d]
				if file == "blkio.throttle.io_serviced" {
					s.ReadIOs, s.WriteIOs = c.read, c.write
				} else {
					s.ReadBytes, s.WriteBytes = c.read, c.write
				}
				all[d] = s
			}
		}
	}
	if len(devices) == 0 {
		return all, nil
	}
	out := make(map[device.Device]IOStat, len(devices))
	for _, d := range devices {
		out[d] = all[d]
	}
	return out, nil
}

type readWrite struct{ read, write uint64 }

// parseV1Stat parses the Read and Write lines of a cgroup v1 blkio stat
// file ("254:0 Read 123"), by device.
func parseV1Stat(content string) (map[device.Device]readWrite, error) {
	out := map[device.Device]readWrite{}
	err := eachLine(content, func(fields []string) error {
		if len(fields) == 2 && fields[0] == "Total" {
			return nil
		}
		if len(fields) != 3 {
			return errors.New("want MAJ:MIN OPERATION COUNT")
		}
		if fields[1] != "Read" && fields[1] != "Write" {
			return nil
		}
		d, err := device.Parse(fields[0])
		if err != nil {
			return err
		}
		n, err := strconv.ParseUint(fields[2], 10, 64)
		if err != nil {
			return fmt.Errorf("count %q is not a number", fields[2])
		}
		c := out[d]
		if fields[1] == "Read" {
			c.read = n
		} else {
			c.write = n
		}
		out[d] = c
		return nil
	})
	return out, err
}

// parseIOStat adds the lines of a cgroup v2 io.stat file
// ("254:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0") to stats;
// keys other than those four are ignored.
func parseIOStat(content string, stats map[device.Device]IOStat) error {
	return eachLine(content, func(fields []string) error {
		d, err := device.Parse(fields[0])
		if err != nil {
			return err
		}
		s := stats[d]
		for _, kv := range fields[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("%q is not KEY=VALUE", kv)
			}
			var field *uint64
			switch k {
			case "rbytes":
				field = &s.ReadBytes
			case "wbytes":
				field = &s.WriteBytes
			case "rios":
				field = &s.ReadIOs
			case "wios":
				field = &s.WriteIOs
			default:
				continue
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return fmt.Errorf("%s value %q is not a number", k, v)
			}
			*field = n
		}
		stats[d] = s
		return nil
	})
}
