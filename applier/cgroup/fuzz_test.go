package cgroup

// Fuzz targets of the parsers of what the kernel writes: /proc/<pid>/cgroup,
// the v1 blkio.throttle limit and stat files, v2 io.max and io.stat. Each
// never panics; a rejected file gets an error that quotes the line it
// rejects (the callers add the file's path); an accepted one, rendered back
// (with the product's renderers where there are: Throttle.V1Line, V2Line),
// parses to the same value. The seeds under testdata/fuzz/ are what this
// host's kernel wrote, the cgroup v2 node's lines (../../shared
// REAL-COMPONENTS.md's v2 layout) and the unit tests' cases.

import (
	"bufio"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// FuzzParseProcCgroup: a path found is absolute, within the reader's cgroup
// namespace (no ".."), and the same when found again in the one line that
// names it; what is not found is one of the errors the callers act on.
func FuzzParseProcCgroup(f *testing.F) {
	f.Fuzz(func(t *testing.T, content string, v2 bool) {
		v := V1
		if v2 {
			v = V2
		}
		p, err := ParseProcCgroup(content, v)
		if err != nil {
			msg := err.Error()
			switch {
			case errors.Is(err, ErrCgroupGone), errors.Is(err, ErrCgroupNamespace),
				strings.Contains(msg, "is not absolute"),
				msg == "no line for the blkio controller", msg == `no "0::" line of the unified hierarchy`:
			default:
				t.Fatalf("ParseProcCgroup(%q, %v): unexpected error %q", content, v, err)
			}
			return
		}
		if !strings.HasPrefix(p, "/") || slices.Contains(strings.Split(p, "/"), "..") || strings.Contains(p, "\n") {
			t.Fatalf("ParseProcCgroup(%q, %v) = %q: not an absolute path within the namespace", content, v, p)
		}
		line := "0::" + p
		if v == V1 {
			line = "7:blkio:" + p
		}
		if back, err := ParseProcCgroup(line+"\n", v); err != nil || back != p {
			t.Fatalf("ParseProcCgroup(%q) = %q, %v; want %q", line, back, err, p)
		}
	})
}

// FuzzParseV1File: the limits of a v1 blkio.throttle file, rendered with
// Throttle.V1Line, parse to the same limits.
func FuzzParseV1File(f *testing.F) {
	f.Fuzz(func(t *testing.T, content string) {
		checkRoundTrip(t, content, ParseV1File, func(got map[device.Device]uint64) string {
			var b strings.Builder
			for _, d := range sortedDevices(got) {
				if got[d] == limits.Unlimited {
					t.Fatalf("ParseV1File(%q) keeps an unlimited %s", content, d)
				}
				l := limits.Limits{}
				l.Set(limits.ReadIOPS, got[d])
				fmt.Fprintln(&b, Throttle{Device: d, Limits: l}.V1Line(limits.ReadIOPS))
			}
			return b.String()
		})
	})
}

// FuzzParseIOMax: the limits of a v2 io.max file, rendered with
// Throttle.V2Line, parse to the same limits.
func FuzzParseIOMax(f *testing.F) {
	f.Fuzz(func(t *testing.T, content string) {
		checkRoundTrip(t, content, ParseIOMax, func(got map[device.Device]limits.Limits) string {
			var b strings.Builder
			for _, d := range sortedDevices(got) {
				if got[d].IsUnlimited() {
					t.Fatalf("ParseIOMax(%q) keeps an unlimited %s", content, d)
				}
				fmt.Fprintln(&b, Throttle{Device: d, Limits: got[d]}.V2Line())
			}
			return b.String()
		})
	})
}

// FuzzParseIOStat: the counters of a v2 io.stat file, rendered as the
// kernel writes them, parse to the same counters.
func FuzzParseIOStat(f *testing.F) {
	parse := func(content string) (map[device.Device]IOStat, error) {
		got := map[device.Device]IOStat{}
		return got, parseIOStat(content, got)
	}
	f.Fuzz(func(t *testing.T, content string) {
		checkRoundTrip(t, content, parse, func(got map[device.Device]IOStat) string {
			var b strings.Builder
			for _, d := range sortedDevices(got) {
				s := got[d]
				fmt.Fprintf(&b, "%s rbytes=%d wbytes=%d rios=%d wios=%d dbytes=0 dios=0\n", d, s.ReadBytes, s.WriteBytes, s.ReadIOs, s.WriteIOs)
			}
			return b.String()
		})
	})
}

// FuzzParseV1Stat: the counters of a v1 blkio.throttle.io_serviced (or
// io_service_bytes) file, rendered as the kernel writes them, parse to the
// same counters.
func FuzzParseV1Stat(f *testing.F) {
	f.Fuzz(func(t *testing.T, content string) {
		checkRoundTrip(t, content, parseV1Stat, func(got map[device.Device]readWrite) string {
			var b strings.Builder
			var total uint64
			for _, d := range sortedDevices(got) {
				c := got[d]
				fmt.Fprintf(&b, "%s Read %d\n%s Write %d\n%s Sync 0\n%s Async 0\n%s Discard 0\n%s Total %d\n", d, c.read, d, c.write, d, d, d, d, c.read+c.write)
				total += c.read + c.write
			}
			fmt.Fprintf(&b, "Total %d\n", total)
			return b.String()
		})
	})
}

// checkRoundTrip parses content: a rejection must quote the line it
// rejects; what parses, rendered, must parse to the same value.
func checkRoundTrip[M any](t *testing.T, content string, parse func(string) (M, error), render func(M) string) {
	t.Helper()
	got, err := parse(content)
	if err != nil {
		checkNamesALine(t, err, content)
		return
	}
	text := render(got)
	if back, err := parse(text); err != nil || !reflect.DeepEqual(back, got) {
		t.Fatalf("%q parsed to %v, rendered %q, parsed again to %v, %v", content, got, text, back, err)
	}
}

func sortedDevices[V any](m map[device.Device]V) []device.Device {
	return slices.SortedFunc(maps.Keys(m), func(a, b device.Device) int {
		if a.Major != b.Major {
			return int(a.Major) - int(b.Major)
		}
		return int(a.Minor) - int(b.Minor)
	})
}

// checkNamesALine fails the test unless err quotes (%q) one line of
// content, as eachLine's errors do, or is a line too long to scan.
func checkNamesALine(t *testing.T, err error, content string) {
	t.Helper()
	if errors.Is(err, bufio.ErrTooLong) {
		return
	}
	for _, line := range strings.Split(content, "\n") {
		if strings.Contains(err.Error(), strconv.Quote(strings.TrimSuffix(line, "\r"))) {
			return
		}
	}
	t.Fatalf("error %q quotes no line of the input %q", err, content)
}
