package cgroup

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestParseVersion(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Version
		wantErr bool
	}{
		"auto detects":                  {in: "auto", want: Auto},
		"v1 is cgroup v1":               {in: "v1", want: V1},
		"v2 is cgroup v2":               {in: "v2", want: V2},
		"a bare number is invalid":      {in: "2", wantErr: true},
		"upper case is invalid":         {in: "V2", wantErr: true},
		"an empty value is invalid":     {in: "", wantErr: true},
		"a version with space is wrong": {in: " v1", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseVersion(tc.in)
			if tc.wantErr {
				if err == nil || !strings.Contains(err.Error(), "want auto, v1 or v2") {
					t.Fatalf("ParseVersion(%q) = %v, %v; want an error listing the choices", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want || got.String() != tc.in {
				t.Fatalf("ParseVersion(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestOpen(t *testing.T) {
	tests := map[string]struct {
		layout  string
		root    string // below the layout's root
		version Version
		want    Version
		wantDir string // below the layout's root
		wantErr []string
	}{
		"a unified host is detected as v2": {
			layout: "v2", version: Auto, want: V2, wantDir: "",
		},
		"a v1 host is detected as v1, in its blkio hierarchy": {
			layout: "v1", version: Auto, want: V1, wantDir: "blkio",
		},
		"a hybrid host with an empty cgroup2 is detected as v1": {
			layout: "hybrid", version: Auto, want: V1, wantDir: "blkio",
		},
		"an explicit v1 on a hybrid host is accepted": {
			layout: "hybrid", version: V1, want: V1, wantDir: "blkio",
		},
		"an explicit v2 on a unified host is accepted": {
			layout: "v2", version: V2, want: V2, wantDir: "",
		},
		"an explicit v2 on a v1 host is an error naming the missing file": {
			layout: "v1", version: V2, wantErr: []string{"cgroup v2", "cgroup.controllers does not exist"},
		},
		"an explicit v1 on a unified host is an error naming the missing file": {
			layout: "v2", version: V1, wantErr: []string{"cgroup v1", "blkio/blkio.throttle.read_iops_device does not exist"},
		},
		"the cgroup2 of a hybrid host has no io controller": {
			layout: "hybrid", root: "unified", version: Auto, wantErr: []string{"io controller is not available", "hugetlb", "bound to cgroup v1"},
		},
		"a root without any cgroup is an error naming both probes": {
			layout: "v1", root: "cpu", version: Auto, wantErr: []string{"no cgroup hierarchy", "cgroup.controllers", "blkio.throttle.read_iops_device"},
		},
		"an unknown version is an error": {
			layout: "v1", version: Version(7), wantErr: []string{"unknown cgroup version"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			base := newRoot(t, tc.layout)
			root := filepath.Join(base, tc.root)
			h, err := Open(root+"/", tc.version)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("Open = %v %s, want an error", h.Version(), h.Dir())
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.Version() != tc.want || h.Dir() != filepath.Join(base, tc.wantDir) {
				t.Errorf("Open = %v at %s, want %v at %s", h.Version(), h.Dir(), tc.want, filepath.Join(base, tc.wantDir))
			}
		})
	}
}

func TestJoinAndRel(t *testing.T) {
	h, _ := newHierarchy(t, V1)
	tests := map[string]struct{ path, want string }{
		"an absolute path is below the hierarchy":  {"/kubepods/besteffort", "/kubepods/besteffort"},
		"a relative path is below the hierarchy":   {"kubepods/besteffort", "/kubepods/besteffort"},
		"dot-dot cannot leave the hierarchy":       {"/../../etc", "/etc"},
		"the root is the hierarchy's directory":    {"/", "/"},
		"an unclean path is cleaned":               {"//kubepods/./x/../burstable/", "/kubepods/burstable"},
		"an empty path is the hierarchy directory": {"", "/"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			dir := h.Join(tc.path)
			if want := filepath.Join(h.Dir(), tc.want); dir != want {
				t.Fatalf("Join(%q) = %s, want %s", tc.path, dir, want)
			}
			rel, err := h.Rel(dir)
			if err != nil || rel != tc.want {
				t.Fatalf("Rel(%s) = %q, %v; want %q", dir, rel, err, tc.want)
			}
		})
	}
	for _, outside := range []string{filepath.Dir(h.Dir()), h.Dir() + "x", "/etc", filepath.Join(filepath.Dir(h.Dir()), "cpu")} {
		if rel, err := h.Rel(outside); err == nil {
			t.Errorf("Rel(%s) = %q, want an error: it is outside %s", outside, rel, h.Dir())
		}
	}
}
