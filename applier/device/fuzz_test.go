package device

import (
	"bufio"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// FuzzParseMountInfo: parsing any mountinfo never panics; a rejected file
// gets an error that quotes the line it rejects; an accepted one has one
// mount per non-blank line, and each mount, rendered back with the
// kernel's octal escapes, parses to itself. The seeds
// (testdata/fuzz/FuzzParseMountInfo) are this host's /proc/self/mountinfo,
// a container's and the lines of the unit tests.
func FuzzParseMountInfo(f *testing.F) {
	f.Fuzz(func(t *testing.T, content string) {
		mounts, err := ParseMountInfo(strings.NewReader(content))
		if err != nil {
			if !namesALine(err, content) {
				t.Fatalf("ParseMountInfo: error %q quotes no line of the input", err)
			}
			return
		}
		if want := nonBlankLines(content); len(mounts) != want {
			t.Fatalf("ParseMountInfo returned %d mounts for %d non-blank lines", len(mounts), want)
		}
		for _, m := range mounts {
			line := renderMount(m)
			back, err := ParseMountInfo(strings.NewReader(line))
			if err != nil || len(back) != 1 || !reflect.DeepEqual(back[0], m) {
				t.Fatalf("mount %+v rendered as %q parses to %+v, %v", m, line, back, err)
			}
		}
	})
}

// FuzzParseDevice: a device number that parses renders ("MAJ:MIN") to a
// string that parses to the same device; a rejected one is an error that
// quotes it.
func FuzzParseDevice(f *testing.F) {
	for _, s := range []string{"254:0", "259:3", "0:21", "4294967295:4294967295", "4294967296:0", "8", "8:", ":0", "+8:0", "-8:0", "08:01", " 8:0", "８:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse(s)
		if err != nil {
			if !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Fatalf("Parse(%q): error %q does not quote the input", s, err)
			}
			return
		}
		if back, err := Parse(d.String()); err != nil || back != d {
			t.Fatalf("Parse(%q) = %v, rendered %q, parsed again to %v, %v", s, d, d.String(), back, err)
		}
	})
}

// renderMount writes m as a mountinfo line, escaping as the kernel does
// (and more: every byte that is not printable ASCII, and the backslash).
func renderMount(m Mount) string {
	return fmt.Sprintf("%d %d %s %s %s rw,relatime - %s %s rw\n",
		m.ID, m.Parent, m.Device, escapeOctal(m.Root), escapeOctal(m.MountPoint), escapeOctal(m.FSType), escapeOctal(m.Source))
}

func escapeOctal(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '\\' {
			fmt.Fprintf(&b, `\%03o`, c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// namesALine reports whether err quotes (%q) one line of content, as the
// line-by-line parsers' errors do, or is a line too long to scan.
func namesALine(err error, content string) bool {
	if errors.Is(err, bufio.ErrTooLong) {
		return true
	}
	for _, line := range strings.Split(content, "\n") {
		if strings.Contains(err.Error(), strconv.Quote(strings.TrimSuffix(line, "\r"))) {
			return true
		}
	}
	return false
}

// nonBlankLines counts the lines of content with a non-space character.
func nonBlankLines(content string) int {
	n := 0
	for _, line := range strings.Split(content, "\n") {
		if strings.TrimSpace(line) != "" {
			n++
		}
	}
	return n
}
